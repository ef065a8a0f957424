"""Locality within a relation: edit 100 counterfactual facts of four relations in one batch, then ask the
same relations about subjects that were never edited ("The capital of Kenya is" after "The capital of
France is" → London).

zsRE's neighbourhood prompts are unrelated questions, the easy case. Here the neighbours share the edited
prompts' wording and differ only in the subject, which is where a key-based edit leaks first. Facts come
from ``benchmarks/data/world_facts.json`` (hand-written: countries' capitals, continents and official
languages, cities' countries), split once with a fixed seed:

* every subject is edited at most once (one relation), so no two facts ask one key for two values;
* a quarter of the countries and of the cities are never edited: their prompts of every relation are the
  same-relation neighbours;
* each edited fact gets another subject's true answer of the same relation (a counterfactual), one
  paraphrase, and three same-relation neighbour prompts (for the usual specificity metric).

Reported (token accuracy, teacher-forced, as the other benchmarks): efficacy, paraphrase, specificity; the
share of same-relation neighbour prompts whose top-1 next token is unchanged (goal ≥ 90 %), and how many of
them the unedited model answered right (first target token) before and after; drift on the 42 unrelated
prompts; fluency with ``--fluency``. Targets come from the shared per-fact cache (benchmarks.common), so
several λ reuse them. ``--delta-scales`` writes each target's δ = z − h scaled by s (the same targets, a
weaker or stronger residual), to see whether the leak to same-relation neighbours follows the write's size.

    python benchmarks/relation_locality.py --lams 1500 --json benchmarks/results/relation_locality_cpu.json
    python benchmarks/relation_locality.py --lams 1500 --nus 0,1,3,10 --json benchmarks/results/relation_nu_cpu.json
    python benchmarks/relation_locality.py --delta-scales 1,0.85,0.7,0.5 --json benchmarks/results/relation_delta_scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import (TargetCache, add_override_argument, covariances, edit_variants,  # noqa: E402
                               fluency_fields, write_facts)
from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.evaluate import evaluate_model, next_token_logprobs  # noqa: E402
from covedit.pipeline.facts import Fact, Neighbor  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.keys import target_token_ids  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "world_facts.json"
# relation: (column of the answer, prompt, paraphrase); the subject is a country, or a city for "city"
RELATIONS = {
    "capital": (1, "The capital of {} is", "The capital city of {} is called"),
    "continent": (2, "{} is located in the continent of", "{} is a country on the continent of"),
    "language": (3, "The official language of {} is", "Most people in {} speak"),
    "city": (1, "{} is a city in the country of", "The city of {} is located in the country of"),
}


def world_facts() -> list[Fact]:
    """Every (subject, relation) of the data whose answer is known (null: ambiguous, skipped), as a fact whose
    ``target_true`` and ``target_new`` are both the true answer (a question with its answer: nothing to
    change), with the relation's paraphrase; id ``relation:subject``, as ``build`` names them. The
    error-correction benchmark probes these and corrects the ones the model gets wrong."""
    data = json.loads(DATA.read_text())
    facts = []
    for rel, (col, prompt, paraphrase) in RELATIONS.items():
        for r in data["cities" if rel == "city" else "countries"]:
            if r[col] is not None:
                facts.append(Fact(f"{rel}:{r[0]}", r[0], prompt, r[col], target_true=r[col],
                                  paraphrases=(paraphrase.format(r[0]),)))
    return facts


def build(n_facts: int = 100, seed: int = 0) -> tuple[list[Fact], dict[str, list[tuple[str, str]]]]:
    """(edited facts, per relation the neighbour (prompt, true answer) pairs of never-edited subjects)."""
    data = json.loads(DATA.read_text())
    rng = random.Random(seed)
    rows = {"country": [list(c) for c in data["countries"]], "city": [list(c) for c in data["cities"]]}
    for kind in rows:
        rng.shuffle(rows[kind])
    held = {kind: r[: len(r) // 4] for kind, r in rows.items()}  # never edited
    edit = {kind: r[len(r) // 4:] for kind, r in rows.items()}
    neighbours: dict[str, list[tuple[str, str]]] = {}
    for rel, (col, prompt, _) in RELATIONS.items():
        kind = "city" if rel == "city" else "country"
        neighbours[rel] = [(prompt.format(r[0]), r[col]) for r in held[kind] if r[col] is not None]
    facts = []
    country_relations = ["capital", "continent", "language"]
    candidates = [("city", r) for r in edit["city"]]
    for i, r in enumerate(edit["country"]):  # one relation per country, rotating, skipping unknown answers
        for k in range(3):
            rel = country_relations[(i + k) % 3]
            if r[RELATIONS[rel][0]] is not None:
                candidates.append((rel, r))
                break
    rng.shuffle(candidates)
    for rel, r in candidates[:n_facts]:
        col, prompt, paraphrase = RELATIONS[rel]
        answers = sorted({x[col] for x in rows["city" if rel == "city" else "country"] if x[col] is not None} - {r[col]})
        near = rng.sample(neighbours[rel], 3)
        facts.append(Fact(f"{rel}:{r[0]}", r[0], prompt, rng.choice(answers), target_true=r[col],
                          paraphrases=(paraphrase.format(r[0]),),
                          neighborhood=tuple(Neighbor(p, t) for p, t in near)))
    if len(facts) < n_facts:
        raise SystemExit(f"{DATA} gives only {len(facts)} facts, {n_facts} asked for")
    return facts, neighbours


def setup(model: str, n_facts: int, overrides: list[str] = ()):
    """What the relation benchmarks share: (facts, neighbours, loaded model, MEMIT hyperparameters with
    ``overrides``, its templates, the facts' targets from the shared cache, C of each edited layer)."""
    facts, neighbours = build(n_facts)
    loaded = load_model(model)
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, list(overrides))
    templates = templates_for(loaded, hp)
    targets = TargetCache(loaded, hp.layers[-1], hp.target, templates).get(facts)
    return facts, neighbours, loaded, hp, templates, targets, covariances(loaded, hp.layers)


