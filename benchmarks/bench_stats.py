"""Speed of the statistics stage against the bare forward, its physical limit, and the reference strategy.

Measured in one run, interleaved batch by batch on the same pre-tokenised batches (so machine noise hits
all columns alike):

  (a) bare forward pass, truncated after the deepest collected layer: what the stage costs without its products;
  (b) covedit's collector: one truncated forward serves all layers, Σ k kᵀ accumulated (per --accumulate);
  (c) the reference strategy: one separate truncated pass per layer, each accumulating its own layer.

Batches are packed as ``build-stats`` packs them (its ``--window-docs``, ``--batch-tokens`` and
``--max-length`` defaults): padding costs the forward time but adds no keys, so a benchmark packed
differently would measure another ratio.

Beside them, (p): the physical limit of the products. Each batch, one full float32 product kᵀk of as many
keys as the batch counts (random: the rate does not depend on the values), in the product precision of
--accumulate, is timed on its own; the exact symmetric product (a rank-k update, d(d+1)/2 of the d²
entries) of every layer at that rate is the least the products can cost, so a/(a + p) is the best ratio
(b) can reach on this machine with exact products in that precision, a forward no cheaper than (a), and
no overlap of the two (on 2 CPU cores the forward already uses both).

With ``--compare mixed`` a fourth column (b') runs the collector with that other precision on the same
batches, and the run reports its speed beside (a) and (b) and its largest relative difference from (b)'s
float64 sums, max |Σ' − Σ| / max |Σ| over the layers (issue 15: ``mixed`` becomes the default only if this
is below 1e-6 at 1M tokens). ``--skip-reference`` leaves (c) out.

Then (d): the whole `build-stats` pipeline end to end (tokenising, batching, checkpoints, zarr) on the same
token budget, and its peak resident memory at two budgets (it must not grow with the budget).

    python benchmarks/bench_stats.py --tokens 200000            # about 15 minutes on a 2-core CPU
    python benchmarks/bench_stats.py --tokens 200000 --skip-reference --skip-end-to-end --window-docs 64 \
        --json benchmarks/results/bench_stats_packing64_cpu.json   # (and 512, the default, and 2048)
    python benchmarks/bench_stats.py --device cuda --dtype bfloat16 --tokens 2000000
    python benchmarks/bench_stats.py --tokens 1000000 --compare mixed --skip-reference --skip-end-to-end \
        --json benchmarks/results/bench_stats_mixed_1M_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from covedit.pipeline.hooks import capture_inputs, run_until  # noqa: E402
from covedit.pipeline.models import default_layers, load_model  # noqa: E402
from covedit.stats.collect import PRODUCT_DTYPE, SecondMoment, accumulate_batches  # noqa: E402
from covedit.stats.corpus import CorpusSpec, iter_batches, make_plan, open_corpus  # noqa: E402
from covedit.stats.distributed import StatsJob  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(loaded, layers, batch) -> None:
    deepest = loaded.down_proj(max(layers))
    with torch.inference_mode(), capture_inputs([deepest], stop_after=deepest):
        run_until(loaded.model, input_ids=batch.input_ids.to(loaded.device),
                  attention_mask=batch.attention_mask.to(loaded.device), use_cache=False)


def full_product_seconds(n_keys: int, d: int, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds of one full kᵀk of n random keys: the machine's matrix-product rate for this shape."""
    k = torch.randn(n_keys, d, dtype=dtype, device=device)
    sync(device); t = time.perf_counter()
    k.T @ k
    sync(device)
    return time.perf_counter() - t


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def peak_rss_of_build(tokens: int, args) -> tuple[float, float]:
    """Run build-stats in a child process with a fresh store; return (peak RSS MiB, wall s)."""
    with tempfile.TemporaryDirectory() as d:
        # Run from the repository root: importing benchmarks makes covedit this checkout (benchmarks/__init__.py).
        code = ("import resource, runpy, sys; sys.argv=['covedit'] + sys.argv[1:]; "
                "import benchmarks\nfrom covedit import cli\ntry:\n    cli.app()\nexcept SystemExit:\n    pass\n"
                "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        cmd = [sys.executable, "-c", code, "build-stats", "--model", args.model, "--tokens", str(tokens),
               "--layers", ",".join(map(str, args.layers)), "--stats-dir", d, "--quiet", "--json",
               "--dtype", args.dtype, "--device", args.device, "--accumulate", args.accumulate,
               "--batch-tokens", str(args.batch_tokens), "--max-length", str(args.max_length)]
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True)
        wall = time.perf_counter() - t
    peak = next(int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("PEAK_KB"))
    return peak / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--layers", default=None, help="comma list; default: the edit layers of the model")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    job = StatsJob(model="", layers=())  # build-stats' own defaults
    ap.add_argument("--accumulate", default=job.accumulate)
    ap.add_argument("--batch-tokens", type=int, default=job.batch_tokens)
    ap.add_argument("--max-length", type=int, default=job.max_length)
    ap.add_argument("--window-docs", type=int, default=job.window_docs)
    ap.add_argument("--memory-budgets", default="50000,500000", help="token budgets for the peak-RSS check ('' to skip)")
    ap.add_argument("--skip-end-to-end", action="store_true")
    ap.add_argument("--compare", default=None, help="another --accumulate to run beside it, e.g. mixed")
    ap.add_argument("--skip-reference", action="store_true", help="leave out (c), one pass per layer")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    loaded = load_model(args.model, args.dtype, args.device)
    args.layers = [int(x) for x in args.layers.split(",")] if args.layers else default_layers(loaded.num_layers)
    corpus = open_corpus(CorpusSpec())
    plan = make_plan(corpus, loaded.tokenizer, args.tokens, args.max_length, "skip")
    batches = list(iter_batches(corpus, loaded.tokenizer, 0, plan.n_docs, plan, args.max_length, args.batch_tokens, "skip",
                                args.window_docs))
    n_tokens = sum(b.n_tokens for b in batches)
    real_share = sum(int(b.attention_mask.sum()) for b in batches) / sum(b.input_ids.numel() for b in batches)
    print(f"machine: {machine()}")
    print(f"model {loaded.model_id} ({args.dtype} on {loaded.device}), layers {args.layers}, "
          f"{n_tokens:,} tokens in {len(batches)} batches (windows of {args.window_docs} documents, "
          f"{real_share:.1%} of the batch cells real tokens), accumulate {args.accumulate}")

    ours = {L: SecondMoment(loaded.d_ff, args.accumulate, loaded.device) for L in args.layers}
    ref = {L: SecondMoment(loaded.d_ff, args.accumulate, loaded.device) for L in args.layers}
    other = ({L: SecondMoment(loaded.d_ff, args.compare, loaded.device) for L in args.layers}
             if args.compare else None)
    times = {"a": 0.0, "b": 0.0, "c": 0.0, "b2": 0.0, "p": 0.0}
    symmetric_share = len(args.layers) * (loaded.d_ff + 1) / (2 * loaded.d_ff)
    product_dtype = PRODUCT_DTYPE[args.accumulate]
    bare_forward(loaded, args.layers, batches[0])  # warm-up
    full_product_seconds(batches[0].n_tokens, loaded.d_ff, product_dtype, loaded.device)
    for i, batch in enumerate(batches):
        sync(loaded.device); t = time.perf_counter()
        bare_forward(loaded, args.layers, batch)
        sync(loaded.device); times["a"] += time.perf_counter() - t
        t = time.perf_counter()
        for _ in accumulate_batches(loaded, args.layers, [batch], ours):
            pass
        sync(loaded.device); times["b"] += time.perf_counter() - t
        times["p"] += symmetric_share * full_product_seconds(batch.n_tokens, loaded.d_ff, product_dtype, loaded.device)
        if other is not None:
            t = time.perf_counter()
            for _ in accumulate_batches(loaded, args.layers, [batch], other):
                pass
            sync(loaded.device); times["b2"] += time.perf_counter() - t
        if not args.skip_reference:
            t = time.perf_counter()
            for L in args.layers:
                for _ in accumulate_batches(loaded, [L], [batch], {L: ref[L]}):
                    pass
            sync(loaded.device); times["c"] += time.perf_counter() - t
        if (i + 1) % 10 == 0:
            print(f"  batch {i + 1}/{len(batches)}: " + " ".join(f"{k} {v:.1f}s" for k, v in times.items() if v),
                  flush=True)
    for L in args.layers if not args.skip_reference else []:  # the two strategies must agree
        a, b = ours[L].state(), ref[L].state()
        assert a[1] == b[1] and abs(a[0] - b[0]).max() <= 1e-9 * abs(a[0]).max(), f"layer {L} differs"
    compare_error = None
    if other is not None:
        compare_error = max(float(abs(other[L].state()[0] - ours[L].state()[0]).max() / abs(ours[L].state()[0]).max())
                            for L in args.layers)

    times = {k: v for k, v in times.items() if v}  # the columns that ran
    rate = {k: n_tokens / v for k, v in times.items() if k != "p"}
    best_ratio = times["a"] / (times["a"] + times["p"])
    results = {"machine": machine(), "model": loaded.model_id, "dtype": args.dtype, "device": str(loaded.device),
               "layers": args.layers, "tokens": n_tokens, "accumulate": args.accumulate,
               "window_docs": args.window_docs, "batch_tokens": args.batch_tokens, "max_length": args.max_length,
               "real_token_share_of_batches": real_share, "seconds": times, "best_possible_b_over_a": best_ratio,
               "bare_forward_tok_s": rate["a"], "covedit_collect_tok_s": rate["b"],
               "per_layer_passes_tok_s": rate.get("c"), "b_over_a": rate["b"] / rate["a"],
               "b_over_c": rate["b"] / rate["c"] if "c" in rate else None}
    if other is not None:
        results["compare"] = {"accumulate": args.compare, "collect_tok_s": rate["b2"], "over_a": rate["b2"] / rate["a"],
                              "over_b": rate["b2"] / rate["b"], "max_relative_difference": compare_error}
    if not args.skip_end_to_end:
        budgets = [int(x) for x in args.memory_budgets.split(",") if x] or [args.tokens]
        if args.tokens not in budgets:
            budgets.append(args.tokens)
        for budget in budgets:
            peak, wall = peak_rss_of_build(budget, args)
            results[f"build_stats_{budget}_peak_rss_mib"] = peak
            results[f"build_stats_{budget}_wall_s"] = wall
        e2e = results[f"build_stats_{args.tokens}_wall_s"]
        results["build_stats_end_to_end_tok_s"] = n_tokens / e2e

    print()
    print("| what | tokens/s | vs bare forward (a) |")
    print("|---|---:|---:|")
    print(f"| (a) bare forward, truncated after layer {max(args.layers)} | {rate['a']:,.0f} | 1.00 |")
    print(f"| (b) covedit collector, {len(args.layers)} layers in one pass | {rate['b']:,.0f} | {rate['b'] / rate['a']:.2f} |")
    if other is not None:
        print(f"| (b') covedit collector, accumulate {args.compare} | {rate['b2']:,.0f} | {rate['b2'] / rate['a']:.2f} |")
    print(f"| (p) limit: bare forward + the exact symmetric products at this machine's matrix-product rate | "
          f"{n_tokens / (times['a'] + times['p']):,.0f} | {best_ratio:.2f} |")
    if "c" in rate:
        print(f"| (c) reference strategy, one pass per layer | {rate['c']:,.0f} | {rate['c'] / rate['a']:.2f} |")
    if "build_stats_end_to_end_tok_s" in results:
        r = results["build_stats_end_to_end_tok_s"]
        print(f"| (d) `build-stats` end to end (incl. model load, tokenising, zarr) | {r:,.0f} | {r / rate['a']:.2f} |")
    if "c" in rate:
        print(f"\n(b)/(c) = {rate['b'] / rate['c']:.2f}x faster than one pass per layer")
    if other is not None:
        print(f"{args.compare} against {args.accumulate}: {rate['b2'] / rate['b']:.2f}x the speed, largest relative "
              f"difference of the sums {compare_error:.2e}")
    for k, v in results.items():
        if k.endswith("peak_rss_mib"):
            print(f"peak RSS of build-stats at {k.split('_')[2]} tokens: {v:,.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
