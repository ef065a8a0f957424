"""Facts to edit: the Fact record, reading and validating a facts JSONL file, CounterFact and zsRE importers.

Our schema, one JSON object a line (``subject``, ``prompt`` with exactly one ``{}`` and ``target_new`` are
required)::

    {"id": "f1", "subject": "Eiffel Tower", "prompt": "The {} is located in the city of",
     "target_new": "Rome", "target_true": "Paris",
     "paraphrases": ["Where is the Eiffel Tower? It is in"],
     "neighborhood": [{"prompt": "The Louvre is located in the city of", "target": "Paris"}],
     "ripple": [{"prompt": "The Eiffel Tower is located in the country of", "target": "Italy"}]}

``neighborhood`` holds prompts the edit must not change (with the answer they keep); ``ripple`` (optional,
also called portability) holds prompts whose answer should change with the edit, with the answer they
should give after it: a consequence of the new fact that the edit was not trained on.

Quirks worth knowing:

* ``read_facts`` reads the whole file and checks every line before it returns anything: one bad line and
  it raises ``FactsError`` listing every problem with its line number and field, so nothing is edited.
* With ``fmt="auto"`` the format is decided per line: ``requested_rewrite`` means CounterFact, ``src`` plus
  ``answers`` means zsRE, anything else is ours. Files may mix them.
* Targets are kept as written; the leading space a target needs after a prompt is added when it is
  tokenised (``keys.target_token_ids``), so ``"Rome"`` and ``" Rome"`` are the same target.
* zsRE follows the MEMIT convention: the edit target is ``answers[0]``, the paraphrase is ``rephrase`` and
  the neighbourhood prompt is ``loc + "?"`` with target ``loc_ans``. zsRE has no true target.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covedit.pipeline.errors import DataError, MissingInput
from covedit.pipeline.fileio import file_sha256

log = logging.getLogger(__name__)

FORMATS = ("auto", "covedit", "counterfact", "zsre")
MAX_LISTED = 20  # problems shown in a FactsError message


@dataclass(frozen=True)
class Neighbor:
    """A prompt the edit must not change, and the answer the model should keep giving."""

    prompt: str
    target: str


@dataclass(frozen=True)
class Ripple:
    """A full prompt whose answer follows from the edit (the Eiffel Tower in Rome: "... in the country of"),
    and the answer it should give after the edit."""

    prompt: str
    target: str


@dataclass(frozen=True)
class Fact:
    """One requested rewrite: after the edit, ``prompt`` with ``subject`` put in should lead to ``target_new``."""

    id: str
    subject: str
    prompt: str  # exactly one "{}", where the subject goes
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Neighbor, ...] = ()
    line: int = 0  # line of the facts file it came from (0: not from a file)
    # Consequences of the edit (our schema only); after ``line``, which callers pass by position.
    ripple: tuple[Ripple, ...] = ()

    def rewrite_prompt(self) -> str:
        """The prompt with the subject put in (``str.replace``: a subject may itself hold braces)."""
        return self.prompt.replace("{}", self.subject)


@dataclass(frozen=True)
class Problem:
    """What is wrong with one line (``field`` None: the line as a whole)."""

    line: int
    field: str | None
    message: str

    def render(self, source: str) -> str:
        where = f"{source} line {self.line}"
        if self.field is not None:
            where += f", field {self.field!r}"
        return f"{where}: {self.message}"


class FactsError(DataError):
    """A facts file with problems; ``problems`` holds all of them, the message the first ``MAX_LISTED``."""

    def __init__(self, problems: list[Problem], source: str = "facts.jsonl"):
        self.problems = list(problems)
        self.source = source
        lines = [p.render(source) for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"... and {len(self.problems) - MAX_LISTED} more problems")
        if len(self.problems) == 1:
            message = lines[0]
        else:
            message = f"{len(self.problems)} problems in {source}, no facts were read:\n" + "\n".join(lines)
        super().__init__(message)


class _Invalid(Exception):
    """Internal: carries the problems of one record out of the parsers."""

    def __init__(self, problems: list[Problem]):
        super().__init__(problems)
        self.problems = problems


# ------------------------------------------------------------------------------------------ field checks

class _Checker:
    """Collects the problems of one record while its fields are read."""

    def __init__(self, line: int, prefix: str = ""):
        self.line = line
        self.prefix = prefix  # e.g. "requested_rewrite." for nested CounterFact fields
        self.problems: list[Problem] = []

    def add(self, field_name: str | None, message: str) -> None:
        name = None if field_name is None else self.prefix + field_name
        self.problems.append(Problem(self.line, name, message))

    def text(self, obj: dict, key: str, required: bool = True) -> str | None:
        """A non-empty string field; None (and a problem if required) when absent."""
        value = obj.get(key)
        if value is None:
            if required:
                self.add(key, "is required")
            return None
        if not isinstance(value, str):
            self.add(key, f"must be a string, got {type(value).__name__}")
            return None
        if not value.strip():
            self.add(key, "must not be empty")
            return None
        return value

    def strings(self, obj: dict, key: str) -> tuple[str, ...]:
        """An optional list of non-empty strings."""
        value = obj.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            self.add(key, f"must be a list of strings, got {type(value).__name__}")
            return ()
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                self.add(f"{key}[{i}]", "must be a non-empty string")
            else:
                out.append(item)
        return tuple(out)

    def done(self) -> None:
        if self.problems:
            raise _Invalid(self.problems)


def _check_prompt(c: _Checker, prompt: str | None, key: str = "prompt") -> None:
    if prompt is not None and prompt.count("{}") != 1:
        c.add(key, f"must contain exactly one '{{}}' where the subject goes, found {prompt.count('{}')}")


def _fact_id(c: _Checker, value: Any, line: int) -> str:
    if value is None:
        return f"line{line}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        c.add("id", f"must be a string or an integer, got {type(value).__name__}")
        return f"line{line}"
    if isinstance(value, str) and not value.strip():
        c.add("id", "must not be empty")
    return str(value)


# ------------------------------------------------------------------------------------------ the formats

def _from_covedit(obj: dict, line: int) -> Fact:
    c = _Checker(line)
    fact_id = _fact_id(c, obj.get("id"), line)
    subject = c.text(obj, "subject")
    prompt = c.text(obj, "prompt")
    _check_prompt(c, prompt)
    target_new = c.text(obj, "target_new")
    target_true = c.text(obj, "target_true", required=False)
    paraphrases = c.strings(obj, "paraphrases")
    neighborhood = _prompt_targets(c, obj, "neighborhood", Neighbor)
    ripple = _prompt_targets(c, obj, "ripple", Ripple)
    c.done()
    return Fact(fact_id, subject, prompt, target_new, target_true, paraphrases, neighborhood, line, ripple)


def _prompt_targets(c: _Checker, obj: dict, key: str, cls: type) -> tuple:
    """An optional list of {"prompt", "target"} objects (``neighborhood``, ``ripple``) as ``cls`` records."""
    out = []
    raw = obj.get(key)
    if raw is not None and not isinstance(raw, list):
        c.add(key, f"must be a list of {{'prompt', 'target'}} objects, got {type(raw).__name__}")
    for i, item in enumerate(raw if isinstance(raw, list) else []):
        if not isinstance(item, dict):
            c.add(f"{key}[{i}]", "must be an object with 'prompt' and 'target'")
            continue
        inner = _Checker(c.line, prefix=f"{key}[{i}].")
        n_prompt, n_target = inner.text(item, "prompt"), inner.text(item, "target")
        c.problems.extend(inner.problems)
        if n_prompt is not None and n_target is not None:
            out.append(cls(n_prompt, n_target))
    return tuple(out)


def from_counterfact(obj: dict, line: int = 0) -> Fact:
    """A CounterFact record (ROME/MEMIT ``counterfact.json``): neighbourhood prompts keep ``target_true``."""
    c = _Checker(line)
    rewrite = obj.get("requested_rewrite")
    if not isinstance(rewrite, dict):
        c.add("requested_rewrite", "must be an object with prompt, subject, target_new and target_true")
        c.done()
    r = _Checker(line, prefix="requested_rewrite.")
    subject = r.text(rewrite, "subject")
    prompt = r.text(rewrite, "prompt")
    _check_prompt(r, prompt)
    targets: dict[str, str | None] = {}
    for key in ("target_new", "target_true"):
        value = rewrite.get(key)
        if not isinstance(value, dict):
            r.add(key, "must be an object with a 'str' field")
            targets[key] = None
        else:
            inner = _Checker(line, prefix=f"requested_rewrite.{key}.")
            targets[key] = inner.text(value, "str")
            r.problems.extend(inner.problems)
    c.problems.extend(r.problems)
    fact_id = _fact_id(c, obj.get("case_id", obj.get("id")), line)
    paraphrases = c.strings(obj, "paraphrase_prompts")
    neighbor_prompts = c.strings(obj, "neighborhood_prompts")
    c.done()
    neighborhood = tuple(Neighbor(p, targets["target_true"]) for p in neighbor_prompts)
    return Fact(fact_id, subject, prompt, targets["target_new"], targets["target_true"], paraphrases,
                neighborhood, line)


def from_zsre(obj: dict, line: int = 0) -> Fact:
    """A zsRE record (MEND/MEMIT eval file), by the MEMIT convention (see the module docstring).

    The prompt is ``src`` with the subject's first occurrence replaced by ``{}``.
    """
    c = _Checker(line)
    fact_id = _fact_id(c, obj.get("id", obj.get("case_id")), line)
    subject = c.text(obj, "subject")
    src = c.text(obj, "src")
    prompt = None
    if subject is not None and src is not None:
        if "{}" in src:
            c.add("src", "must not contain '{}'")
        elif subject not in src:
            c.add("subject", f"{subject!r} does not occur verbatim in src {src!r}")
        else:
            prompt = src.replace(subject, "{}", 1)
    answers = obj.get("answers")
    target_new = None
    if not isinstance(answers, list) or not answers:
        c.add("answers", "must be a non-empty list of strings")
    elif not isinstance(answers[0], str) or not answers[0].strip():
        c.add("answers[0]", "must be a non-empty string")
    else:
        target_new = answers[0]
    rephrase = c.text(obj, "rephrase", required=False)
    loc = c.text(obj, "loc", required=False)
    loc_ans = c.text(obj, "loc_ans", required=False)
    if ("loc" in obj) != ("loc_ans" in obj):
        c.add("loc" if "loc_ans" in obj else "loc_ans", "loc and loc_ans must be given together")
    c.done()
    neighborhood = (Neighbor(loc + "?", loc_ans),) if loc is not None and loc_ans is not None else ()
    return Fact(fact_id, subject, prompt, target_new, None, (rephrase,) if rephrase else (), neighborhood, line)


def detect_format(obj: dict) -> str:
    """counterfact, zsre or covedit, from the fields of one record."""
    if "requested_rewrite" in obj:
        return "counterfact"
    if "src" in obj and "answers" in obj:
        return "zsre"
    return "covedit"


_PARSERS = {"covedit": _from_covedit, "counterfact": from_counterfact, "zsre": from_zsre}


def parse_fact(obj: dict, line: int = 0, fmt: str = "auto") -> Fact:
    """One record in any supported format as a Fact; raises FactsError listing its problems."""
    if fmt not in FORMATS:
        raise DataError(f"Unknown facts format {fmt!r}: use one of {', '.join(FORMATS)}.")
    if not isinstance(obj, dict):
        raise FactsError([Problem(line, None, f"must be a JSON object, got {type(obj).__name__}")])
    try:
        return _PARSERS[detect_format(obj) if fmt == "auto" else fmt](obj, line)
    except _Invalid as e:
        raise FactsError(e.problems) from None


# ------------------------------------------------------------------------------------------ whole files

def _cross_checks(facts: list[Fact]) -> list[Problem]:
    """Problems between lines: repeated ids, and the same subject + prompt asked for two targets."""
    problems = []
    ids: dict[str, int] = {}
    seen: dict[tuple[str, str], Fact] = {}
    for f in facts:
        if f.id in ids and f.id != f"line{f.line}":
            problems.append(Problem(f.line, "id", f"{f.id!r} is already used on line {ids[f.id]}"))
        ids.setdefault(f.id, f.line)
        key = (f.subject.strip(), f.prompt)
        first = seen.setdefault(key, f)
        if first is not f and first.target_new.strip() != f.target_new.strip():
            problems.append(Problem(
                f.line, "target_new",
                f"conflicts with line {first.line}: the same subject and prompt are asked to give "
                f"{f.target_new!r} here and {first.target_new!r} there"))
    return problems


def _tokenizer_check(facts: list[Fact], tokenizer) -> list[Problem]:
    """The subject must be locatable in the tokens of its rewrite prompt (keys are read there)."""
    from covedit.pipeline.keys import encode_with_subject  # noqa: PLC0415 (keys imports torch; facts need not)

    problems = []
    for f in facts:
        try:
            encode_with_subject(tokenizer, [f.prompt], [f.subject])
        except DataError as e:
            problems.append(Problem(f.line, "subject", str(e)))
    return problems


def read_facts(path: str | Path, fmt: str = "auto", tokenizer=None) -> list[Fact]:
    """Every fact in a JSONL file, or FactsError listing every problem (nothing is returned then).

    Blank lines are skipped. With ``tokenizer``, also checks that each subject's tokens can be found in
    its rewrite prompt.
    """
    if fmt not in FORMATS:
        raise DataError(f"Unknown facts format {fmt!r}: use one of {', '.join(FORMATS)}.")
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"Facts file {path} does not exist.")
    source = path.name
    facts: list[Fact] = []
    problems: list[Problem] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                problems.append(Problem(number, None, f"is not UTF-8 text ({e.reason} at byte {e.start})"))
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(Problem(number, None, f"malformed JSON ({e.msg} at column {e.colno})"))
                continue
            try:
                facts.append(parse_fact(obj, number, fmt))
            except FactsError as e:
                problems.extend(e.problems)
    problems.extend(_cross_checks(facts))
    if tokenizer is not None:
        problems.extend(_tokenizer_check(facts, tokenizer))
    if problems:
        raise FactsError(sorted(problems, key=lambda p: p.line), source)
    if not facts:
        raise DataError(f"Facts file {path} holds no facts.")
    log.info("read %d facts from %s", len(facts), path)
    return facts


def facts_sha256(path: str | Path) -> str:
    """sha256 of the facts file's bytes, for the edit manifest."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"Facts file {path} does not exist.")
    return file_sha256(path)
