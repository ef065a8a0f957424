"""How fast the targets' Adam converges: per-pass loss of every fact under a few step rules, same facts.

Each rule is ``LR:SCHEDULE:PASSES[:FIRST]``: Adam's learning rate, ``const`` (the reference), ``lin`` (linear
decay to 0 over the updates) or ``cos`` (cosine decay), the forward passes allowed (``target.steps``), and
optionally ``target.first_step`` (the first update straight out to that fraction of the clamp radius). The
first N distinct zsRE facts (a tuning slice: the held-out check is lambda_sweep.py --heldout-after), MEMIT's
default target settings otherwise. Reported per rule: seconds, passes per fact, and the NLL the targets end
at (mean, median, how many above 0.5 and 0.1); the JSON holds every fact's loss at every pass.

    python benchmarks/step_rule.py --facts 40 0.5:const:25 2:const:25 \\
        --json benchmarks/results/step_rule_lr_cpu.json
    python benchmarks/step_rule.py --facts 40 2:const:12 4:lin:12 4:cos:12 2:lin:12 \\
        --json benchmarks/results/step_rule_schedules_cpu.json
    python benchmarks/step_rule.py --model gemma3-270m --facts 40 0.5:const:25 --set target.clamp_norm_factor=4 \\
        --json benchmarks/results/gemma3_step_rule_clamp4_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import DEFAULT_DATA, add_override_argument, zsre_facts  # noqa: E402
from covedit.pipeline import targets as T  # noqa: E402
from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402


def scheduled_adam(schedule: str, updates: int):
    """An Adam whose learning rate follows ``schedule`` over ``updates`` steps (const: the reference)."""
    shape = {"const": lambda k: 1.0, "lin": lambda k: 1 - k / updates,
             "cos": lambda k: 0.5 * (1 + math.cos(math.pi * k / updates))}[schedule]

    class ScheduledAdam(torch.optim.Adam):
        def __init__(self, params, lr):
            super().__init__(params, lr=lr)
            self.base_lr, self.k = lr, 0

        def step(self, closure=None):
            for group in self.param_groups:
                group["lr"] = self.base_lr * max(shape(self.k), 0.0)
            self.k += 1
            return super().step(closure)

    return ScheduledAdam


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rules", nargs="+", help="LR:SCHEDULE:PASSES[:FIRST], e.g. 0.5:const:25 (FIRST: target.first_step)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--facts", type=int, default=40)
    add_override_argument(ap)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    loaded = load_model(args.model)
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, args.overrides)
    facts = zsre_facts(args.data, args.facts)
    out = {"model": loaded.model_id, "facts": len(facts), "layer": hp.layers[-1], "overrides": args.overrides,
           "rules": {}}
    for rule in args.rules:
        lr, schedule, passes, *first = rule.split(":")
        target_hp = dataclasses.replace(hp.target, lr=float(lr), steps=int(passes))
        if first:
            target_hp = dataclasses.replace(target_hp, first_step=float(first[0]))
        trace: list = []
        adam = torch.optim.Adam
        torch.optim.Adam = scheduled_adam(schedule, int(passes) - 1)  # what compute_targets constructs
        try:
            t0 = time.perf_counter()
            r = T.compute_targets(loaded, facts, hp.layers[-1], target_hp, templates_for(loaded, hp), trace=trace)
            seconds = time.perf_counter() - t0
        finally:
            torch.optim.Adam = adam
        nll = r.nll_after
        row = {"seconds": seconds, "passes_mean": float(r.steps_taken.float().mean()) + 1,
               "nll_mean": float(nll.mean()), "nll_median": float(nll.median()),
               "above_0.5": int((nll > 0.5).sum()), "above_0.1": int((nll > 0.1).sum()),
               "delta_norm": r.delta.norm(dim=1).tolist(), "h_norm": r.h.norm(dim=1).tolist(),
               "steps": r.steps_taken.tolist(), "nll_after": nll.tolist(), "trace": trace}
        out["rules"][rule] = row
        print(f"{rule:14s} {seconds:6.1f} s, {row['passes_mean']:.1f} passes, NLL mean {row['nll_mean']:.3f} "
              f"median {row['nll_median']:.3f}, > 0.5: {row['above_0.5']}, > 0.1: {row['above_0.1']}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
