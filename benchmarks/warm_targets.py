"""Optimise and cache the MEMIT targets of the first N zsRE facts, resumably, before a long study.

On a 2-core CPU a target costs about 11 s, so 1,000 facts take about 3 hours; this fills
benchmarks.common.TargetCache 50 facts at a time (a killed run loses at most one batch) and records each
batch's wall time, which bench_edit.py --cached-targets reports as the target-optimisation time.

    python benchmarks/warm_targets.py --facts 1000
    python benchmarks/warm_targets.py --model gemma3-270m --facts 100 --heldout-after 1000 --save-every 10

Targets cached before times were kept (bench_edit.py's batched-vs-one-at-a-time run stores its batched
targets) get the time that run measured with ``--seconds-from bench_edit.json`` (its ``targets.batched_s``
shared over its ``targets.facts`` first facts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import TargetCache, add_slice_arguments, fact_slice, memit_target_cache, zsre_facts  # noqa: E402


def record_seconds(cache: TargetCache, facts: list, seconds: float) -> None:
    """Give cached targets stored without a time their share of the measured time of their batch."""
    untimed = cache.untimed(facts)
    if len(untimed) not in (0, len(facts)):
        raise SystemExit("only some of those facts lack a time: they were not all optimised in that one batch")
    if untimed:
        cache.put(untimed, cache.get(untimed), seconds)
        print(f"recorded {seconds:.0f} s over the {len(untimed)} targets of that batch", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_slice_arguments(ap, facts=1000)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--seconds-from", type=Path, help="a bench_edit.py --json result whose batched targets are cached")
    args = ap.parse_args()
    cache = memit_target_cache(args.model)
    facts = fact_slice(args.data, args.facts, args.heldout_after)
    if args.seconds_from:
        timed = json.loads(args.seconds_from.read_text())["targets"]
        record_seconds(cache, zsre_facts(args.data, timed["facts"]), timed["batched_s"])
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"{done}/{total} missing targets optimised, {time.perf_counter() - t0:.0f} s", flush=True)

    print(f"{len(cache.missing(facts))} of {len(facts)} targets missing in {cache.path}", flush=True)
    cache.fill(facts, args.save_every, progress)


if __name__ == "__main__":
    main()
