"""How the cached targets of a zsRE slice went under a step rule: updates per fact, the NLL they end at, and
‖z − h‖ / ‖h‖ (benchmarks.common.target_summary). Reads the shared target cache, optimising only the
targets it lacks, so on a warm cache it runs in seconds.

    python benchmarks/target_summary.py --facts 100 --json benchmarks/results/target_summary_loss_rule_tuning100_cpu.json
    python benchmarks/target_summary.py --facts 100 --set target.stop_when_top1=true \\
        --json benchmarks/results/target_summary_mpes_tuning100_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import (TargetCache, add_override_argument, add_slice_arguments, fact_slice,  # noqa: E402
                               target_summary)
from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_slice_arguments(ap, facts=100)
    add_override_argument(ap)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    loaded = load_model(args.model)
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, args.overrides)
    facts = fact_slice(args.data, args.facts, args.heldout_after)
    targets = TargetCache(loaded, hp.layers[-1], hp.target, templates_for(loaded, hp)).get(facts)
    result = {"model": loaded.model_id, "facts": len(facts), "heldout_after": args.heldout_after,
              "overrides": args.overrides, "target_hparams": vars(hp.target), **target_summary(targets)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
