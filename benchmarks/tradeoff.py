"""Efficacy against drift: each edit method's trade-off curve on one slice of zsRE facts (issue 14).

Every method gets the same targets (MEMIT's default target settings, from the shared per-fact cache) and
edits one batch from the original weights; only its knob moves along the curve:

* MEMIT: λ, the weight of the key covariance C in (λC + KKᵀ)⁻¹ (larger: less drift, less written);
* MEMIT + prompt preservation: the same λ values with μ Σ kkᵀ over the edited prompts' other tokens;
* AlphaEdit: its ridge α, with the published null-space threshold.

Each point records token accuracy (efficacy, paraphrase, neighbourhood), drift on the 42 unrelated prompts
(mean KL, top-1 changed) and, with ``--fluency``, GE. The JSON is rewritten after every point and points
already in it are not run again, so an interrupted run resumes. ``--plot`` draws efficacy and paraphrase
against drift (log scale), one curve per method, from the JSON alone.

    python benchmarks/tradeoff.py --facts 100 --heldout-after 1000 \\
        --json benchmarks/results/tradeoff_heldout100_cpu.json --plot benchmarks/results/tradeoff_heldout100.png

At 1,000 facts one solve costs 20 minutes on a 2-core CPU, so the MEMIT curve there is the λ sweep's own
points (lambda_sweep.py, same targets and slice), taken in with ``--from-sweep`` rather than recomputed:

    python benchmarks/tradeoff.py --facts 1000 --heldout-after 1000 --lams 1500,5000,15000 --mu 0 --alphas "" \\
        --from-sweep benchmarks/results/heldout1000_cpu.json --from-sweep benchmarks/results/heldout1000_lams_cpu.json \\
        --json benchmarks/results/tradeoff_heldout1000_cpu.json --plot benchmarks/results/tradeoff_heldout1000.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import TargetCache, add_slice_arguments, covariances, edit_variants, fact_slice  # noqa: E402


def curves(lams: list[float], mu: float, alphas: list[float]) -> list[tuple[str, str, float, dict]]:
    """(method, label, knob value, keyword arguments of run_memit) for every point, method by method."""
    points = [("MEMIT", f"MEMIT λ {lam:g}", lam, {"lam": lam}) for lam in lams]
    if mu > 0:
        points += [(f"MEMIT + prompts μ {mu:g}", f"MEMIT λ {lam:g} μ {mu:g}", lam, {"lam": lam, "preserve_prompts": mu})
                   for lam in lams]
    points += [("AlphaEdit", f"AlphaEdit α {a:g}", a, {"alphaedit_alpha": a}) for a in alphas]
    return points


def plot(result: dict, path: Path) -> None:
    """Efficacy and paraphrase (token accuracy) against mean drift KL, one curve per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    for ax, metric, name in zip(axes, ("efficacy_acc", "generalization_acc"), ("efficacy", "paraphrase")):
        for method in dict.fromkeys(p["method"] for p in result["points"].values()):
            pts = sorted((p for p in result["points"].values() if p["method"] == method),
                         key=lambda p: p["drift_mean_kl"])
            ax.plot([p["drift_mean_kl"] for p in pts], [p[metric] for p in pts], marker="o", label=method)
            for p in pts:
                ax.annotate(f"{p['knob']:g}", (p["drift_mean_kl"], p[metric]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.axhline(result["unedited"][metric], color="grey", linestyle=":", label="unedited")
        ax.set_xscale("log")
        ax.set_xlabel("drift: mean KL on 42 unrelated prompts (nats)")
        ax.set_ylabel(f"{name} (token accuracy, %)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['model']}: {result['facts']} zsRE facts "
                 f"({'held out' if result['heldout_after'] else 'tuning slice'}, {result['subjects']} subjects), "
                 "one batch, same targets; labels: λ (MEMIT) or α (AlphaEdit)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def points_from_sweep(path: Path, args, result: dict | None) -> dict:
    """A lambda_sweep.py result's plain-MEMIT points (μ 0), as this script would have measured them: the sweep
    must be on the same slice (facts, held-out offset) and have no overrides, so its targets are the ones
    this script takes from the cache."""
    sweep = json.loads(path.read_text())
    if (sweep["facts"], sweep.get("heldout_after", 0)) != (args.facts, args.heldout_after) or sweep.get("overrides"):
        raise SystemExit(f"{path} is {sweep['facts']} facts after {sweep.get('heldout_after', 0)} with overrides "
                         f"{sweep.get('overrides')}; this run is {args.facts} after {args.heldout_after}, none")
    same = ("model", "layers", "target_hparams", "unedited")
    if result is not None and any(result.get(key) != sweep.get(key) for key in same):
        raise SystemExit(f"{path} differs from {args.json} in its model, layers, target settings or unedited scores")
    result = result or {key: sweep[key] for key in ("model", "layers", "facts", "heldout_after", "subjects",
                                                     "target_hparams", "unedited")} | {"points": {}}
    for key, row in sweep["lams"].items():
        lam = float(key.split()[0])
        if "μ" not in key and lam in {float(x) for x in args.lams.split(",") if x}:
            result["points"][f"MEMIT λ {lam:g}"] = {"method": "MEMIT", "knob": lam, "from": str(path), **row}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_slice_arguments(ap, facts=100)
    ap.add_argument("--lams", default="300,1000,1500,5000,15000,50000")
    ap.add_argument("--mu", type=float, default=3.0, help="μ of the prompt-preservation curve (0: no such curve)")
    ap.add_argument("--alphas", default="1,10,100", help="AlphaEdit ridge values (empty: no AlphaEdit curve)")
    ap.add_argument("--fluency", action="store_true")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--from-sweep", type=Path, action="append", default=[],
                    help="a lambda_sweep.py --json result on the same slice: its λ points join the MEMIT curve "
                         "(repeatable)")
    args = ap.parse_args()

    result = json.loads(args.json.read_text()) if args.json.exists() else None
    for sweep in args.from_sweep:
        result = points_from_sweep(sweep, args, result)
    if args.from_sweep:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    lams = [float(x) for x in args.lams.split(",") if x]
    alphas = [float(x) for x in args.alphas.split(",") if x]
    todo = [p for p in curves(lams, args.mu, alphas) if result is None or p[1] not in result["points"]]
    if todo:
        from covedit.pipeline.edit import templates_for
        from covedit.pipeline.evaluate import evaluate_model
        from covedit.pipeline.hparams import load_hparams
        from covedit.pipeline.memit import alphaedit_projectors
        from covedit.pipeline.models import load_model

        loaded = load_model(args.model)
        model_type = loaded.model.config.model_type
        hp = load_hparams("memit", model_type, loaded.num_layers, None, [])
        ahp = load_hparams("alphaedit", model_type, loaded.num_layers, None, [])
        facts = fact_slice(args.data, args.facts, args.heldout_after)
        cache = TargetCache(loaded, hp.layers[-1], hp.target, templates_for(loaded, hp))
        targets = cache.get(facts)
        covs = covariances(loaded, hp.layers)
        before = evaluate_model(loaded, facts, with_fluency=args.fluency, generation=False)
        if result is None:
            result = {"model": loaded.model_id, "layers": hp.layers, "facts": len(facts),
                      "heldout_after": args.heldout_after, "subjects": len({f.subject for f in facts}),
                      "target_hparams": vars(hp.target), "alphaedit_threshold": ahp.null_space_threshold,
                      "unedited": {**before.aggregate, "fluency_ge": (before.fluency or {}).get("ge")}, "points": {}}
        projectors = alphaedit_projectors(covs, ahp.null_space_threshold) if any(k.startswith("AlphaEdit") for _, k, _, _ in todo) else None
        variants, meta = [], {}
        for method, label, knob, kwargs in todo:
            if "alphaedit_alpha" in kwargs:
                kwargs = {"alphaedit": {"P": projectors, "prev_keys": {}, "alpha": kwargs["alphaedit_alpha"]}}
            variants.append((label, kwargs))
            meta[label] = {"method": method, "knob": knob}
        for label, row in edit_variants(loaded, hp, facts, targets, covs, variants, before, args.fluency):
            result["points"][label] = {**meta[label], **row}
            print(f"{label}: efficacy {row['efficacy_acc']:.1f}, paraphrase {row['generalization_acc']:.1f}, "
                  f"neighbourhood {row['specificity_acc']:.1f}, drift {row['drift_mean_kl']:.4f}, "
                  f"top-1 changed {row['top1_changed_pct']:.1f} %", flush=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
