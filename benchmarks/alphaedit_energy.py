"""AlphaEdit's protected space chosen by C's energy instead of an absolute eigenvalue threshold (issue 14, item 5).

The reference keeps Δ inside the span of C's eigenvectors with eigenvalue < 2e-2. On SmolLM2 no eigenvalue
is that small, so that "null space" holds a large share of ordinary tokens' key energy (reported per layer
here as tr(P C) / tr(C)). The alternative (pipeline/memit.py): the smallest directions holding at most a
fraction ε of the energy, optionally with λC kept inside the projected solve.

On one slice of zsRE facts, with the same targets for every variant (MEMIT's default target settings, from
the shared cache), one batch from the original weights: MEMIT at its default λ, AlphaEdit as published,
and AlphaEdit by energy; token accuracy, realised share, drift on the unrelated prompts.

    python benchmarks/alphaedit_energy.py --facts 100 --energies 0.01,0.05 \\
        --json benchmarks/results/alphaedit_energy_tuning100_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import TargetCache, add_slice_arguments, covariances, edit_variants, fact_slice  # noqa: E402
from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.memit import alphaedit_projectors  # noqa: E402
from covedit.pipeline.evaluate import evaluate_model  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402


def energy_share(P: torch.Tensor, C: torch.Tensor) -> float:
    """tr(P C) / tr(C): the share of ordinary keys' mean squared norm inside the space P lets the edit write."""
    C64 = C.double()
    return float(torch.trace(P @ C64) / torch.trace(C64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_slice_arguments(ap, facts=100)
    ap.add_argument("--energies", default="0.01,0.05", help="energy fractions ε of the protected space to try")
    ap.add_argument("--alpha", type=float, default=None, help="AlphaEdit's ridge α (default: its hyperparameters')")
    ap.add_argument("--lams", default="0", help="λ of λC inside the projected solve, tried with each ε")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    loaded = load_model(args.model)
    model_type = loaded.model.config.model_type
    hp = load_hparams("memit", model_type, loaded.num_layers, None, [])
    ahp = load_hparams("alphaedit", model_type, loaded.num_layers, None, [])
    alpha = ahp.alpha if args.alpha is None else args.alpha
    facts = fact_slice(args.data, args.facts, args.heldout_after)
    targets = TargetCache(loaded, hp.layers[-1], hp.target, templates_for(loaded, hp)).get(facts)
    covs = covariances(loaded, hp.layers)
    before = evaluate_model(loaded, facts, with_fluency=False, generation=False)

    spaces = {"threshold": alphaedit_projectors(covs, ahp.null_space_threshold)}
    spaces.update({f"energy {e}": alphaedit_projectors(covs, 0.0, float(e)) for e in args.energies.split(",")})
    result = {"model": loaded.model_id, "layers": hp.layers, "facts": len(facts), "heldout_after": args.heldout_after,
              "subjects": len({f.subject for f in facts}), "alpha": alpha, "threshold": ahp.null_space_threshold,
              "targets": "MEMIT default target settings (shared cache)", "unedited": before.aggregate,
              "spaces": {name: {str(layer): {"dims": int(round(float(torch.trace(P)))),
                                             "energy_share": energy_share(P, covs[layer])} for layer, P in Ps.items()}
                         for name, Ps in spaces.items()},
              "variants": {}}
    for name, info in result["spaces"].items():
        print(name, {layer: f"{v['dims']} dims, {100 * v['energy_share']:.2f} % of energy" for layer, v in info.items()},
              flush=True)

    variants = [(f"MEMIT λ {hp.lam:g}", {"lam": hp.lam})]
    for name, Ps in spaces.items():
        for lam in map(float, args.lams.split(",")):
            if name == "threshold" and lam > 0:
                continue
            label = f"AlphaEdit {name}" + (f" + λC {lam:g}" if lam > 0 else "")
            variants.append((label, {"alphaedit": {"P": Ps, "prev_keys": {}, "alpha": alpha, "lam": lam}}))
    print("| variant | efficacy | paraphrase | neighbourhood | realised | drift KL | top-1 changed |\n|---|---|---|---|---|---|---|\n"
          f"| unedited | {before.aggregate['efficacy_acc']:.1f} | {before.aggregate['generalization_acc']:.1f} | "
          f"{before.aggregate['specificity_acc']:.1f} | | | |", flush=True)
    for label, row in edit_variants(loaded, hp, facts, targets, covs, variants, before, with_fluency=False):
        result["variants"][label] = row
        print(f"| {label} | {row['efficacy_acc']:.1f} | {row['generalization_acc']:.1f} | {row['specificity_acc']:.1f} | "
              f"{row['realised_mean']:.2f} | {row['drift_mean_kl']:.4f} | {row['top1_changed_pct']:.1f} % |", flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
