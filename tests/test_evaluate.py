"""Evaluation you can trust: n-gram entropy by hand, drift that is exactly zero for the same model and
positive after a change, absent metrics left out of aggregates, reports written atomically with readable
plots, a probe of what the real model knows, and the ``evaluate`` / ``probe`` commands end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from conftest import build_tiny
from covedit.pipeline.errors import CannotWrite
from covedit.pipeline.evaluate import (aggregate, drift, evaluate_model, fact_metrics, greedy_continuations,
                                      load_prompts, n_gram_entropy, next_token_logprobs, probe, words)
from covedit.pipeline.facts import Fact, Neighbor
from covedit.pipeline.report import build_report, report_from_summary, write_report

ROOT = Path(__file__).resolve().parents[1]
FACTS = [
    Fact("eiffel", "Eiffel Tower", "The {} is located in the city of", "Rome", "Paris",
         ("Where is the Eiffel Tower? It is in",), (Neighbor("The Louvre is located in the city of", "Paris"),)),
    Fact("jobs", "Steve Jobs", "{} was the founder of", "Microsoft", "Apple"),  # no paraphrase, no neighbour
    Fact("zsre", "Watts Humphrey", "What university did {} attend?", "Illinois Institute of Technology",
         None, ("What university did Watts Humphrey go to?",)),  # zsRE-like: no true target
]
SHORT = ["The city is known for", "Music has always been"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run many small forwards: one thread avoids the synchronisation that dominates them
    (tens of times faster on a busy 2-core machine). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})


def test_n_gram_entropy_matches_a_hand_computation():
    tokens = ["a", "b", "a", "b", "c"]
    # bigrams: ab ×2, ba, bc -> H2 = -(1/2 log2 1/2 + 2 · 1/4 log2 1/4) = 1.5 bits
    # trigrams: aba, bab, abc, all once -> H3 = log2 3
    expected = (2 / 3 * 1.5 + 4 / 3 * math.log2(3)) / 2
    assert n_gram_entropy(tokens) == pytest.approx(expected, abs=1e-12)
    assert n_gram_entropy(["x"] * 10) == 0.0  # one repeated n-gram carries no information
    assert n_gram_entropy(["only"]) == 0.0  # too short for any n-gram
    assert words("Paris, France's capital.") == ["Paris", ",", "France", "'", "s", "capital", "."]


def test_shipped_prompt_sets():
    unrelated, flu = load_prompts("unrelated_prompts.txt"), load_prompts("fluency_prompts.txt")
    assert len(unrelated) >= 40 and len(flu) == 10
    assert "The antidote for heparin overdose is" in unrelated
    assert not any(p.startswith("#") for p in unrelated + flu) and len(set(unrelated)) == len(unrelated)


def test_drift_of_a_model_against_itself_is_exactly_zero(tiny):
    a, b = next_token_logprobs(tiny), next_token_logprobs(tiny)
    d = drift(a, b)
    assert d["mean_kl"] == 0.0 and d["max_kl"] == 0.0 and d["top1_changed_pct"] == 0.0
    assert d["n_prompts"] == len(load_prompts("unrelated_prompts.txt")) == a.logprobs.shape[0]


def test_drift_after_changing_a_weight_is_positive(tiny):
    before = next_token_logprobs(tiny)
    with torch.no_grad():
        tiny.down_weight(1).add_(torch.randn_like(tiny.down_weight(1)))
    after = next_token_logprobs(tiny)
    d = drift(before, after)
    assert d["mean_kl"] > 1e-6 and all(r["kl"] >= 0 for r in d["per_prompt"])
    # the batched distributions equal one prompt at a time (padding does not leak)
    one = next_token_logprobs(tiny, [before.prompts[3]])
    torch.testing.assert_close(one.logprobs[0], after.logprobs[3], rtol=1e-4, atol=1e-5)


def test_top1_changed_counts_prompts_whose_argmax_moved(tokenizer):
    m = build_tiny("llama", tokenizer)
    before = next_token_logprobs(m, SHORT)
    after = next_token_logprobs(m, SHORT)
    after.logprobs[1] = torch.log_softmax(-after.logprobs[1], -1)  # its argmax moves to the least likely token
    d = drift(before, after)
    assert d["top1_changed_pct"] == 50.0 and d["per_prompt"][0]["kl"] == 0.0 and d["per_prompt"][1]["kl"] > 0


def test_absent_metrics_are_none_and_aggregate_counts_only_facts_that_have_them(tiny):
    rows = fact_metrics(tiny, FACTS)
    eiffel, jobs, zsre = rows
    assert jobs["generalization_success"] is None and jobs["generalization_acc"] is None
    assert jobs["specificity_success"] is None and jobs["specificity_acc"] is None
    assert zsre["efficacy_success"] is None and zsre["generalization_success"] is None
    assert zsre["efficacy_acc"] is not None and zsre["generalization_acc"] is not None
    assert all(eiffel[m] is not None for m in ("efficacy_success", "generalization_success", "specificity_success"))
    agg = aggregate(rows)
    assert agg["n_facts"] == 3
    assert agg["n_efficacy_success"] == 2 and agg["n_generalization_success"] == 1
    assert agg["n_specificity_success"] == 1 and agg["n_generalization_acc"] == 2 and agg["n_efficacy_acc"] == 3
    assert agg["generalization_success"] == 100 * eiffel["generalization_success"]
    assert agg["efficacy_acc"] == pytest.approx(100 * sum(r["efficacy_acc"] for r in rows) / 3)
    assert aggregate([])["efficacy_success"] is None


def test_greedy_continuations_batched_equal_one_at_a_time(tiny):
    prompts = ["The capital of France is", "Hi", "One two three four five six seven"]
    together = greedy_continuations(tiny, prompts, max_new_tokens=6)
    assert together == [greedy_continuations(tiny, [p], max_new_tokens=6)[0] for p in prompts]
    assert all(t for t in together)


@pytest.fixture(scope="module")
def evaluations(tokenizer):
    """An unchanged and a perturbed tiny llama, evaluated on FACTS with a short fluency set."""
    base = build_tiny("llama", tokenizer)
    other = build_tiny("llama", tokenizer)
    with torch.no_grad():
        other.down_weight(2).add_(0.5 * torch.randn_like(other.down_weight(2)))
    opts = dict(fluency_prompts=SHORT, max_new_tokens=12)
    return evaluate_model(base, FACTS, **opts), evaluate_model(other, FACTS, **opts)


def test_evaluate_model_bundles_everything(evaluations):
    before, after = evaluations
    assert [r["id"] for r in after.per_fact] == ["eiffel", "jobs", "zsre"]
    assert after.aggregate["n_generalization_success"] == 1
    assert after.fluency["n_prompts"] == 2 and after.fluency["ge"] == pytest.approx(100 * after.fluency["ngram_entropy"])
    gen = after.fluency["generations"][0]
    assert gen["ngram_entropy"] == n_gram_entropy(words(gen["prompt"] + gen["continuation"]))
    d = build_report(after, before)["drift"]
    assert d["mean_kl"] > 0 and d["n_prompts"] == after.next_tokens.logprobs.shape[0]
    assert build_report(before, before)["drift"]["mean_kl"] == 0.0
    json.dumps(after.to_dict())  # JSON-safe


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).shape[0] > 100


def test_report_files_tables_and_plots(evaluations, tmp_path):
    before, after = evaluations
    out = tmp_path / "reports" / "r1"
    data = build_report(after, before, labels=("base", "edited"), update_norms={"2": 1.5, "3": 0.25})
    assert write_report(out, data) == out
    assert sorted(p.name for p in out.iterdir()) == ["metrics.png", "p_new.png", "report.json", "report.md",
                                                      "update_norms.png"]
    for png in ("metrics.png", "p_new.png", "update_norms.png"):
        assert _is_png(out / png)
    md = (out / "report.md").read_text()
    for heading in ("Success rate: P(new) > P(true)", "Top-1 token accuracy, teacher-forced", "Drift on unrelated prompts",
                    "## Fluency", "## Update norms", "## Per fact"):
        assert heading in md
    assert "| metric | measured on | base | edited | facts |" in md
    assert "| generalization | paraphrases: P(new) > P(true) | – | – | 1 |" not in md  # one fact has it: a number
    assert "| jobs |" in md and "– → –" in md  # absent metrics shown as absent
    saved = json.loads((out / "report.json").read_text())
    assert saved["after"]["aggregate"]["n_efficacy_success"] == 2
    assert saved["drift"]["mean_kl"] == pytest.approx(data["drift"]["mean_kl"])
    assert saved["plots"] == ["p_new.png", "metrics.png", "update_norms.png"]
    # a second report replaces the first; nothing temporary is left next to it
    write_report(out, build_report(after))
    assert not (out / "update_norms.png").exists() and "base" not in json.loads((out / "report.json").read_text())["labels"].values()
    assert [p.name for p in out.parent.iterdir()] == ["r1"]


def test_unwritable_report_dir_raises_cannot_write_and_leaves_nothing(evaluations, tmp_path):
    _, after = evaluations
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CannotWrite):
        write_report(blocker / "report", build_report(after))
    with pytest.raises(CannotWrite):
        write_report(blocker, build_report(after))
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CannotWrite):
        write_report(other, build_report(after))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "someone-elses"]
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_report_from_a_batch_edit_summary(evaluations, tmp_path):
    before, after = evaluations
    summary = {"method": "memit", "n_facts": 3, "model": "tiny", "layers": [2, 3],
               "evaluation": {"before": before.aggregate, "after": after.aggregate,
                              "per_fact": [{"id": b["id"], "before": b, "after": a}
                                           for b, a in zip(before.per_fact, after.per_fact)]},
               "update_norms": {"2": 3.0, "3": 1.0}}
    write_report(tmp_path / "r", report_from_summary(summary))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| metric | measured on | unedited | edited | facts |" in md and "Not measured" in md
    assert _is_png(tmp_path / "r" / "update_norms.png") and _is_png(tmp_path / "r" / "p_new.png")


@pytest.mark.slow
def test_probe_knows_the_capital_of_france(smol):
    facts = [Fact("fr", "France", "The capital of {} is", "Berlin", "Paris"),
             Fact("z", "France", "What is the capital of {}?", "Paris")]
    fr, z = probe(smol, facts, n_tokens=3)
    assert fr["knows"] is True and fr["checked"] == "target_true" and fr["continuation"].strip().startswith("Paris")
    assert fr["p_true"] > 0.5 > fr["p_new"]
    assert z["checked"] == "target_new" and z["p_true"] is None


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_dir):
    """The shared tiny llama folder (conftest) and a facts file mixing our schema and a zsRE record."""
    facts = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "eiffel", "subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome",
         "target_true": "Paris", "paraphrases": ["The Eiffel Tower stands in"]},
        {"src": "What university did Watts Humphrey attend?", "subject": "Watts Humphrey",
         "answers": ["Illinois Institute of Technology"], "rephrase": "Where did Watts Humphrey study?",
         "loc": "nq question: who sings the song", "loc_ans": "Elvis"}]) + "\n")
    return tiny_dir, facts


def test_cli_evaluate_and_probe_on_a_saved_tiny_model(tiny_folder, tmp_path):
    model, facts = tiny_folder
    r = cli("evaluate", "--model", model, "--base-model", model, "--facts", facts, "--report", tmp_path / "rep",
            "--fluency-tokens", 8, "-q")
    assert r.returncode == 0, r.stderr
    assert "drift on 42 unrelated prompts: mean KL 0 nats, top-1 token changed on 0.0 %" in r.stdout
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["drift"]["mean_kl"] == 0.0 and data["after"]["aggregate"]["n_efficacy_success"] == 1
    r = cli("probe", facts, "--model", model, "--json", "-q")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["checked"] for x in rows] == ["target_true", "target_new"]
    r = cli("probe", facts, "--model", model, "-q")
    assert r.returncode == 0 and "zsRE records target_new is the true answer" in r.stdout


def test_cli_evaluate_missing_model_exits_66(tmp_path):
    r = cli("evaluate", "--model", tmp_path / "no-such-model", "-q")
    assert r.returncode == 66 and "error" in r.stderr and "Traceback" not in r.stderr


def test_the_unedited_reference_is_measured_once_then_read_back(tiny, tmp_path, monkeypatch):
    """evaluate_model(reference_cache=...): the unrelated-prompt distributions and the fluency of an
    unedited model are measured on the first call and read back, bit for bit, on the next; a changed
    down-projection (an edit) or generation length is another key; an unreadable file is measured again."""
    from covedit.pipeline import evaluate as ev

    prompts, fl = ["The capital of France is", "Water boils at"], ["Once upon a time"]
    kw = dict(unrelated_prompts=prompts, fluency_prompts=fl, max_new_tokens=5, reference_cache=tmp_path)
    first = evaluate_model(tiny, [], **kw)
    assert first.extra == {"reference_cached": False} and len(list(tmp_path.glob("reference-*.pt"))) == 1
    plain = evaluate_model(tiny, [], unrelated_prompts=prompts, fluency_prompts=fl, max_new_tokens=5)

    def no_model_call(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(ev, "next_token_logprobs", no_model_call)
    monkeypatch.setattr(ev, "fluency", no_model_call)
    second = evaluate_model(tiny, [], **kw)
    assert second.extra == {"reference_cached": True}
    assert torch.equal(second.next_tokens.logprobs, plain.next_tokens.logprobs)
    assert second.next_tokens.top1 == plain.next_tokens.top1 and second.fluency == plain.fluency
    monkeypatch.undo()

    with torch.no_grad():
        tiny.down_weight(1).add_(1e-3)
    assert evaluate_model(tiny, [], **kw).extra == {"reference_cached": False}
    assert evaluate_model(tiny, [], **{**kw, "max_new_tokens": 6}).extra == {"reference_cached": False}
    assert len(list(tmp_path.glob("reference-*.pt"))) == 3
    for path in tmp_path.glob("reference-*.pt"):
        path.write_bytes(b"not a torch file")
    assert evaluate_model(tiny, [], **kw).extra == {"reference_cached": False}
    assert evaluate_model(tiny, [], **kw).extra == {"reference_cached": True}
