"""Evaluation you can trust (pipeline/evaluate.py): n-gram entropy by hand, drift that is exactly zero for the
same model and positive after a change, absent metrics left out of aggregates, everything bundled by
evaluate_model, a probe of what the real model knows, and the unedited model's reference kept between runs.
Reports are in test_report.py, the ``evaluate`` / ``probe`` commands in test_cli.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import EVAL_FACTS as FACTS
from conftest import SHORT, build_tiny
from covedit.pipeline.evaluate import (aggregate, drift, evaluate_model, fact_metrics, greedy_continuations,
                                      load_prompts, n_gram_entropy, next_token_logprobs, probe, words)
from covedit.pipeline.facts import Fact
from covedit.pipeline.report import build_report


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run many small forwards: one thread avoids the synchronisation that dominates them
    (tens of times faster on a busy 2-core machine). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.slow
def test_probe_knows_the_capital_of_france(smol):
    facts = [Fact("fr", "France", "The capital of {} is", "Berlin", "Paris"),
             Fact("z", "France", "What is the capital of {}?", "Paris")]
    fr, z = probe(smol, facts, n_tokens=3)
    assert fr["knows"] is True and fr["checked"] == "target_true" and fr["continuation"].strip().startswith("Paris")
    assert fr["p_true"] > 0.5 > fr["p_new"]
    assert z["checked"] == "target_new" and z["p_true"] is None


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
