"""``covedit batch-edit`` end to end on N zsRE facts, run as a user runs it: one command, its wall time.

The facts are N distinct (subject, answer) pairs: the first record of each of the first N subjects of the
zsRE sample (each subject there has one answer, and records of one subject would be merged into one target,
so N records of fewer subjects would be fewer edits). The command runs in a fresh process with the
statistics already built, the model already widened, and nothing else kept: no cached unedited-model
reference, no cached context templates (the run gets a cache folder of its own holding only links to the
model and the statistics). Recorded: the wall time, the
manifest's own timings (targets, solve, evaluation) and its evaluation without the per-fact rows, and
the machine. Without statistics for the default layers batch-edit refuses to run (no ``--build-stats`` is
passed), so a statistics build is never inside the time. The facts are the first N subjects of the file,
tuning and held-out slices alike: a timing, not a quality result to set beside the held-out tables.

    python benchmarks/end_to_end.py --facts 1000 --json benchmarks/results/end_to_end_1000_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import DEFAULT_DATA, ROOT, add_override_argument, write_facts, zsre_facts  # noqa: E402
from covedit.pipeline.models import cache_root  # noqa: E402


def one_per_subject(path: Path, n: int) -> list:
    """The first record of each of the first ``n`` subjects, in file order."""
    out, seen = [], set()
    for fact in zsre_facts(path, None):
        if fact.subject not in seen:
            seen.add(fact.subject)
            out.append(fact)
    if len(out) < n:
        raise SystemExit(f"{path} has only {len(out)} subjects, not {n}")
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--facts", type=int, default=1000)
    add_override_argument(ap)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    facts = one_per_subject(args.data, args.facts)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_facts(facts, tmp / "facts.jsonl")
        cmd = [sys.executable, str(ROOT / "cli.py"), "batch-edit", str(tmp / "facts.jsonl"),
               "--output", str(tmp / "edited"), "--report", str(tmp / "report")]
        for o in args.overrides:
            cmd += ["--set", o]
        # a cache folder of its own that shares only the widened model and the statistics: no unedited-model
        # evaluation reference and no context templates are kept from an earlier run
        cache = tmp / "cache"
        cache.mkdir()
        for part in ("models", "gguf", "stats"):
            if (cache_root() / part).exists():
                (cache / part).symlink_to(cache_root() / part)
        env = {**os.environ, "COVEDIT_CACHE": str(cache)}
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"batch-edit exited {done.returncode}:\n{done.stderr[-3000:]}")
        manifest = json.loads((tmp / "edited" / "manifest.json").read_text())
    shown = ["cli.py", "batch-edit", "facts.jsonl", "--output", "OUT/edited", "--report", "OUT/report"] + cmd[8:]
    evaluation = {k: v for k, v in (manifest.get("evaluation") or {}).items() if k != "per_fact"}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} threads", "facts": len(facts),
              "subjects": len({f.subject for f in facts}), "command": " ".join(shown), "wall_s": wall,
              "timings": manifest.get("timings"), "evaluation": evaluation, "stdout": done.stdout}
    print(done.stdout)
    print(f"{len(facts)} facts end to end: {wall:.0f} s ({wall / 60:.1f} min)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
