"""Speed and quality of the edit stage on the embedded model with real zsRE facts.

Measured in one run:

1. Target optimisation for the same facts, batched (all facts share each forward pass) against one fact
   at a time (the reference code's way): wall time and how well the targets are reached.
2. MEMIT in one batch at several sizes (default 10, 100, 1000): seconds per edit, and the zsRE metrics
   (teacher-forced top-1 token accuracy) before and after: efficacy on the question, generalisation on
   its paraphrase, specificity on an unrelated Natural Questions prompt (protocol: one batch, then
   measure; the model is reloaded for every size).

    python benchmarks/bench_edit.py --stats-dir ~/.cache/covedit/stats --sizes 10,100 --compare 100
    python benchmarks/bench_edit.py --set lam=150 --sizes 1000      # a hyperparameter variant
    python benchmarks/warm_targets.py --facts 1000 && \
        python benchmarks/bench_edit.py --sizes 1000 --compare 0 --cached-targets

``--cached-targets`` takes the targets from benchmarks.common.TargetCache (filled by warm_targets.py in
resumable batches of 50, each batch timed) instead of optimising them inside the edit: on a 2-core CPU
1,000 targets take about 3 hours, longer than one sitting. The target time reported is then the sum of
those measured batch times (batching does not change the cost on CPU: see the batched vs one-at-a-time
comparison), and seconds per edit = (that + the rest of the edit, measured here) / facts.

Statistics must exist (``covedit build-stats``) or pass ``--build-stats-tokens N``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from covedit.cli import stats_builder  # noqa: E402
from covedit.pipeline.batch_edit import BatchEditConfig, run_batch_edit  # noqa: E402
from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402
from covedit.pipeline.targets import compute_targets, fact_groups  # noqa: E402

from benchmarks.common import (DEFAULT_DATA, TargetCache, add_override_argument, memit_target_cache,  # noqa: E402
                               write_facts, zsre_facts)

def compare_target_optimisation(model: str, facts: list, overrides: list[str]) -> dict:
    loaded = load_model(model)
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, overrides)
    templates = templates_for(loaded, hp)
    layer = hp.layers[-1]
    t = time.perf_counter()
    batched = compute_targets(loaded, facts, layer, hp.target, templates, merge=False)  # as one at a time
    t_batched = time.perf_counter() - t
    if all(len(g) == 1 for g in fact_groups(facts)):  # then they are the merged targets too: keep them
        TargetCache(loaded, layer, hp.target, templates).put(facts, batched)  # the locality study reuses them
    t = time.perf_counter()
    singles = [compute_targets(loaded, [f], layer, hp.target, templates) for f in facts]
    t_single = time.perf_counter() - t
    nll_single = torch.cat([s.nll_after for s in singles])
    z_single = torch.cat([s.z for s in singles])

    def reached(nll):  # share of facts whose target the optimised δ makes likely (P > 0.5 per token)
        return 100 * float((nll < 0.693).float().mean())

    return {"facts": len(facts), "layer": layer, "batched_s": t_batched, "one_at_a_time_s": t_single,
            "speedup": t_single / t_batched,
            "batched_mean_p_target": float(torch.exp(-batched.nll_after).mean()),
            "one_at_a_time_mean_p_target": float(torch.exp(-nll_single).mean()),
            "batched_reached_pct": reached(batched.nll_after), "one_at_a_time_reached_pct": reached(nll_single),
            "max_z_difference_rel": float(((batched.z - z_single).norm(dim=1) / z_single.norm(dim=1)).max())}


def edit_at_size(model: str, facts: list, stats_dir: Path | None, overrides: list[str], tokens: int | None,
                 cache: TargetCache | None = None) -> dict:
    targets, targets_s = None, None
    if cache is not None:
        cache.fill(facts)
        targets, targets_s = cache.get(facts), cache.seconds(facts)
        if targets_s is None:
            print("some cached targets were stored without their time, so seconds per edit is not reported: give "
                  "them the time of the run that made them (warm_targets.py --seconds-from)", flush=True)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "facts.jsonl"
        write_facts(facts, path)
        result = run_batch_edit(BatchEditConfig(
            facts=path, output=Path(d) / "out", model=model, stats_dir=stats_dir, overrides=overrides, targets=targets,
            build_missing_stats=stats_builder("cpu", None, tokens) if tokens is not None else None))
    ev, t = result.evaluation, result.timings
    # Cached: this run's edit holds no target optimisation, their recorded time is added (unknown: no time).
    edit_s = t.edit_s if cache is None else None if targets_s is None else t.edit_s + targets_s
    return {"facts": len(facts), "seconds_per_edit": edit_s and edit_s / len(facts), "edit_s": edit_s,
            "targets_s": targets_s if cache is not None else t.targets_s,
            "targets_from_cache": cache is not None, "solve_s": t.solve_s, "eval_s": t.eval_s,
            "targets_reached_pct": 100 * sum(x < 0.693 for x in result.targets["nll_after"]) / len(facts),
            "realised_mean": sum(result.targets["realised"]) / len(facts),
            "eval_over_edit": edit_s and t.eval_s / edit_s,
            "drift_mean_kl": ev["drift"]["mean_kl"], "drift_top1_changed_pct": ev["drift"]["top1_changed_pct"],
            "ge_before": ev["fluency"]["before"]["ge"], "ge_after": ev["fluency"]["after"]["ge"],
            "before": ev["before"], "after": ev["after"], "hparams": result.manifest["hparams"],
            "stats_tokens": (result.manifest["stats"] or {}).get("key", {}).get("tokens")}


def num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--stats-dir", type=Path)
    ap.add_argument("--build-stats-tokens", type=int)
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--compare", type=int, default=100, help="facts for batched vs one-at-a-time (0 to skip)")
    add_override_argument(ap)
    ap.add_argument("--cached-targets", action="store_true",
                    help="targets from the shared per-fact cache (timed when optimised), see above")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    results: dict = {"model": args.model, "overrides": args.overrides, "threads": torch.get_num_threads()}
    if args.compare:
        c = compare_target_optimisation(args.model, zsre_facts(args.data, args.compare), args.overrides)
        results["targets"] = c
        print(f"target optimisation, {c['facts']} facts at layer {c['layer']}: batched {c['batched_s']:.1f} s, "
              f"one at a time {c['one_at_a_time_s']:.1f} s ({c['speedup']:.1f}x); mean P(target) "
              f"{c['batched_mean_p_target']:.3f} vs {c['one_at_a_time_mean_p_target']:.3f}; reached "
              f"{c['batched_reached_pct']:.1f} % vs {c['one_at_a_time_reached_pct']:.1f} %", flush=True)
    results["sizes"] = []
    cache = memit_target_cache(args.model, args.overrides) if args.cached_targets else None
    for n in [int(x) for x in args.sizes.split(",") if x]:
        r = edit_at_size(args.model, zsre_facts(args.data, n), args.stats_dir, args.overrides, args.build_stats_tokens,
                         cache)
        results["sizes"].append(r)
        b, a = r["before"], r["after"]
        print(f"MEMIT {n} facts: {num(r['seconds_per_edit'], '.2f')} s/edit (targets {num(r['targets_s'], '.0f')} s, "
              f"solve {r['solve_s']:.0f} s, eval {r['eval_s']:.0f} s); token accuracy before -> after: efficacy "
              f"{b['efficacy_acc']:.1f} -> {a['efficacy_acc']:.1f}, paraphrase {b['generalization_acc']:.1f} -> "
              f"{a['generalization_acc']:.1f}, neighbourhood {b['specificity_acc']:.1f} -> {a['specificity_acc']:.1f}; "
              f"evaluation costs {num(r['eval_over_edit'], '.3f')}x the edit; drift KL {r['drift_mean_kl']:.4f}, "
              f"GE {r['ge_before']:.0f} -> {r['ge_after']:.0f}; targets reached (P > 0.5 per token) "
              f"{r['targets_reached_pct']:.0f} %, share of the way to them written {r['realised_mean']:.2f}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