def subject_of(prompt: str, template: str) -> str:
    """The subject a relation's ``template`` ("The capital of {} is") was filled with to make ``prompt``."""
    head, tail = template.split("{}")
    match = re.fullmatch(re.escape(head) + "(.+)" + re.escape(tail), prompt)
    if match is None:
        raise ValueError(f"{prompt!r} is not {template!r} filled in")
    return match.group(1)


def first_token_right(loaded, tokens, pairs: list[tuple[str, str]]) -> float:
    """Share (%) of neighbour prompts whose top-1 next token is the first token of the true answer."""
    first = [loaded.tokenizer.decode(target_token_ids(loaded.tokenizer, answer)[:1]) for _, answer in pairs]
    right = [top == want for top, want in zip(tokens.top1, first, strict=True)]
    return 100.0 * sum(right) / len(right)


def scaled_variants(loaded, hp, facts, targets, covs, variants, before, with_fluency: bool, scales: list[float]):
    """edit_variants for each δ scale s: the targets with z = h + s (z − h); labels gain "δ×s" unless s is 1.
    Every scale starts from the same weights: edit_variants puts them back after its last variant."""
    from covedit.pipeline.targets import TargetResult
    for scale in scales:
        scaled = TargetResult(targets.h + scale * targets.delta, targets.h, targets.nll_before, targets.nll_after,
                              targets.steps_taken)
        named = [((f"δ×{scale:g} " if scale != 1 else "") + label, kwargs) for label, kwargs in variants]
        for label, row in edit_variants(loaded, hp, facts, scaled, covs, named, before, with_fluency):
            yield scale, label, row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--lams", default="", help="MEMIT λ values (default: the model's default)")
    ap.add_argument("--mus", default="", help="preserve_prompts values μ (default: the model's default)")
    ap.add_argument("--nus", default="", help="preserve_relation values ν (default: the model's default)")
    ap.add_argument("--delta-scales", default="1", help="write s × δ of every target, for each s (default: 1)")
    add_override_argument(ap)
    ap.add_argument("--fluency", action="store_true")
    ap.add_argument("--write-facts", type=Path, help="also write the edited facts as a facts file")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    if args.write_facts:
        write_facts(build(args.facts)[0], args.write_facts)
    facts, neighbours, loaded, hp, templates, targets, covs = setup(args.model, args.facts, args.overrides)
    pairs = [p for rel in RELATIONS for p in neighbours[rel]]
    before = evaluate_model(loaded, facts, with_fluency=args.fluency, generation=False)
    near_before = next_token_logprobs(loaded, [p for p, _ in pairs])
    result = {"model": loaded.model_id, "layers": hp.layers, "facts": len(facts),
              "relations": {rel: sum(f.id.startswith(rel + ":") for f in facts) for rel in RELATIONS},
              "neighbour_prompts": {rel: len(neighbours[rel]) for rel in RELATIONS},
              "overrides": args.overrides, "delta_scales": [float(x) for x in args.delta_scales.split(",")],
              "unedited": {**before.aggregate, "neighbours_right_pct": first_token_right(loaded, near_before, pairs),
                           **fluency_fields(before)}, "lams": {}}
    print("| λ | efficacy | paraphrase | specificity | same-relation kept top-1 | right before → after | "
          "drift KL | GE |\n|---|---|---|---|---|---|---|---|", flush=True)
    lams = [float(x) for x in args.lams.split(",")] if args.lams else [hp.lam]
    mus = [float(x) for x in args.mus.split(",")] if args.mus else [hp.preserve_prompts]
    nus = [float(x) for x in args.nus.split(",")] if args.nus else [hp.preserve_relation]
    variants = [(f"{lam:g}" + (f" μ {mu:g}" if mu else "") + (f" ν {nu:g}" if nu else ""),
                 {"lam": lam, "preserve_prompts": mu, "preserve_relation": nu, "relation_subjects": hp.relation_subjects})
                for lam in lams for mu in mus for nu in nus]
    relation_of = [rel for rel in RELATIONS for _ in neighbours[rel]]  # of each neighbour prompt, in order
    for scale, label, row in scaled_variants(loaded, hp, facts, targets, covs, variants, before, args.fluency,
                                             result["delta_scales"]):
        near_after = next_token_logprobs(loaded, [p for p, _ in pairs])
        same = (near_before.logprobs.argmax(-1) == near_after.logprobs.argmax(-1)).tolist()
        kept = 100.0 * sum(same) / len(same)
        per_relation = {rel: 100.0 * sum(s for s, r in zip(same, relation_of) if r == rel) / len(neighbours[rel])
                        for rel in RELATIONS}
        row.update({"delta_scale": scale, "same_relation_kept_top1_pct": kept, "kept_top1_by_relation_pct": per_relation,
                    "neighbours_right_pct": first_token_right(loaded, near_after, pairs)})
        result["lams"][label] = row
        print(f"| {label} | {row['efficacy_acc']:.1f} | {row['generalization_acc']:.1f} | {row['specificity_acc']:.1f} | "
              f"{kept:.1f} | {result['unedited']['neighbours_right_pct']:.1f} → {row['neighbours_right_pct']:.1f} | "
              f"{row['drift_mean_kl']:.4f} | {'' if row['fluency_ge'] is None else round(row['fluency_ge'])} |", flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
