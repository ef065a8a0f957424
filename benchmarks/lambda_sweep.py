"""MEMIT's λ on a tuning slice of zsRE facts, then the chosen λ on a held-out slice with other subjects.

Targets come from the shared per-fact cache (benchmarks.common.TargetCache), so every λ writes the same
targets and only the solve and the evaluation run per λ. Reported per λ: zsRE token accuracy (efficacy,
paraphrase, neighbourhood), the share of the way to each target the weights went (realised), and drift on
the 42 unrelated prompts; fluency only with ``--fluency`` (greedy generations cost more than the rest on a
262k vocabulary).

    # tuning: the first 50 facts; held-out: 50 facts after them whose subjects are not among those 50
    python benchmarks/lambda_sweep.py --model gemma3-270m --facts 50 --lams 15000,3000,1000,300 \\
        --json benchmarks/results/gemma3_lambda_tuning_cpu.json
    python benchmarks/lambda_sweep.py --model gemma3-270m --facts 50 --heldout-after 50 --lams 15000,1000 \\
        --fluency --json benchmarks/results/gemma3_lambda_heldout_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import (TargetCache, add_override_argument, add_slice_arguments, covariances,  # noqa: E402
                               fact_slice, fluency_fields, memit_variants, target_summary)
from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.evaluate import evaluate_model  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_slice_arguments(ap, facts=50)
    ap.add_argument("--lams", default="15000,3000,1000,300")
    ap.add_argument("--mus", default="0", help="preserve_prompts values μ to try with each λ (0: reference MEMIT)")
    ap.add_argument("--fluency", action="store_true")
    add_override_argument(ap)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    loaded = load_model(args.model)
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, args.overrides)
    templates = templates_for(loaded, hp)
    facts = fact_slice(args.data, args.facts, args.heldout_after)
    cache = TargetCache(loaded, hp.layers[-1], hp.target, templates)
    targets = cache.get(facts)
    covs = covariances(loaded, hp.layers)
    before = evaluate_model(loaded, facts, with_fluency=args.fluency, generation=False)
    result = {"model": loaded.model_id, "layers": hp.layers, "facts": len(facts), "heldout_after": args.heldout_after,
              "subjects": len({f.subject for f in facts}),
              "overrides": args.overrides, "target_hparams": vars(hp.target), "targets_s": cache.seconds(facts),
              **target_summary(targets),
              "unedited": {**before.aggregate, **fluency_fields(before)}, "lams": {}}
    print(f"| λ | efficacy | paraphrase | neighbourhood | realised | drift KL | top-1 changed | GE |\n|---|---|---|---|---|---|---|---|\n"
          f"| unedited | {before.aggregate['efficacy_acc']:.1f} | {before.aggregate['generalization_acc']:.1f} | "
          f"{before.aggregate['specificity_acc']:.1f} | | | | {result['unedited']['fluency_ge'] or ''} |", flush=True)
    grid = [(float(lam), float(mu)) for lam in args.lams.split(",") for mu in args.mus.split(",")]
    for label, row in memit_variants(loaded, hp, facts, targets, covs, grid, before, args.fluency):
        result["lams"][label] = row
        print(f"| {label} | {row['efficacy_acc']:.1f} | {row['generalization_acc']:.1f} | {row['specificity_acc']:.1f} | "
              f"{row['realised_mean']:.2f} | {row['drift_mean_kl']:.4f} | {row['top1_changed_pct']:.1f} % | "
              f"{'' if row['fluency_ge'] is None else round(row['fluency_ge'])} |", flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
