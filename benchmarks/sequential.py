"""Sequential editing: K batches of facts, one after another, each edit on the model the last one left (issue 14).

The literature's editors collapse in sequences (norm growth, then gibberish), and a batch editor's value is
whether the first batch survives the ninth. Here each method edits ``--batches`` batches of ``--batch-size``
facts of one zsRE slice (held out with ``--heldout-after``) in order, from the original weights:

* MEMIT: each batch solved alone with its own λC (the reference has nothing that protects earlier batches),
  plus the model's default ``preserve_prompts`` μ Σ k kᵀ of the batch's own prompts' other tokens (0.1 on
  SmolLM2 since 2026-12-01; the runs in results/ before that date have none: their JSON lacks
  ``memit_preserve_prompts``);
* MEMIT with carried keys (``memit_carry``): every earlier batch's keys added to λC with weight
  ``preserve_earlier`` (1, a new key's own, unless ``--set preserve_earlier=W``; run_memit's
  ``protected_keys``), so each solve also asks the earlier edits to stay where they are;
* AlphaEdit: the null-space projected solve, every earlier batch's keys carried in ``C_prev`` (as
  ``batch-edit --base`` does with carried_keys.safetensors).

Targets come from the shared per-fact cache, optimised on the *unedited* model (what the sweeps use; facts
of one subject and answer share one δ across the whole slice, even when they fall in two batches). A real
sequence (``batch-edit --base``) re-optimises each batch's targets on the model as it then is; the residual
each layer must write is still measured on the current model here, so only δ's starting point differs.

After each batch: the first batch's efficacy and paraphrase accuracy (goal: first batch ≥ 80 % after the
tenth), the batch just written, drift on the 42 unrelated prompts against the original model, and the largest
edited weight's norm growth ‖W‖/‖W₀‖; after the last batch all facts (both metric families) and, with
``--fluency``, GE (teacher-forced families only: generating 1,000 facts' answers after every batch
would cost more than the edits). The JSON is rewritten after each method; a method already complete in it is not
run again.

    python benchmarks/sequential.py --heldout-after 1000 --batches 10 --batch-size 100 --fluency \\
        --json benchmarks/results/sequential_10x100_heldout_cpu.json

``--set KEY=VALUE`` overrides MEMIT's hyperparameters for every method that uses them (the JSON records
them); use one JSON per setting.
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

from benchmarks.common import TargetCache, add_override_argument, add_slice_arguments, covariances, fact_slice  # noqa: E402

METHODS = ("memit", "memit_carry", "alphaedit")


def brief(agg: dict) -> dict:
    return {k: agg.get(k) for k in ("n_facts", "efficacy_acc", "generalization_acc", "specificity_acc",
                                    "efficacy_success", "generalization_success")}


def run_sequence(loaded, method: str, batches: list[list], targets: list, covs: dict, hp, ahp, before, with_fluency: bool,
                 report) -> dict:
    """Edit ``batches`` in order from the original weights; ``report(row)`` after each batch. Weights are put
    back afterwards."""
    from covedit.pipeline.edit import templates_for
    from covedit.pipeline.evaluate import drift, evaluate_model, fact_metrics, aggregate, next_token_logprobs
    from covedit.pipeline.memit import alphaedit_projectors, protected_rows, run_memit

    templates = templates_for(loaded, hp)
    originals = {layer: loaded.down_weight(layer).detach().clone() for layer in hp.layers}
    norms0 = {layer: float(W.double().norm()) for layer, W in originals.items()}
    carried: dict = {}  # earlier batches' keys per layer (AlphaEdit's C_prev, or MEMIT's protected_keys)
    alphaedit = None
    if method == "alphaedit":
        alphaedit = {"P": alphaedit_projectors(covs, ahp.null_space_threshold, ahp.null_space_energy),
                     "prev_keys": carried, "alpha": ahp.alpha, "lam": ahp.lam}
    rows = []
    try:
        for b, (facts, tgt) in enumerate(zip(batches, targets), 1):
            t0 = time.perf_counter()
            out = run_memit(loaded, facts, hp.layers, covs, hp.lam, hp.target, templates, time.perf_counter,
                            targets=tgt, alphaedit=alphaedit,
                            protected_keys=protected_rows((carried, hp.preserve_earlier)) if method == "memit_carry" else None,
                            preserve_prompts=0.0 if method == "alphaedit" else hp.preserve_prompts)
            solve_s = time.perf_counter() - t0
            for layer, k in out.keys.items():
                carried[layer] = k if layer not in carried else torch.cat([carried[layer], k])
            first = aggregate(fact_metrics(loaded, batches[0], generation=False))
            this = aggregate(fact_metrics(loaded, facts, generation=False)) if b > 1 else first
            d = drift(before.next_tokens, next_token_logprobs(loaded, before.next_tokens.prompts))
            growth = max(float(loaded.down_weight(layer).detach().double().norm()) / norms0[layer]
                         for layer in hp.layers)
            row = {"batch": b, "solve_s": solve_s, "first_batch": brief(first), "this_batch": brief(this),
                   "drift_mean_kl": d["mean_kl"], "top1_changed_pct": d["top1_changed_pct"], "norm_growth": growth}
            rows.append(row)
            report(row)
        end = evaluate_model(loaded, [f for batch in batches for f in batch], with_fluency=with_fluency,
                             generation=False)
        return {"batches": rows, "all_facts": end.aggregate,
                "fluency_ge": (end.fluency or {}).get("ge")}
    finally:
        with torch.no_grad():
            for layer, W in originals.items():
                loaded.down_weight(layer).copy_(W)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_slice_arguments(ap, facts=0)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--fluency", action="store_true")
    ap.add_argument("--json", type=Path, required=True)
    add_override_argument(ap)
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in methods) or args.batches < 1 or args.batch_size < 1:
        raise SystemExit(f"--methods takes {', '.join(METHODS)}; --batches and --batch-size must be >= 1")
    result = json.loads(args.json.read_text()) if args.json.exists() else None
    todo = [m for m in methods if result is None or m not in result["methods"]]
    if not todo:
        print(f"{args.json}: every method is done")
        return

    from covedit.pipeline.edit import templates_for
    from covedit.pipeline.evaluate import evaluate_model
    from covedit.pipeline.hparams import load_hparams
    from covedit.pipeline.models import load_model

    loaded = load_model(args.model)
    model_type = loaded.model.config.model_type
    hp = load_hparams("memit", model_type, loaded.num_layers, None, args.overrides)
    if result is not None:
        recorded = (result.get("memit_lam"), result.get("memit_preserve_prompts", 0.0), result.get("memit_preserve_earlier", 1.0))
        if recorded != (hp.lam, hp.preserve_prompts, hp.preserve_earlier):
            raise SystemExit(f"{args.json} holds runs with MEMIT λ, μ, preserve_earlier = {recorded}, not "
                             f"{(hp.lam, hp.preserve_prompts, hp.preserve_earlier)}: use another --json for this setting")
    ahp = load_hparams("alphaedit", model_type, loaded.num_layers, None, [])
    n = args.facts or args.batches * args.batch_size
    facts = fact_slice(args.data, n, args.heldout_after)
    batches = [facts[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.batches)]
    # keyed as the sweeps key them (facts merged within the whole slice), so a slice's targets are reused
    everything = TargetCache(loaded, hp.layers[-1], hp.target, templates_for(loaded, hp)).get(facts)
    targets = [everything.select(list(range(i * args.batch_size, (i + 1) * args.batch_size)))
               for i in range(args.batches)]
    covs = covariances(loaded, hp.layers)
    before = evaluate_model(loaded, facts, with_fluency=args.fluency, generation=False)
    if result is None:
        result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                  "model": loaded.model_id, "layers": hp.layers, "batches": args.batches, "batch_size": args.batch_size,
                  "heldout_after": args.heldout_after, "subjects": len({f.subject for f in facts}),
                  "overrides": args.overrides, "memit_lam": hp.lam, "memit_preserve_prompts": hp.preserve_prompts,
                  "memit_preserve_earlier": hp.preserve_earlier, "alphaedit": {"alpha": ahp.alpha, "threshold": ahp.null_space_threshold,
                                                     "energy": ahp.null_space_energy, "lam": ahp.lam},
                  "unedited": {**before.aggregate, "fluency_ge": (before.fluency or {}).get("ge")},
                  "unedited_first_batch": brief(evaluate_model(loaded, batches[0], unrelated=False, with_fluency=False,
                                                                   generation=False).aggregate),
                  "methods": {}}
    for method in todo:
        def report(row, method=method):
            print(f"{method} batch {row['batch']}: first batch efficacy {row['first_batch']['efficacy_acc']:.1f} "
                  f"paraphrase {row['first_batch']['generalization_acc']:.1f}; this batch efficacy "
                  f"{row['this_batch']['efficacy_acc']:.1f}; drift {row['drift_mean_kl']:.4f} "
                  f"(top-1 changed {row['top1_changed_pct']:.1f} %); norm growth {row['norm_growth']:.4f}", flush=True)
        result["methods"][method] = run_sequence(loaded, method, batches, targets, covs, hp, ahp, before,
                                                 args.fluency, report)
        r = result["methods"][method]
        print(f"{method}, all {len(facts)} facts after batch {args.batches}: efficacy {r['all_facts']['efficacy_acc']:.1f}, "
              f"paraphrase {r['all_facts']['generalization_acc']:.1f}, neighbourhood "
              f"{r['all_facts']['specificity_acc']:.1f}, GE {r['fluency_ge']}", flush=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
