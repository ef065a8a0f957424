"""Correcting the model's real errors: probe facts whose true answers are known, edit the ones the model gets
wrong to their true answers (MEMIT with the model's defaults), and check that what it already knew stays right.

Facts with known true answers:

* zsRE: ``--zsre`` facts of the sample after the first ``--heldout-after`` (1,000: the slice the defaults were
  tuned on), whose subjects are none of those, as benchmarks.common.fact_slice takes them;
  zsRE's ``answers`` are true answers;
* world facts: every answer of ``benchmarks/data/world_facts.json`` that is not ambiguous (capitals,
  continents, official languages of countries; cities' countries), as relation_locality.world_facts builds
  them (``--world N``: a seeded sample of N).

What the model gets wrong is ``covedit probe``'s rule (pipeline/correct.py): not every token of the true
answer is its teacher-forced top-1 prediction. The errors become edits to the true answer, exactly as
``covedit probe --wrong-only --write FILE`` writes them, in a seeded order, and are written as MEMIT's
defaults write them: one batch, or (``--batches K``) K sequential batches, each applied to the model the
previous ones left with the earlier batches' keys carried as ``batch-edit --base`` carries them (MEMIT's
``preserve_earlier``; ``--set preserve_earlier=0`` solves each batch alone). ``--keep-known W`` also puts the
keys of a seeded half of the facts the model already knows into that term (weight W) from the first batch:
what a user can do with ``probe``'s right answers; the other half says whether the protection reaches
known facts the edit was not told about. Targets come from the shared per-fact cache (benchmarks.common.TargetCache), optimised
on the unedited model, so reruns and other batchings reuse them; ``--fresh-targets`` optimises the targets of
each batch after the first on the model as edited so far, as ``batch-edit --base`` does (not cached).

Reported, each by two measures:

* token: every token of the true answer is the top-1 prediction after the prompt (teacher-forced; what
  ``probe`` calls "knows"); the paraphrase's as well, for the errors;
* generation: the greedy continuation (``--gen-tokens`` tokens) of the prompt names the true answer as a
  whole word (pipeline.evaluate.says, the rule of evaluate's generation family: case and runs of spaces
  aside).

* corrected: of the errors, the share now right;
* kept: of the facts the model already knew (the same relations: the same world relations and the same zsRE
  slice), the share still right (generation: of those whose generation named the answer before), also split
  into the facts whose subject had another relation edited and the rest;
* drift on the 42 unrelated prompts (mean KL, top-1 changed) and fluency (GE) against the unedited model.

The issue's goal for one batch of ≥ 100 real errors: ≥ 95 % corrected, ≥ 97 % of the known facts kept.

    python benchmarks/error_correction.py --batches 1,4 --json benchmarks/results/error_correction_cpu.json
    python benchmarks/error_correction.py --zsre 20 --world 20 --no-fluency   # a smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.bench_stats import machine  # noqa: E402
from benchmarks.common import DEFAULT_DATA, add_override_argument, covariances, memit_target_cache  # noqa: E402
from benchmarks.common import fact_slice  # noqa: E402
from benchmarks.relation_locality import world_facts  # noqa: E402
from covedit.pipeline.correct import classify  # noqa: E402
from covedit.pipeline.edit import key_weights_for, templates_for  # noqa: E402
from covedit.pipeline.evaluate import (drift, evaluate_model, fluency, greedy_continuations,  # noqa: E402
                                      next_token_logprobs, probe, says, score)
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.memit import fact_keys, protected_rows, run_memit  # noqa: E402
from covedit.pipeline.models import cache_root  # noqa: E402
from covedit.pipeline.targets import compute_targets  # noqa: E402


def group_of(fact, source: str) -> str:
    """zsre, or world:<relation> (the id is relation:subject)."""
    return "zsre" if source == "zsre" else f"world:{fact.id.split(':', 1)[0]}"


def token_right(loaded, prompts: list[str], answers: list[str]) -> list[tuple[bool, float]]:
    """(every answer token is the top-1 prediction, token accuracy) of each prompt."""
    return [(s.token_acc == 1.0, s.token_acc) for s in score(loaded, prompts, answers)]


def measure(loaded, facts: list, truths: list[str], gen_tokens: int | None,
            continuations: list[str] | None = None) -> list[dict]:
    """Per fact, on the model as it is now: token measure on the prompt and on its paraphrases, and (unless
    ``gen_tokens`` is None) the greedy continuation and whether it names the true answer."""
    rows = [{"right_token": r, "token_acc": a}
            for r, a in token_right(loaded, [f.rewrite_prompt() for f in facts], truths)]
    para = [(i, p) for i, f in enumerate(facts) for p in f.paraphrases]
    if para:
        scored = token_right(loaded, [p for _, p in para], [truths[i] for i, _ in para])
        for i, row in enumerate(rows):
            mine = [s for (j, _), s in zip(para, scored) if j == i]
            row["paraphrase_right_token"] = (sum(r for r, _ in mine) / len(mine)) if mine else None
            row["paraphrase_token_acc"] = (sum(a for _, a in mine) / len(mine)) if mine else None
    if gen_tokens is not None:
        if continuations is None:
            continuations = greedy_continuations(loaded, [f.rewrite_prompt() for f in facts], gen_tokens)
        for row, c, t in zip(rows, continuations, truths):
            row["continuation"], row["right_generation"] = c, says(c, t)
    return rows


def pct(rows: list[dict], key: str, where=None) -> tuple[float | None, int]:
    """(share in percent of ``rows`` whose ``key`` is true, how many rows counted), over those ``where`` picks."""
    chosen = [r for i, r in enumerate(rows) if (where is None or where(i)) and r.get(key) is not None]
    return (100.0 * sum(float(r[key]) for r in chosen) / len(chosen) if chosen else None), len(chosen)


def summarise(before: list[dict], after: list[dict], pick=None) -> dict:
    """Token and generation shares right before and after, over the facts ``pick`` (index → bool) selects;
    ``kept_generation`` counts only the facts whose generation named the answer before."""
    out = {}
    for key in ("right_token", "right_generation", "paraphrase_right_token"):
        b, n = pct(before, key, pick)
        a, _ = pct(after, key, pick)
        out[key] = {"before_pct": b, "after_pct": a, "n": n}
    named = [i for i, r in enumerate(before) if r.get("right_generation") and (pick is None or pick(i))]
    kept = sum(bool(after[i].get("right_generation")) for i in named)
    out["kept_generation"] = {"pct": 100.0 * kept / len(named) if named else None, "n": len(named)}
    return out


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the zsRE sample")
    ap.add_argument("--zsre", type=int, default=100, help="zsRE facts to probe (0: none)")
    ap.add_argument("--heldout-after", type=int, default=1000, help="take the zsRE facts after this many (tuning) facts")
    ap.add_argument("--world", type=int, default=-1, help="world facts to probe, a seeded sample (-1: all; 0: none)")
    ap.add_argument("--max-errors", type=int, default=0, help="edit at most this many of the errors (0: all)")
    ap.add_argument("--batches", default="1", help="sequential batches to split the errors into, e.g. 1,4 "
                                                   "(each count from the unedited model)")
    ap.add_argument("--fresh-targets", action="store_true",
                    help="optimise the targets of batches after the first on the edited model (not cached)")
    ap.add_argument("--gen-tokens", type=int, default=16, help="greedy tokens for the generation measure")
    ap.add_argument("--no-fluency", action="store_true", help="skip fluency (greedy 50-token generations)")
    ap.add_argument("--keep-known", type=float, default=0.0, metavar="W",
                    help="add W Σ k kᵀ of the keys of a seeded half of the known facts to λC from the first batch "
                         "(the preserve_earlier term), and report what is kept of each half separately")
    ap.add_argument("--seed", type=int, default=0)
    add_override_argument(ap)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    batchings = [int(k) for k in args.batches.split(",")]
    with_fluency = not args.no_fluency
    t_start = time.perf_counter()

    cache = memit_target_cache(args.model, args.overrides)
    loaded = cache.loaded
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, args.overrides)
    templates = templates_for(loaded, hp)
    print(f"machine: {machine()}\nmodel: {loaded.model_id}, MEMIT at layers {hp.layers}, λ {hp.lam:g}, "
          f"μ {hp.preserve_prompts:g}, ν {hp.preserve_relation:g}", flush=True)

    # ------------------------------------------------------------------ probe: what it knows, what it gets wrong
    zsre = fact_slice(args.data, args.zsre, args.heldout_after) if args.zsre else []
    world = world_facts()
    if 0 <= args.world < len(world):
        keep = sorted(random.Random(args.seed).sample(range(len(world)), args.world))
        world = [world[i] for i in keep]
    t = time.perf_counter()
    probed, errors, known, truths_known = [], [], [], []
    for source, facts, new_is_true in (("zsre", zsre, True), ("world", world, False)):
        if not facts:
            continue
        rows = probe(loaded, facts, n_tokens=args.gen_tokens)
        got = classify(facts, rows, new_is_true=new_is_true)
        assert not got.unknown  # every fact here has a true answer
        for f, truth, r in zip(facts, got.truths, rows):
            probed.append({"id": f.id, "source": source, "group": group_of(f, source), "subject": f.subject,
                           "prompt": f.rewrite_prompt(), "truth": truth, "knows": r["knows"],
                           "continuation_before": r["continuation"]})
        errors += [(source, f) for f in got.wrong]
        known += [(source, f) for f in got.known]
        truths_known += [f.target_true or f.target_new for f in got.known]
    probe_s = time.perf_counter() - t
    random.Random(args.seed).shuffle(errors)
    if args.max_errors and len(errors) > args.max_errors:
        errors = errors[:args.max_errors]
    err_facts = [f for _, f in errors]
    err_truths = [f.target_new for f in err_facts]
    known_facts = [f for _, f in known]
    continuation = {(p["source"], p["id"]): p["continuation_before"] for p in probed}
    print(f"probed {len(probed)} facts with known true answers (zsRE {len(zsre)} after the first "
          f"{args.heldout_after}, world {len(world)}) in {probe_s:.0f} s: the model knows {len(known)}, "
          f"gets {sum(not p['knows'] for p in probed)} wrong; editing {len(err_facts)}", flush=True)
    if not err_facts:
        raise SystemExit("the model gets none of these facts wrong: nothing to correct")

    err_before = measure(loaded, err_facts, err_truths, args.gen_tokens, [continuation[s, f.id] for s, f in errors])
    known_before = measure(loaded, known_facts, truths_known, args.gen_tokens, [continuation[s, f.id] for s, f in known])
    unedited = evaluate_model(loaded, [], reference_cache=cache_root() / "eval", with_fluency=with_fluency,
                              generation=False)
    reference, flu_before = unedited.next_tokens, unedited.fluency

    t = time.perf_counter()
    uncached = len(cache.missing(err_facts))
    targets = cache.get(err_facts)  # all of them now, on the unedited model, before any weight changes
    targets_s = time.perf_counter() - t
    covs = covariances(loaded, hp.layers)
    originals = {layer: loaded.down_weight(layer).detach().clone() for layer in hp.layers}
    edited_subjects = {f.subject for f in err_facts}
    same_subject = [f.subject in edited_subjects for f in known_facts]
    # --keep-known: the keys of a seeded half of the known facts, asked to stay from the first batch on; the
    # other half measures whether that protection reaches known facts the edit was not told about
    protected = set(random.Random(args.seed + 1).sample(range(len(known_facts)), len(known_facts) // 2)
                    if args.keep_known > 0 else [])
    known_keys = ({layer: fact_keys(loaded, layer, [known_facts[i] for i in sorted(protected)], templates,
                                    hp.keys_from, key_weights_for(loaded, hp)).float().cpu() for layer in hp.layers}
                  if protected else {})
    result = {
        "machine": machine(), "model": loaded.model_id, "layers": hp.layers, "lam": hp.lam,
        "preserve_prompts": hp.preserve_prompts, "preserve_relation": hp.preserve_relation,
        "overrides": args.overrides, "target_hparams": vars(hp.target), "zsre_facts": len(zsre),
        "heldout_after": args.heldout_after, "world_facts": len(world), "seed": args.seed,
        "gen_tokens": args.gen_tokens, "fresh_targets": args.fresh_targets, "keep_known": args.keep_known,
        "preserve_earlier": hp.preserve_earlier,
        "probed": len(probed), "known": len(known), "wrong": sum(not p["knows"] for p in probed),
        "edited": len(err_facts), "probe_s": probe_s, "targets_s": targets_s, "targets_optimised_now": uncached,
        "targets_optimisation_s": cache.seconds(err_facts),
        "unedited": {"fluency_ge": (flu_before or {}).get("ge")}, "runs": {},
    }

    for k in batchings:
        with torch.no_grad():
            for layer, W in originals.items():
                loaded.down_weight(layer).copy_(W)
        size = -(-len(err_facts) // k)
        parts = [list(range(lo, min(lo + size, len(err_facts)))) for lo in range(0, len(err_facts), size)]
        steps = []
        # what later batches keep: the protected known facts' keys (weight --keep-known) and, as batch-edit
        # --base does, every earlier batch's keys (weight preserve_earlier); one weighted moment via √w rows
        carried = protected_rows((known_keys, args.keep_known))
        for b, part in enumerate(parts):
            facts = [err_facts[i] for i in part]
            t = time.perf_counter()
            if args.fresh_targets and b > 0:
                batch_targets = compute_targets(loaded, facts, hp.layers[-1], hp.target, templates)
            else:
                batch_targets = targets.select(part)
            tt = time.perf_counter() - t
            t = time.perf_counter()
            out = run_memit(loaded, facts, hp.layers, covs, hp.lam, hp.target, templates, time.perf_counter,
                            targets=batch_targets, keys_from=hp.keys_from, key_weights=key_weights_for(loaded, hp),
                            preserve_prompts=hp.preserve_prompts, preserve_relation=hp.preserve_relation,
                            relation_subjects=hp.relation_subjects, protected_keys=carried)
            solve_s = time.perf_counter() - t
            carried = protected_rows((carried, 1.0), (out.keys, hp.preserve_earlier))
            done = [i for p in parts[:b + 1] for i in p]
            so_far = measure(loaded, [err_facts[i] for i in done], [err_truths[i] for i in done], None)
            kept = measure(loaded, known_facts, truths_known, None)
            steps.append({"batch": b + 1, "facts": len(part), "solve_s": solve_s, "fresh_targets_s": tt if b else None,
                          "realised_mean": sum(out.target_info["realised"]) / len(part),
                          "corrected_so_far_token_pct": pct(so_far, "right_token")[0],
                          "kept_token_pct": pct(kept, "right_token")[0]})
            if k > 1:
                print(f"  batch {b + 1} of {k}: {len(part)} facts, solve {solve_s:.1f} s; corrected so far "
                      f"{fmt(steps[-1]['corrected_so_far_token_pct'])} %, kept {fmt(steps[-1]['kept_token_pct'])} % "
                      "(token)", flush=True)
        err_after = measure(loaded, err_facts, err_truths, args.gen_tokens)
        known_after = measure(loaded, known_facts, truths_known, args.gen_tokens)
        d = drift(reference, next_token_logprobs(loaded, reference.prompts))
        flu = fluency(loaded) if with_fluency else None
        corrected = summarise(err_before, err_after)
        kept = summarise(known_before, known_after)
        groups = sorted({group_of(f, s) for s, f in errors + known})
        by_group = {}
        for g in groups:
            ei = {i for i, (s, f) in enumerate(errors) if group_of(f, s) == g}
            ki = {i for i, (s, f) in enumerate(known) if group_of(f, s) == g}
            by_group[g] = {"errors": len(ei), "known": len(ki),
                           "corrected": summarise(err_before, err_after, ei.__contains__),
                           "kept": summarise(known_before, known_after, ki.__contains__)}
        run = {
            "batches": len(parts), "steps": steps, "corrected": corrected, "kept": kept,
            "kept_same_subject": summarise(known_before, known_after, lambda i: same_subject[i]),
            "kept_other_subjects": summarise(known_before, known_after, lambda i: not same_subject[i]),
            "kept_protected": summarise(known_before, known_after, protected.__contains__) if protected else None,
            "kept_unprotected": (summarise(known_before, known_after, lambda i: i not in protected)
                                 if protected else None),
            "by_group": by_group,
            "drift": {"n_prompts": d["n_prompts"], "mean_kl": d["mean_kl"], "max_kl": d["max_kl"],
                      "top1_changed_pct": d["top1_changed_pct"], "per_prompt": d["per_prompt"]},
            "fluency_ge": (flu or {}).get("ge"),
            "goal_met": {m: (len(err_facts) >= 100 and corrected[key]["after_pct"] >= 95
                             and kept_pct is not None and kept_pct >= 97) if len(parts) == 1 else None
                         for m, key, kept_pct in (("token", "right_token", kept["right_token"]["after_pct"]),
                                                  ("generation", "right_generation", kept["kept_generation"]["pct"]))},
            "per_fact": {
                "errors": [{"id": f.id, "source": s, "subject": f.subject, "prompt": f.rewrite_prompt(),
                            "truth": f.target_new, "said_before": f.target_true,
                            "batch": next(b + 1 for b, p in enumerate(parts) if i in p),
                            "before": err_before[i], "after": err_after[i]}
                           for i, (s, f) in enumerate(errors)],
                "known": [{"id": f.id, "source": s, "subject": f.subject, "prompt": f.rewrite_prompt(),
                           "truth": truths_known[i], "same_subject_edited": same_subject[i],
                           "before": known_before[i], "after": known_after[i]}
                          for i, (s, f) in enumerate(known)],
            },
        }
        result["runs"][str(k)] = run
        label = "one batch" if len(parts) == 1 else f"{len(parts)} sequential batches"
        print(f"\n{len(err_facts)} errors corrected with MEMIT in {label}:\n"
              "| | facts | token: right before → after | generation: right before → after | kept by generation |\n"
              "|---|---|---|---|---|")
        print(f"| errors (corrected) | {len(err_facts)} | {fmt(corrected['right_token']['before_pct'])} → "
              f"{fmt(corrected['right_token']['after_pct'])} | {fmt(corrected['right_generation']['before_pct'])} → "
              f"{fmt(corrected['right_generation']['after_pct'])} | |")
        print(f"| their paraphrases | {corrected['paraphrase_right_token']['n']} | "
              f"{fmt(corrected['paraphrase_right_token']['before_pct'])} → "
              f"{fmt(corrected['paraphrase_right_token']['after_pct'])} | | |")
        for name, s, n in (("known facts (kept)", kept, len(known)),
                           ("  same subject edited", run["kept_same_subject"], sum(same_subject)),
                           ("  other subjects", run["kept_other_subjects"], len(known) - sum(same_subject)),
                           *((("  protected (--keep-known)", run["kept_protected"], len(protected)),
                              ("  not protected", run["kept_unprotected"], len(known) - len(protected)))
                             if protected else ())):
            print(f"| {name} | {n} | {fmt(s['right_token']['before_pct'])} → {fmt(s['right_token']['after_pct'])} | "
                  f"{fmt(s['right_generation']['before_pct'])} → {fmt(s['right_generation']['after_pct'])} | "
                  f"{fmt(s['kept_generation']['pct'])} % of {s['kept_generation']['n']} |")
        for g, v in by_group.items():
            print(f"| {g}: errors {v['errors']}, known {v['known']} | | corrected "
                  f"{fmt(v['corrected']['right_token']['after_pct'])}, kept {fmt(v['kept']['right_token']['after_pct'])} | "
                  f"corrected {fmt(v['corrected']['right_generation']['after_pct'])}, "
                  f"kept {fmt(v['kept']['kept_generation']['pct'])} | |")
        print(f"drift on {d['n_prompts']} unrelated prompts: mean KL {d['mean_kl']:.4f} nats, top-1 changed on "
              f"{d['top1_changed_pct']:.1f} %" + (f"; fluency GE {result['unedited']['fluency_ge']:.1f} → "
                                                   f"{run['fluency_ge']:.1f}" if flu else ""))
        goal = "" if len(parts) > 1 else (
            f"; goal (≥ 100 errors in one batch, ≥ 95 % corrected, ≥ 97 % kept): token "
            f"{'met' if run['goal_met']['token'] else 'not met'}, generation "
            f"{'met' if run['goal_met']['generation'] else 'not met'}")
        print(f"solve {sum(s['solve_s'] for s in steps):.1f} s{goal}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    result["total_s"] = time.perf_counter() - t_start
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
