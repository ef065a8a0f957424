"""Ripple effects (portability): does a MEMIT batch edit carry over to what follows from the edited facts?

The facts are benchmarks/data/ripple_facts.jsonl, hand-written counterfactuals in covedit's schema: 20
landmarks moved to a city of another country ("The Eiffel Tower is located in the city of" → Rome), whose
ripple prompts ask for the country ("... in the country of" → Italy) and, where it is unambiguous, its
official language (→ Italian); 6 cities and 4 mountains moved to another country, whose ripple prompt
asks for the continent ("Lyon is located on the continent of" → Asia). No city that one fact moves is an
answer of another fact's prompts, so the expected answers stay true together after the whole batch. Each
fact has one paraphrase and one or two neighbourhood prompts whose answers must stay ("The
Louvre is located in the city of" → Paris). Ripple prompts are not edited: they measure what the model
infers from the edit.

All 30 facts are edited in one batch with MEMIT's default hyperparameters (``--set`` overrides them), from
the shared per-fact target cache (benchmarks.common.memit_target_cache: a rerun optimises nothing), with the
statistics of the default folder. Reported before and after: efficacy, paraphrase and neighbourhood in all
three families (success P(new) > P(true), teacher-forced token accuracy, greedy generation naming the target;
the chat reply where the tokenizer has a chat template), ripple token accuracy and ripple generation, drift on
the 42 unrelated prompts and fluency (GE; ``--no-fluency`` skips it), then each ripple prompt's greedy
continuation after the edit.

    python benchmarks/ripple.py --json benchmarks/results/ripple_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import ROOT, add_override_argument, covariances, memit_target_cache  # noqa: E402
from covedit.pipeline.edit import key_weights_for, templates_for  # noqa: E402
from covedit.pipeline.evaluate import evaluate_model, says  # noqa: E402
from covedit.pipeline.facts import read_facts  # noqa: E402
from covedit.pipeline.hparams import load_hparams, to_dict  # noqa: E402
from covedit.pipeline.memit import run_memit  # noqa: E402
from covedit.pipeline.models import cache_root  # noqa: E402
from covedit.pipeline.report import build_report, render_text  # noqa: E402

RIPPLE_FACTS = ROOT / "benchmarks" / "data" / "ripple_facts.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=Path, default=RIPPLE_FACTS)
    add_override_argument(ap)
    ap.add_argument("--no-fluency", action="store_true", help="skip the fluency generations")
    ap.add_argument("--json", type=Path, help="also write every number (and each fact's texts) here")
    args = ap.parse_args()

    t_start = time.perf_counter()
    cache = memit_target_cache(args.model, args.overrides)
    loaded = cache.loaded
    facts = read_facts(args.facts, tokenizer=loaded.tokenizer)
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, args.overrides)
    covs = covariances(loaded, list(hp.layers))
    fluency = not args.no_fluency

    t = time.perf_counter()
    before = evaluate_model(loaded, facts, with_fluency=fluency, reference_cache=cache_root() / "eval")
    eval_before_s = time.perf_counter() - t
    missing = len(cache.missing(facts))
    t = time.perf_counter()
    targets = cache.get(facts)
    targets_s = time.perf_counter() - t
    t = time.perf_counter()
    out = run_memit(loaded, facts, list(hp.layers), covs, hp.lam, hp.target, templates_for(loaded, hp),
                    time.perf_counter, targets=targets, keys_from=hp.keys_from, key_weights=key_weights_for(loaded, hp),
                    preserve_prompts=hp.preserve_prompts, preserve_relation=hp.preserve_relation,
                    relation_subjects=hp.relation_subjects)
    solve_s = time.perf_counter() - t
    t = time.perf_counter()
    after = evaluate_model(loaded, facts, with_fluency=fluency)
    eval_after_s = time.perf_counter() - t

    data = build_report(after, before, labels=("unedited", "edited"))
    d = data["drift"]
    n_ripple = sum(len(f.ripple) for f in facts)
    print(f"MEMIT on {len(facts)} facts in one batch ({args.facts.name}, {n_ripple} ripple prompts), {loaded.model_id}, "
          f"layers {list(hp.layers)}, λ {hp.lam:g}; targets {targets_s:.1f} s ({missing} optimised, the rest cached), "
          f"solve {solve_s:.1f} s\n")
    print(render_text(data))
    print("\nripple prompts after the edit (greedy continuation; * names the expected answer):")
    for f, row in zip(facts, after.per_fact):
        for r, text in zip(f.ripple, (row.get("generations") or {}).get("ripple") or []):
            mark = "*" if says(text, r.target) else " "
            print(f"  {mark} {r.prompt} → {r.target!r}: {' '.join(text.split())!r}")

    if args.json:
        result = {
            "model": loaded.model_id, "facts_file": str(args.facts), "n_facts": len(facts), "n_ripple_prompts": n_ripple,
            "method": "memit", "hparams": to_dict(hp),
            "before": before.aggregate, "after": after.aggregate,
            "drift": {k: v for k, v in d.items() if k != "per_prompt"},
            "fluency_ge": {"before": (before.fluency or {}).get("ge"), "after": (after.fluency or {}).get("ge")},
            "realised_mean": sum(out.target_info["realised"]) / len(facts),
            "per_fact": [{"id": b["id"], "before": b, "after": a} for b, a in zip(before.per_fact, after.per_fact)],
            "timings": {"targets_s": targets_s, "targets_optimised": missing, "solve_s": solve_s,
                        "eval_before_s": eval_before_s, "eval_after_s": eval_after_s,
                        "total_s": time.perf_counter() - t_start},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
