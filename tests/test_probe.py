"""``covedit probe --wrong-only --write FILE`` (cli.py, pipeline/correct.py): which facts have a known true
answer, what the model says now, the written facts file (our schema, read back by ``read_facts``, written
atomically), and bad input (one sentence, the README's exit code, nothing written). The world facts of the
error-correction benchmark (benchmarks/relation_locality.world_facts)."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from conftest import cli
from covedit import cli as cli_module
from covedit.pipeline import atomic
from covedit.pipeline import evaluate as ev
from covedit.pipeline.atomic import replace_file
from covedit.pipeline.correct import (Classified, classify, correction, fact_record, model_answer, true_answer,
                                      write_facts, zsre_lines)
from covedit.pipeline.errors import CannotWrite
from covedit.pipeline.facts import Fact, Neighbor, read_facts

ONE_THREAD = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

EIFFEL = {"id": "eiffel", "subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome",
          "target_true": "Paris", "paraphrases": ["The Eiffel Tower stands in"],
          "neighborhood": [{"prompt": "The Louvre is in", "target": "Paris"}]}
ZSRE = {"src": "What university did Watts Humphrey attend?", "subject": "Watts Humphrey",
        "answers": ["Illinois Institute of Technology"], "rephrase": "Where did Watts Humphrey study?",
        "loc": "nq question: who sings the song", "loc_ans": "Elvis"}
NO_TRUTH = {"id": "jobs", "subject": "Steve Jobs", "prompt": "{} founded", "target_new": "Microsoft"}


def invoke(argv: list) -> tuple[int, str, str]:
    """The command line in this process: (exit code, stdout, stderr); an internal error is raised."""
    result = CliRunner().invoke(cli_module.app, [str(a) for a in argv])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def facts_file(tmp_path):
    """Our schema with a true answer, a zsRE record (line 3, after a blank line), and our schema without one."""
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(EIFFEL) + "\n\n" + json.dumps(ZSRE) + "\n" + json.dumps(NO_TRUTH) + "\n")
    return path


# ------------------------------------------------------------------------------------------ the pieces

def test_model_answer_is_the_first_clause_of_the_continuation():
    assert model_answer(" Paris, the capital of France") == "Paris"
    assert model_answer(" the University of Chicago.\nIt was") == "the University of Chicago"
    assert model_answer("\n\nRome") == "Rome"  # leading blank lines are not an answer
    assert model_answer(" one two three four five six seven") == "one two three four five"  # at most 5 words
    assert model_answer("") is None and model_answer("  \n") is None and model_answer(" .") is None


def test_true_answer_is_target_true_or_a_zsre_answer_and_nothing_else():
    with_true = Fact("a", "X", "{} is in", "Rome", "Paris")
    without = Fact("b", "X", "{} is in", "Rome")
    assert true_answer(with_true, new_is_true=False) == "Paris" and true_answer(with_true, new_is_true=True) == "Paris"
    assert true_answer(without, new_is_true=True) == "Rome"  # a zsRE record: its answer is the true one
    assert true_answer(without, new_is_true=False) is None  # a counterfactual without target_true: unknown


def test_correction_keeps_the_record_and_puts_what_the_model_says_as_target_true():
    f = Fact("eiffel", "Eiffel Tower", "The {} is in", "Rome", "Paris", ("Where is the Eiffel Tower?",),
             (Neighbor("The Louvre is in", "Paris"),), line=4)
    c = correction(f, "Paris", " London, England")
    assert c == Fact("eiffel", "Eiffel Tower", "The {} is in", "Paris", "London", f.paraphrases, f.neighborhood, 4)
    assert correction(f, "Paris", "").target_true is None  # says nothing
    assert correction(f, "Paris", " paris.").target_true is None  # says the truth itself (case aside)


def test_ripple_prompts_follow_the_true_answer_only():
    from covedit.pipeline.facts import Ripple
    ripple = (Ripple("The Eiffel Tower is in the country of", "Italy"),)
    counterfactual = Fact("e", "Eiffel Tower", "The {} is in", "Rome", "Paris", ripple=ripple)
    assert correction(counterfactual, "Paris", " London").ripple == ()  # Italy follows from Rome, not Paris
    true = Fact("k", "Kenya", "The capital of {} is", "Nairobi", "Nairobi",
                ripple=(Ripple("The capital of Kenya is in the country of", "Kenya"),))
    assert correction(true, "Nairobi", " Lagos").ripple == true.ripple
    assert fact_record(true)["ripple"] == [{"prompt": "The capital of Kenya is in the country of", "target": "Kenya"}]


def test_classify_sorts_known_wrong_and_unknown():
    facts = [Fact("k", "France", "The capital of {} is", "Berlin", "Paris", line=1),
             Fact("w", "Kenya", "The capital of {} is", "Paris", "Nairobi", line=2),
             Fact("z", "Watts Humphrey", "What university did {} attend?", "Illinois Institute of Technology", line=3),
             Fact("u", "Steve Jobs", "{} founded", "Microsoft", line=4)]
    rows = [{"knows": True, "continuation": " Paris"}, {"knows": False, "continuation": " Lagos, the"},
            {"knows": False, "continuation": " Harvard"}, {"knows": False, "continuation": " Apple"}]
    got = classify(facts, rows, zsre={3})
    assert got == Classified(
        wrong=[Fact("w", "Kenya", "The capital of {} is", "Nairobi", "Lagos", line=2),
               Fact("z", "Watts Humphrey", "What university did {} attend?", "Illinois Institute of Technology",
                    "Harvard", line=3)],
        known=[facts[0]], unknown=[facts[3]], truths=["Paris", "Nairobi", "Illinois Institute of Technology", None])
    assert [f.id for f in classify(facts, rows, new_is_true=True).unknown] == []  # every target_new is true
    with pytest.raises(ValueError):
        classify(facts, rows[:2])


def test_zsre_lines_by_format(facts_file):
    assert zsre_lines(facts_file, "auto") == {3}  # line 2 is blank
    assert zsre_lines(facts_file, "zsre") == {1, 3, 4}
    assert zsre_lines(facts_file, "covedit") == set() and zsre_lines(facts_file, "counterfact") == set()


def test_written_facts_read_back_as_the_same_facts(facts_file, tmp_path):
    facts = read_facts(facts_file)
    out = tmp_path / "out.jsonl"
    write_facts(out, facts)
    again = read_facts(out)
    assert [f.__class__(**{**vars(f), "line": 0}) for f in again] == [
        f.__class__(**{**vars(f), "line": 0}) for f in facts]
    assert json.loads(out.read_text().splitlines()[1]) == {
        "id": "line3", "subject": "Watts Humphrey", "prompt": "What university did {} attend?",
        "target_new": "Illinois Institute of Technology", "paraphrases": ["Where did Watts Humphrey study?"],
        "neighborhood": [{"prompt": "nq question: who sings the song?", "target": "Elvis"}]}
    assert fact_record(facts[2]) == NO_TRUTH  # no empty lists, no target_true when there is none


def test_the_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "f.jsonl"
    path.write_text("old\n")

    def fails(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", fails)
    with pytest.raises(CannotWrite, match=r"^Cannot write the facts file to .*f\.jsonl: No space left on device\.$"):
        replace_file(path, "new\n", "the facts file")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["f.jsonl"]  # no temporary file left
    monkeypatch.undo()
    replace_file(path, "new\n", "the facts file")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["f.jsonl"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # an ordinary file, not mkstemp's 0600
    with pytest.raises(CannotWrite, match=r"the folder .*nowhere does not exist\.$"):
        replace_file(tmp_path / "nowhere" / "f.jsonl", "x", "the facts file")
    with pytest.raises(CannotWrite, match=r"it is a folder\.$"):
        replace_file(tmp_path, "x", "the facts file")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ the command

def test_probe_writes_the_wrong_facts_with_their_true_answers(tiny_dir, facts_file, tmp_path):
    """The tiny random model knows nothing: both facts with a known true answer are written, the one
    without is skipped and named; target_true is the first clause of what --json shows it continuing with."""
    out = tmp_path / "wrong.jsonl"
    code, stdout, stderr = invoke(["probe", facts_file, "--model", tiny_dir, "--json", "-q"])
    assert code == 0, stderr
    rows = json.loads(stdout)
    assert [(r["id"], r["knows"], r["true_answer"], r["wrong"]) for r in rows] == [
        ("eiffel", False, "Paris", True), ("line3", False, "Illinois Institute of Technology", True),
        ("jobs", False, None, None)]
    code, stdout, stderr = invoke(["probe", facts_file, "--model", tiny_dir, "--wrong-only", "--write", out, "-q"])
    assert code == 0, stderr
    assert ("1 of 3 facts have no known true answer (no target_true, and not zsRE records, whose answer is the true "
            "one), so they cannot be corrected and are skipped: jobs.") in stdout
    assert "the model gets 2 of the 2 facts with a known true answer wrong." in stdout
    assert f"wrote 2 facts to {out} (target_new: the true answer" in stdout
    listed = [line.split()[0] for line in stdout.splitlines()[1:] if line.startswith(("eiffel", "line3", "jobs"))]
    assert listed == ["eiffel", "line3"]  # --wrong-only: the one without a true answer is not listed
    written = read_facts(out)
    said = [model_answer(r["continuation"]) for r in rows[:2]]
    assert [(f.id, f.subject, f.prompt, f.target_new, f.target_true) for f in written] == [
        ("eiffel", "Eiffel Tower", "The {} is located in", "Paris", said[0]),
        ("line3", "Watts Humphrey", "What university did {} attend?", "Illinois Institute of Technology", said[1])]
    assert written[0].paraphrases == ("The Eiffel Tower stands in",)
    assert written[0].neighborhood == (Neighbor("The Louvre is in", "Paris"),)
    assert written[1].paraphrases == ("Where did Watts Humphrey study?",)
    assert written[1].neighborhood == (Neighbor("nq question: who sings the song?", "Elvis"),)
    # --json: stdout stays one JSON list (the wrong facts); the sentences go to stderr
    code, stdout, stderr = invoke(["probe", facts_file, "--model", tiny_dir, "--wrong-only", "--write", out, "--json"])
    assert code == 0 and [r["id"] for r in json.loads(stdout)] == ["eiffel", "line3"]
    assert f"wrote 2 facts to {out}" in stderr


def test_nothing_to_correct_writes_nothing(tiny_dir, facts_file, tmp_path, monkeypatch):
    real = ev.probe

    def knows_everything(*args, **kwargs):
        return [{**r, "knows": True} for r in real(*args, **kwargs)]

    monkeypatch.setattr(ev, "probe", knows_everything)
    out = tmp_path / "wrong.jsonl"
    code, stdout, stderr = invoke(["probe", facts_file, "--model", tiny_dir, "--write", out, "-q"])
    assert code == 0, stderr
    assert f"the model gets none of the 2 facts with a known true answer wrong: nothing to correct, {out} not written." \
        in stdout
    assert not out.exists()


def test_write_known_writes_the_facts_the_model_gets_right_for_keep(tiny_dir, facts_file, tmp_path, monkeypatch):
    """--write-known: the facts with a known true answer that the model gives, as facts to keep (target_new =
    that answer, no target_true); the fact without a true answer is left out; the same file as --write is refused."""
    real = ev.probe

    def knows_the_first(*args, **kwargs):
        return [{**r, "knows": i == 0} for i, r in enumerate(real(*args, **kwargs))]

    monkeypatch.setattr(ev, "probe", knows_the_first)
    wrong, known = tmp_path / "wrong.jsonl", tmp_path / "known.jsonl"
    code, stdout, stderr = invoke(["probe", facts_file, "--model", tiny_dir, "--write", wrong, "--write-known", known,
                                   "-q"])
    assert code == 0, stderr
    assert f"wrote the 1 fact the model already knows to {known}, for `covedit batch-edit ... --keep {known}`." in stdout
    assert [(f.id, f.target_new) for f in read_facts(wrong)] == [("line3", "Illinois Institute of Technology")]
    kept = read_facts(known)
    assert [(f.id, f.subject, f.prompt, f.target_new, f.target_true) for f in kept] == [
        ("eiffel", "Eiffel Tower", "The {} is located in", "Paris", None)]
    code, _, stderr = invoke(["probe", facts_file, "--model", tiny_dir, "--write", wrong, "--write-known", wrong, "-q"])
    assert code == 2 and "--write and --write-known are the same file" in stderr


@pytest.mark.parametrize("case,code,message", [
    ("missing-facts", 66, r"Facts file .*missing\.jsonl does not exist\."),
    ("missing-folder", 73, r"Cannot write the facts file to .*no-such-dir/w\.jsonl: the folder .*no-such-dir does not exist\."),
    ("folder", 73, r"Cannot write the facts file to .*: it is a folder\."),
    ("same-file", 2, r"--write .*facts\.jsonl is the facts file being probed: write the corrections to another file\."),
    ("bad-facts", 65, r"facts\.jsonl line 1, field 'prompt': must contain exactly one '\{\}'.*"),
])
def test_bad_input_is_one_sentence_its_exit_code_and_no_file(tiny_dir, facts_file, tmp_path, case, code, message):
    import re
    write = tmp_path / "w.jsonl"
    facts = facts_file
    if case == "missing-facts":
        facts = tmp_path / "missing.jsonl"
    elif case == "missing-folder":
        write = tmp_path / "no-such-dir" / "w.jsonl"
    elif case == "folder":
        write = tmp_path
    elif case == "same-file":
        write = facts_file
    elif case == "bad-facts":
        facts_file.write_text(json.dumps({**EIFFEL, "prompt": "no braces"}) + "\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    got, stdout, stderr = invoke(["probe", facts, "--model", tiny_dir, "--wrong-only", "--write", write, "-q"])
    assert got == code
    assert re.fullmatch(r"covedit: error: " + message + r"\n", stderr), stderr
    assert "Traceback" not in stderr and sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_probe_write_then_batch_edit_reads_the_file(tiny_dir, facts_file, tmp_path):
    """The two commands of the issue, as separate processes: the written file is accepted by batch-edit's
    reader (validated against the model's tokenizer), and the exit code of a bad --write is the README's."""
    out = tmp_path / "wrong.jsonl"
    r = cli("probe", facts_file, "--model", tiny_dir, "--wrong-only", "--write", out, "-q", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert f"wrote 2 facts to {out}" in r.stdout
    from covedit.pipeline.models import describe_model
    read_facts(out, tokenizer=describe_model(str(tiny_dir), tokenizer=True).tokenizer)
    r = cli("probe", facts_file, "--model", tiny_dir, "--write", tmp_path / "nope" / "w.jsonl", "-q", env=ONE_THREAD)
    assert r.returncode == 73 and r.stderr.count("\n") == 1 and r.stderr.startswith("covedit: error: Cannot write")


# ------------------------------------------------------------------------------------------ world facts

def test_world_facts_are_every_known_answer_of_the_four_relations():
    from benchmarks.relation_locality import DATA, RELATIONS, world_facts
    data = json.loads(DATA.read_text())
    facts = world_facts()
    expected = sum(r[RELATIONS[rel][0]] is not None for rel in RELATIONS
                   for r in data["cities" if rel == "city" else "countries"])
    assert len(facts) == expected == len({f.id for f in facts})
    fr = next(f for f in facts if f.id == "capital:France")
    assert fr == Fact("capital:France", "France", "The capital of {} is", "Paris", "Paris",
                      ("The capital city of France is called",))
    assert not any(f.id == "language:Finland" for f in facts)  # null: ambiguous, skipped
    assert {f.id.split(":")[0] for f in facts} == set(RELATIONS)
    assert all(f.target_new == f.target_true and f.target_true for f in facts)


def test_the_benchmark_counts_kept_generations_over_those_that_named_the_answer_before():
    from benchmarks.error_correction import summarise
    before = [{"right_token": True, "right_generation": True}, {"right_token": True, "right_generation": False}]
    after = [{"right_token": False, "right_generation": True}, {"right_token": True, "right_generation": True}]
    s = summarise(before, after)
    assert s["right_token"] == {"before_pct": 100.0, "after_pct": 50.0, "n": 2}
    assert s["right_generation"] == {"before_pct": 50.0, "after_pct": 100.0, "n": 2}
    assert s["kept_generation"] == {"pct": 100.0, "n": 1}  # only the fact whose generation named it before
    assert s["paraphrase_right_token"] == {"before_pct": None, "after_pct": None, "n": 0}
