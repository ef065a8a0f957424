"""Target optimisation against its physical limit and against the ways it used to be done, in one run.

On the same zsRE facts, the embedded model's default MEMIT target settings, at the top edited layer:

(a) the physical limit: one forward and backward over only what δ can change (blocks above the edit
    layer, the suffix positions from the subject's last token, the output head at the columns a loss
    reads), timed per chunk and multiplied by the forward passes each fact actually took;
(b) covedit's compute_targets (prefix cached, lower blocks skipped), all facts batched;
(b0) covedit's target code before that (benchmarks/baseline_targets.py, commit c688309), batched;
(c) the reference procedure: one fact at a time, the full forward every step (b0 called per fact).

Ratios first: (b)/(a) (goal ≤ 1.5), (b0)/(b) (goal ≥ 5), (c)/(b) (goal ≥ 10); then seconds and seconds per
fact. Every variant must find the same δ (max |Δz| is reported) with the same steps.

    python benchmarks/bench_targets.py --facts 40 --json benchmarks/results/bench_targets_cpu.json
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

from benchmarks import baseline_targets  # noqa: E402
from benchmarks.common import DEFAULT_DATA, zsre_facts  # noqa: E402
from covedit.pipeline import targets as T  # noqa: E402
from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402
from covedit.pipeline.tokens import pad_id  # noqa: E402


def physical_limit(loaded, facts, layer, hp, templates, steps_taken: torch.Tensor, max_rows: int = 128) -> float:
    """(a): per chunk of compute_targets, one forward + backward of the suffix-only path (every row), divided
    over its facts and multiplied by each fact's forward passes (updates + the pass that stopped or measured)."""
    fact_rows = T._fact_rows(loaded.tokenizer, [[f] for f in facts], templates)
    per_fact = len(templates) + 1
    runner = T._Runner(loaded, layer, pad_id(loaded.tokenizer))
    total = 0.0
    for chunk in T._chunks(fact_rows, max_rows, torch.device("cpu")):  # as compute_targets
        runner.prepare(chunk)
        rows = torch.arange(len(chunk.suffixes))
        delta = torch.zeros(len(chunk.facts), loaded.d_model, requires_grad=True)
        local = torch.arange(len(chunk.facts)).repeat_interleave(per_fact)
        t0 = time.perf_counter()
        logits = runner.suffix(chunk, rows, delta[local])
        nll, kl = T._losses(logits, chunk, rows, local, len(chunk.facts), torch.device("cpu"))
        (nll.sum() + kl.exp().sum()).backward()
        seconds = time.perf_counter() - t0
        passes = (steps_taken[chunk.facts] + 1).clamp(max=hp.steps).float()
        total += float(seconds / len(chunk.facts) * passes.sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--facts", type=int, default=40)
    ap.add_argument("--skip-reference", action="store_true", help="leave out (b0) and (c), the slow ones")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    loaded = load_model(args.model)
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, [])
    layer, templates = hp.layers[-1], templates_for(loaded, hp)
    facts = zsre_facts(args.data, args.facts)
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}", "model": loaded.model_id, "layer": layer,
              "facts": len(facts), "templates": len(templates), "target_hparams": vars(hp.target)}

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    # merge=False: the previous code optimised every record on its own, so the same δ means the same facts
    new, result["b_covedit_s"] = timed(lambda: T.compute_targets(loaded, facts, layer, hp.target, templates,
                                                                 merge=False))
    result["steps_mean"] = float(new.steps_taken.float().mean())
    result["a_physical_limit_s"] = physical_limit(loaded, facts, layer, hp.target, templates, new.steps_taken)
    print(f"(b) covedit {result['b_covedit_s']:.1f} s, (a) limit {result['a_physical_limit_s']:.1f} s", flush=True)
    if not args.skip_reference:
        old, result["b0_before_s"] = timed(lambda: baseline_targets.compute_targets(loaded, facts, layer, hp.target, templates))
        print(f"(b0) before {result['b0_before_s']:.1f} s", flush=True)
        singles, result["c_reference_s"] = timed(
            lambda: [baseline_targets.compute_targets(loaded, [f], layer, hp.target, templates) for f in facts])
        print(f"(c) one at a time {result['c_reference_s']:.1f} s", flush=True)
        result["max_abs_dz_vs_before"] = float((new.z - old.z).abs().max())
        result["max_abs_dz_vs_one_at_a_time"] = float((new.z - torch.cat([s.z for s in singles])).abs().max())
        result["max_abs_z"] = float(new.z.abs().max())
        result["same_steps"] = bool(torch.equal(new.steps_taken, old.steps_taken))
        result["ratios"] = {"b_over_a": result["b_covedit_s"] / result["a_physical_limit_s"],
                            "before_over_b": result["b0_before_s"] / result["b_covedit_s"],
                            "reference_over_b": result["c_reference_s"] / result["b_covedit_s"]}
    result["seconds_per_fact"] = {k[:-2]: v / len(facts) for k, v in result.items() if k.endswith("_s")}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
