"""The evaluation's cost on the demo's facts: covedit's evaluate_model against the way it was computed before
(logits over the whole vocabulary at every position, the generation family and fluency as two decoding
passes), side by side in one process, alternating, on the same model and facts; and what a decoding step
costs against reading the weights once at the machine's measured memory bandwidth (its physical limit).

    python benchmarks/bench_eval.py --json benchmarks/results/bench_eval_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from covedit.pipeline import evaluate as ev  # noqa: E402
from covedit.pipeline.facts import read_facts  # noqa: E402
from covedit.pipeline.models import LoadedModel, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def before_this_change(loaded: LoadedModel, facts: list) -> None:
    """evaluate_model as it was: every position's logits, then two decoding passes (the generation family's
    prompts, then fluency's)."""
    slicing = LoadedModel.takes_logits_to_keep
    LoadedModel.takes_logits_to_keep = property(lambda self: False)  # logits everywhere, sliced after
    try:
        ev._teacher_forced_metrics(loaded, facts)
        ev.next_token_logprobs(loaded)
    finally:
        LoadedModel.takes_logits_to_keep = slicing
    ev.generation_metrics(loaded, facts)
    ev.fluency(loaded)


def bandwidth() -> float:
    """Read bandwidth (bytes/s) of this machine: summing a 256 MiB tensor, best of 5."""
    a = torch.ones(64 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.numel() * 4 / best


@torch.no_grad()
def decode_step(loaded: LoadedModel, rows: int, steps: int = 10) -> float:
    """Seconds per greedy decoding step with ``rows`` sequences of 20 tokens in the KV cache."""
    ids = torch.randint(100, 1000, (rows, 20), generator=torch.Generator().manual_seed(0))
    out = loaded.model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, step = out.cache, ids[:, -1:]
    t0 = time.perf_counter()
    for _ in range(steps):
        out = loaded.model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1)
        step = out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=Path, default=ROOT / "examples" / "facts.jsonl")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    loaded = load_model()
    facts = read_facts(args.facts)
    ev.evaluate_model(loaded, facts)  # warm-up: first calls allocate
    times: dict[str, list[float]] = {"covedit": [], "before": []}
    for _ in range(args.repeats):
        for name, run in (("covedit", lambda: ev.evaluate_model(loaded, facts)),
                          ("before", lambda: before_this_change(loaded, facts))):
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    bw = bandwidth()
    steps = {rows: decode_step(loaded, rows) for rows in (1, 10, 30)}
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "facts": str(args.facts.relative_to(ROOT)), "n_facts": len(facts),
              "evaluate_s": {k: min(v) for k, v in times.items()}, "all_s": times,
              "speedup": min(times["before"]) / min(times["covedit"]),
              "weights_bytes": weights, "read_bandwidth_gb_s": bw / 1e9,
              "decode_step_s": steps, "decode_step_limit_s": weights / bw,
              "decode_step_vs_limit": {rows: s / (weights / bw) for rows, s in steps.items()}}
    print(f"evaluate_model on {len(facts)} facts (no cached reference): {result['evaluate_s']['covedit']:.1f} s, "
          f"before this change {result['evaluate_s']['before']:.1f} s ({result['speedup']:.2f}x)")
    print(f"decoding step: {', '.join(f'{r} rows {s * 1000:.0f} ms' for r, s in steps.items())}; reading the "
          f"{weights / 1e6:.0f} MB of weights at {bw / 1e9:.1f} GB/s takes {weights / bw * 1000:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
