"""Correcting the model's real errors: the facts ``probe`` finds it gets wrong, as edits to their true answers.

    covedit probe facts.jsonl --wrong-only --write wrong.jsonl     # what it gets wrong, as a facts file
    covedit batch-edit wrong.jsonl --output out/corrected           # edit each fact to its true answer

A fact's true answer is known when its record has a ``target_true`` (our schema, CounterFact), or when it is
a zsRE record: zsRE's ``answers[0]``, read as ``target_new``, is the true answer. A fact of our schema with no
``target_true`` asks for an answer nobody says is true, so it cannot be corrected: ``classify`` puts it
aside (``unknown``) rather than guessing.

The written fact keeps the record's id, subject, prompt, paraphrases and neighbourhood (and its ripple
prompts where the record's target_new is the true answer: they follow from it); ``target_new`` is
the true answer and ``target_true`` what the model says now (the first clause of its greedy continuation,
at most ``MAX_ANSWER_WORDS`` words), left out when the model says nothing or says the true answer itself
(greedy generation can name it although teacher forcing does not rank every token of it first).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from covedit.pipeline.atomic import replace_file
from covedit.pipeline.facts import Fact, detect_format

MAX_ANSWER_WORDS = 5
_CLAUSE_END = re.compile(r"[\n.,;:!?()\[\]\"]")


def zsre_lines(path: str | Path, fmt: str) -> set[int]:
    """Line numbers (1-based, as ``Fact.line``) of the file's zsRE records: every line for ``--format zsre``,
    none for ``covedit`` or ``counterfact``, each line's detected format for ``auto``. Call it after
    ``read_facts`` has accepted the file (lines that are not JSON objects are skipped here)."""
    if fmt in ("covedit", "counterfact"):
        return set()
    out = set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8", errors="replace")
            if not text.strip():
                continue
            if fmt == "zsre":
                out.add(number)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and detect_format(obj) == "zsre":
                out.add(number)
    return out


def true_answer(fact: Fact, new_is_true: bool) -> str | None:
    """The fact's true answer: ``target_true`` where the record has one, else ``target_new`` when that is the
    true answer (``new_is_true``: a zsRE record), else None (unknown)."""
    if fact.target_true:
        return fact.target_true
    return fact.target_new if new_is_true else None


def model_answer(continuation: str) -> str | None:
    """What the model says: the first clause of its greedy continuation (up to a newline or punctuation),
    at most ``MAX_ANSWER_WORDS`` words; None if that is empty."""
    clause = _CLAUSE_END.split(continuation.strip(), maxsplit=1)[0]
    answer = " ".join(clause.split()[:MAX_ANSWER_WORDS])
    return answer or None


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def correction(fact: Fact, truth: str, continuation: str) -> Fact:
    """The edit that corrects ``fact``: target_new = ``truth``, target_true = what the model says now (left out
    if it says nothing, or the truth itself). Ripple prompts are consequences of the record's target_new:
    kept only when that is the truth."""
    said = model_answer(continuation)
    changes: dict = {"target_new": truth, "target_true": None if said is None or _same(said, truth) else said}
    if getattr(fact, "ripple", ()) and not _same(fact.target_new, truth):
        changes["ripple"] = ()
    return replace(fact, **changes)


def known_fact(fact: Fact, truth: str) -> Fact:
    """A fact the model already gets right, as one to keep (``batch-edit --keep``): target_new = the answer it
    gives, no target_true (nothing is to be replaced), no ripple prompts (they follow from an edit)."""
    return replace(fact, target_new=truth, target_true=None, ripple=())


@dataclass
class Classified:
    """Facts sorted by what ``probe`` found: ``wrong`` (the corrections, in the facts' order), ``known``
    (the model already gives the true answer) and ``unknown`` (no known true answer: cannot be corrected);
    ``truths`` is each probed fact's true answer (None where unknown), in order."""

    wrong: list[Fact]
    known: list[Fact]
    unknown: list[Fact]
    truths: list[str | None]


def classify(facts: list[Fact], rows: list[dict], zsre: set[int] | None = None,
             new_is_true: bool = False) -> Classified:
    """Sort probed facts (``rows``: ``probe``'s rows, in the facts' order). ``target_new`` counts as the true
    answer for facts without ``target_true`` whose line is in ``zsre`` (see ``zsre_lines``), or for all of
    them with ``new_is_true``. ``probe``'s ``knows`` checks target_true where present, else target_new, so
    for every fact with a known true answer it says whether the model gives that answer."""
    if len(facts) != len(rows):
        raise ValueError(f"{len(facts)} facts but {len(rows)} probe rows")
    zsre = zsre or set()
    wrong, known, unknown, truths = [], [], [], []
    for fact, row in zip(facts, rows):
        truth = true_answer(fact, new_is_true or fact.line in zsre)
        truths.append(truth)
        if truth is None:
            unknown.append(fact)
        elif row["knows"]:
            known.append(fact)
        else:
            wrong.append(correction(fact, truth, row["continuation"]))
    return Classified(wrong, known, unknown, truths)


def fact_record(fact: Fact) -> dict:
    """``fact`` as one record of covedit's own schema (what ``read_facts`` reads back)."""
    record: dict = {"id": fact.id, "subject": fact.subject, "prompt": fact.prompt, "target_new": fact.target_new}
    if fact.target_true:
        record["target_true"] = fact.target_true
    if fact.paraphrases:
        record["paraphrases"] = list(fact.paraphrases)
    if fact.neighborhood:
        record["neighborhood"] = [{"prompt": n.prompt, "target": n.target} for n in fact.neighborhood]
    if getattr(fact, "ripple", ()):
        record["ripple"] = [{"prompt": r.prompt, "target": r.target} for r in fact.ripple]
    return record


def write_facts(path: str | Path, facts: list[Fact]) -> None:
    """``facts`` as a facts JSONL file in our schema, written atomically (the old file or the whole new one)."""
    text = "".join(json.dumps(fact_record(f), ensure_ascii=False) + "\n" for f in facts)
    replace_file(Path(path), text, "the facts file")
