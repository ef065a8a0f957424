"""Reading facts: every bad line is reported with its line number and field and nothing is returned;
the CounterFact and zsRE importers give exactly the facts they should; formats may mix per line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from covedit.pipeline.errors import DataError, MissingInput
from covedit.pipeline.facts import Fact, FactsError, Neighbor, Ripple, parse_fact, facts_sha256, read_facts

DATA = Path(__file__).parent / "data"
EXAMPLES = Path(__file__).parent.parent / "examples" / "facts.jsonl"

GOOD = {"id": "f1", "subject": "Eiffel Tower", "prompt": "The {} is located in the city of",
        "target_new": "Rome", "target_true": "Paris",
        "paraphrases": ["Where is the Eiffel Tower? It is in"],
        "neighborhood": [{"prompt": "The Louvre is located in the city of", "target": "Paris"}]}


def write(tmp_path: Path, lines: list) -> Path:
    """A facts file: dicts become JSON lines, strings are written as they are."""
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n", encoding="utf-8")
    return path


def problems_of(path: Path, **kw) -> list[tuple[int, str | None]]:
    with pytest.raises(FactsError) as info:
        read_facts(path, **kw)
    assert info.value.exit_code == 65
    return [(p.line, p.field) for p in info.value.problems]


def test_our_schema_reads_exactly(tmp_path):
    path = write(tmp_path, [GOOD, "", {"subject": "Louvre", "prompt": "{} is in", "target_new": " London "}])
    assert read_facts(path) == [
        Fact("f1", "Eiffel Tower", "The {} is located in the city of", "Rome", "Paris",
             ("Where is the Eiffel Tower? It is in",), (Neighbor("The Louvre is located in the city of", "Paris"),), 1),
        Fact("line3", "Louvre", "{} is in", " London ", None, (), (), 3),
    ]


def test_ripple_prompts_are_read_like_the_neighbourhood(tmp_path):
    """``ripple``: optional, a list of {prompt, target}; kept in order, after ``line`` in the record, so facts
    built by position without it are unchanged."""
    ripple = [{"prompt": "The Eiffel Tower is located in the country of", "target": "Italy"},
              {"prompt": "The Eiffel Tower overlooks the river", "target": "Tiber"}]
    path = write(tmp_path, [{**GOOD, "ripple": ripple}, {**GOOD, "id": "f2", "ripple": []}])
    first, second = read_facts(path)
    assert first.ripple == (Ripple("The Eiffel Tower is located in the country of", "Italy"),
                            Ripple("The Eiffel Tower overlooks the river", "Tiber"))
    assert first == Fact("f1", "Eiffel Tower", "The {} is located in the city of", "Rome", "Paris",
                         ("Where is the Eiffel Tower? It is in",),
                         (Neighbor("The Louvre is located in the city of", "Paris"),), 1, first.ripple)
    assert second.ripple == () and read_facts(write(tmp_path, [GOOD]))[0].ripple == ()


def test_bad_ripple_entries_are_all_listed(tmp_path):
    path = write(tmp_path, [{**GOOD, "ripple": [{"target": "Italy"}, 5, {"prompt": "A", "target": ""}]}])
    with pytest.raises(FactsError) as info:
        read_facts(path)
    assert info.value.exit_code == 65
    assert str(info.value).splitlines() == [
        "3 problems in facts.jsonl, no facts were read:",
        "facts.jsonl line 1, field 'ripple[0].prompt': is required",
        "facts.jsonl line 1, field 'ripple[1]': must be an object with 'prompt' and 'target'",
        "facts.jsonl line 1, field 'ripple[2].target': must not be empty",
    ]


def test_rewrite_prompt_does_not_format():
    fact = Fact("x", "{weird} name", "The {} is", "a")
    assert fact.rewrite_prompt() == "The {weird} name is"


BAD_LINES = [
    ('{"subject": "Eiffel Tower", "prompt": "The {} is"', None, "malformed JSON"),
    ("[1, 2]", None, "must be a JSON object"),
    ({"prompt": "The {} is", "target_new": "Rome"}, "subject", "is required"),
    ({"subject": "  ", "prompt": "The {} is", "target_new": "Rome"}, "subject", "must not be empty"),
    ({"subject": "X", "prompt": 5, "target_new": "Rome"}, "prompt", "must be a string"),
    ({"subject": "X", "prompt": "The X is", "target_new": "Rome"}, "prompt", "exactly one '{}'"),
    ({"subject": "X", "prompt": "{} and {}", "target_new": "Rome"}, "prompt", "exactly one '{}'"),
    ({"subject": "X", "prompt": "The {} is", "target_new": ""}, "target_new", "must not be empty"),
    ({"subject": "X", "prompt": "The {} is", "target_new": "Rome", "target_true": 3}, "target_true", "must be a string"),
    ({"subject": "X", "prompt": "The {} is", "target_new": "Rome", "paraphrases": "X is"}, "paraphrases", "list of strings"),
    ({"subject": "X", "prompt": "The {} is", "target_new": "Rome", "paraphrases": ["ok", 1]}, "paraphrases[1]", "non-empty string"),
    ({"subject": "X", "prompt": "The {} is", "target_new": "Rome", "neighborhood": ["Y is"]}, "neighborhood[0]", "'prompt' and 'target'"),
    ({"subject": "X", "prompt": "The {} is", "target_new": "Rome", "neighborhood": [{"prompt": "Y is"}]},
     "neighborhood[0].target", "is required"),
    ({"subject": "X", "prompt": "The {} is", "target_new": "Rome", "id": [1]}, "id", "string or an integer"),
    ({"subject": "X", "prompt": "The {} is", "target_new": "Rome", "ripple": "X is in Italy"}, "ripple",
     "must be a list of {'prompt', 'target'} objects, got str"),
    ({"subject": "X", "prompt": "The {} is", "target_new": "Rome", "ripple": ["X is in the country of"]}, "ripple[0]",
     "must be an object with 'prompt' and 'target'"),
    ({"subject": "X", "prompt": "The {} is", "target_new": "Rome", "ripple": [{"prompt": "X is in the country of"}]},
     "ripple[0].target", "is required"),
    ({"subject": "X", "prompt": "The {} is", "target_new": "Rome",
      "ripple": [{"prompt": "A", "target": "B"}, {"prompt": " ", "target": "Italy"}]}, "ripple[1].prompt", "must not be empty"),
    ({"subject": "X", "prompt": "The {} is", "target_new": "Rome", "ripple": [{"prompt": "A", "target": 3}]},
     "ripple[0].target", "must be a string, got int"),
    ({"requested_rewrite": {"prompt": "The {} is", "subject": "X", "target_true": {"str": "Paris"}}},
     "requested_rewrite.target_new", "'str'"),
    ({"requested_rewrite": {"prompt": "The {} is", "subject": "X", "target_new": {"str": ""}, "target_true": {"str": "P"}}},
     "requested_rewrite.target_new.str", "must not be empty"),
    ({"src": "Who made Y?", "subject": "X", "answers": ["Z"]}, "subject", "does not occur verbatim in src"),
    ({"src": "Who made X?", "subject": "X", "answers": []}, "answers", "non-empty list"),
]


@pytest.mark.parametrize("bad, field, message", BAD_LINES)
def test_each_problem_names_line_and_field(tmp_path, bad, field, message):
    path = write(tmp_path, [GOOD, "", bad, {**GOOD, "id": "f4", "subject": "Louvre"}])
    with pytest.raises(FactsError) as info:
        read_facts(path)
    assert [(p.line, p.field) for p in info.value.problems] == [(3, field)]
    where = "facts.jsonl line 3" + (f", field {field!r}" if field else "")
    assert str(info.value).startswith(f"{where}: ")
    assert message in str(info.value)


def test_all_problems_are_listed_and_nothing_is_returned(tmp_path):
    path = write(tmp_path, [
        GOOD,
        {"subject": "X", "prompt": "no braces", "target_new": "Rome"},
        "not json",
        {"subject": "", "prompt": "{}", "target_new": 7, "paraphrases": [None]},
    ])
    assert problems_of(path) == [(2, "prompt"), (3, None), (4, "subject"), (4, "target_new"), (4, "paraphrases[0]")]


def test_message_lists_the_first_twenty(tmp_path):
    path = write(tmp_path, ["{"] * 25)
    with pytest.raises(FactsError) as info:
        read_facts(path)
    text = str(info.value)
    assert len(info.value.problems) == 25
    assert text.splitlines()[0] == "25 problems in facts.jsonl, no facts were read:"
    assert "facts.jsonl line 20: malformed JSON" in text and "line 21:" not in text
    assert text.splitlines()[-1] == "... and 5 more problems"


def test_conflicting_targets_name_both_lines(tmp_path):
    path = write(tmp_path, [
        GOOD,
        {**GOOD, "id": "f2", "target_new": " Rome "},  # the same target: a duplicate, not a conflict
        {**GOOD, "id": "f3", "target_new": "Berlin"},
    ])
    with pytest.raises(FactsError) as info:
        read_facts(path)
    [problem] = info.value.problems
    assert (problem.line, problem.field) == (3, "target_new")
    assert "line 1" in problem.message and "'Berlin'" in problem.message and "'Rome'" in problem.message


def test_repeated_ids_are_reported(tmp_path):
    path = write(tmp_path, [GOOD, {**GOOD, "subject": "Louvre"}])
    assert problems_of(path) == [(2, "id")]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(MissingInput):
        read_facts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no facts"):
        read_facts(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="Unknown facts format"):
        read_facts(write(tmp_path, [GOOD]), fmt="csv")


def test_not_utf8_is_a_problem_with_its_line(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    assert problems_of(path) == [(2, None)]


def test_zsre_importer_follows_memit():
    facts = read_facts(DATA / "zsre_sample.jsonl", fmt="zsre")
    assert len(facts) == 5
    assert facts[0] == Fact(
        id="line1", subject="Watts Humphrey", prompt="What university did {} attend?",
        target_new="Illinois Institute of Technology", target_true=None,
        paraphrases=("What university did Watts Humphrey take part in?",),
        neighborhood=(Neighbor("nq question: who played desmond doss father in hacksaw ridge?", "Hugo Weaving"),),
        line=1)
    assert facts[3].prompt == "What artist created {}?" and facts[3].target_new == "Sleater-Kinney"


def test_zsre_subject_repeated_in_src_uses_first_occurrence():
    fact = parse_fact({"src": "Is X the X?", "subject": "X", "answers": ["yes"]}, 7)
    assert (fact.prompt, fact.id, fact.paraphrases, fact.neighborhood) == ("Is {} the X?", "line7", (), ())


def test_counterfact_importer():
    facts = read_facts(DATA / "counterfact_sample.jsonl", fmt="counterfact")
    assert facts[0] == Fact(
        id="0", subject="Danielle Darrieux", prompt="The mother tongue of {} is",
        target_new="English", target_true="French",
        paraphrases=("Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
                     "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"),
        neighborhood=(Neighbor("The mother tongue of Léon Blum is", "French"),
                      Neighbor("The native language of Montesquieu is", "French"),
                      Neighbor("François Bayrou, a native", "French")),
        line=1)
    assert facts[2] == Fact("2", "Toko Yasuda", "{}, the", "pope", "bishop", (), (), 3)


def test_auto_detects_format_per_line(tmp_path):
    counterfact = (DATA / "counterfact_sample.jsonl").read_text(encoding="utf-8").splitlines()[1]
    zsre = (DATA / "zsre_sample.jsonl").read_text(encoding="utf-8").splitlines()[2]
    path = write(tmp_path, [zsre, GOOD, counterfact])
    facts = read_facts(path)
    assert [(f.id, f.subject, f.target_new, f.target_true) for f in facts] == [
        ("line1", "Denny Herzig", "defender", None),
        ("f1", "Eiffel Tower", "Rome", "Paris"),
        ("1", "Edwin of Northumbria", "Islam", "Christianity"),
    ]
    # a forced format reads every line as that format
    assert problems_of(path, fmt="covedit") == [(1, "prompt"), (1, "target_new"), (3, "subject"), (3, "prompt"),
                                                (3, "target_new")]


def test_examples_validate_with_the_real_tokenizer(tokenizer):
    facts = read_facts(EXAMPLES, tokenizer=tokenizer)
    eiffel = facts[0]
    assert (eiffel.subject, eiffel.target_new, eiffel.target_true) == ("Eiffel Tower", "Rome", "Paris")
    assert eiffel.paraphrases and Neighbor("The capital of France is", "Paris") in eiffel.neighborhood
    assert len({f.id for f in facts}) == len(facts) >= 5


class _NoOffsets:
    """A fast tokenizer stand-in whose tokens cover no characters: the subject cannot be located."""

    is_fast = True
    pad_token_id = 0

    def __call__(self, texts, **_):
        return {"input_ids": [[1, 2] for _ in texts], "offset_mapping": [[(0, 0), (0, 0)] for _ in texts]}


def test_tokenizer_check_reports_unlocatable_subjects(tmp_path):
    path = write(tmp_path, [GOOD])
    with pytest.raises(FactsError) as info:
        read_facts(path, tokenizer=_NoOffsets())
    assert [(p.line, p.field) for p in info.value.problems] == [(1, "subject")]
    assert "covers no token" in str(info.value)


def test_sha256_is_of_the_bytes(tmp_path):
    path = write(tmp_path, [GOOD])
    assert facts_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_shipped_ripple_set_validates(tokenizer):
    """benchmarks/data/ripple_facts.jsonl: every fact a counterfactual with a true target, one paraphrase, one
    or two neighbourhood prompts and one or two ripple prompts; no city a fact moves is an answer elsewhere."""
    facts = read_facts(EXAMPLES.parents[1] / "benchmarks" / "data" / "ripple_facts.jsonl", tokenizer=tokenizer)
    assert len(facts) == 30 and sum(len(f.ripple) for f in facts) == 42
    assert all(f.target_true and f.target_true != f.target_new and len(f.paraphrases) == 1 for f in facts)
    assert all(1 <= len(f.neighborhood) <= 2 and 1 <= len(f.ripple) <= 2 for f in facts)
    moved = {f.subject for f in facts if f.prompt == "{} is a city in the country of"}
    answers = {t for f in facts for t in [f.target_new, *(n.target for n in f.neighborhood), *(r.target for r in f.ripple)]}
    assert len(moved) == 6 and not moved & answers
