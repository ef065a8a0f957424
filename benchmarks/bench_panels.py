"""How to split Σ k kᵀ's upper triangle into matrix products: row panels against the old pairwise blocks.

One batch's keys (random, 3,344 × 1,536: the mean batch of the 1M-token statistics run on SmolLM2) added to
a ``SecondMoment`` with 1-16 row panels, and with the 4 × 4 blocks taken pairwise that it used before, in
float64 and in mixed precision (float32 products, float64 sums). Seconds per layer per batch, median of
``--repeat`` runs, and the rate in GFLOP/s of the work each split does ((n+1)/2n of a full product for n
panels, 10/16 for the blocks).

    python benchmarks/bench_panels.py --json benchmarks/results/bench_panels_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from covedit.stats.collect import SecondMoment, _panel_edges  # noqa: E402


class PairwiseBlocks(SecondMoment):
    """The split before row panels: 4 × 4 blocks, every block on or above the diagonal its own product."""

    def __init__(self, d: int, accumulate: str):
        super().__init__(d, accumulate)
        edges = _panel_edges(d, 4)
        self._pairs = [(a, b) for i, a in enumerate(edges) for b in edges[i:]]

    def add(self, keys: torch.Tensor) -> None:
        k = keys.to(self.product_dtype)
        for (r0, r1), (c0, c1) in self._pairs:
            if self.product_dtype == self.sum_dtype:
                self.sum[r0:r1, c0:c1].addmm_(k[:, r0:r1].T, k[:, c0:c1])
            else:
                self.sum[r0:r1, c0:c1] += (k[:, r0:r1].T @ k[:, c0:c1]).to(self.sum_dtype)


def seconds(moment: SecondMoment, keys: torch.Tensor, repeat: int) -> float:
    moment.add(keys)  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        moment.add(keys)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=3344)
    ap.add_argument("--d", type=int, default=1536)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    keys = torch.randn(args.tokens, args.d, generator=torch.Generator().manual_seed(0))
    full_flops = 2.0 * args.tokens * args.d * args.d
    rows = []
    for accumulate in ("mixed", "float64"):
        splits = [("4 × 4 blocks, pairwise (before)", PairwiseBlocks(args.d, accumulate), 10 / 16)]
        splits += [(f"{n} row panels", SecondMoment(args.d, accumulate, panels=n), (n + 1) / (2 * n))
                   for n in (1, 2, 4, 6, 8, 12, 16)]
        for name, moment, share in splits:
            s = seconds(moment, keys, args.repeat)
            rows.append({"accumulate": accumulate, "split": name, "seconds": s, "work_share": share,
                         "gflop_s": full_flops * share / s / 1e9})
            print(f"{accumulate:8s} {name:34s} {s:.4f} s  {full_flops * share / s / 1e9:6.1f} GFLOP/s", flush=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}", "tokens": args.tokens, "d": args.d, "repeat": args.repeat,
              "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
