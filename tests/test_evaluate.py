"""Evaluation you can trust (pipeline/evaluate.py): n-gram entropy by hand, drift that is exactly zero for the
same model and positive after a change, absent metrics left out of aggregates, everything bundled by
evaluate_model, a probe of what the real model knows, and the unedited model's reference kept between runs.
Reports are in test_report.py, the ``evaluate`` / ``probe`` commands in test_cli.py."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

from conftest import EVAL_FACTS as FACTS
from conftest import SHORT, build_tiny
from covedit.pipeline.evaluate import (GEN_METRICS, aggregate, drift, evaluate_model, fact_metrics,
                                      greedy_continuations, load_prompts, n_gram_entropy, next_token_logprobs, probe,
                                      says, score, words)
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
    # a budget per prompt: each row cut to its own, as if generated alone with it; token ids as prompts
    limits = [2, 6, 4]
    assert greedy_continuations(tiny, prompts, limits) == [
        greedy_continuations(tiny, [p], max_new_tokens=n)[0] for p, n in zip(prompts, limits)]
    ids = [tiny.tokenizer(p).input_ids for p in prompts]
    assert greedy_continuations(tiny, ids, limits) == greedy_continuations(tiny, prompts, limits)


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


# ---------------------------------------------------------------------------------- generation family, ripple

def test_says_matches_the_target_as_a_whole_word():
    from covedit.pipeline.evaluate import says
    assert says(" Rome, Italy.", "Rome") and says("(rome)", "Rome") and says("ROME", " rome ")
    assert says("Rome's walls", "Rome") and says("a Rome-based firm", "Rome")  # an apostrophe or hyphen ends a word
    assert not says(" Romeo and Juliet", "Rome") and not says("Romes", "Rome") and not says("Jerome", "Rome")
    assert says("in New\n  York city", "New York") and says("new york.", "New  York") and not says("NewYork", "New York")
    assert says("Paris 2014", "2014") and not says("20145", "2014") and not says("x_Rome", "Rome")
    assert says("written in C++, mostly", "C++") and says("St. Peter's Basilica", "St. Peter's")
    assert says("Zürich!", "zürich") and not says("", "Rome") and not says("Rome", "  ")
    assert not says("odderodderodder", "odder")  # what the tiny gpt2 generates: no word boundary inside


def test_new_and_old_targets_inside_one_another_are_told_apart():
    from covedit.pipeline.evaluate import says_new_old
    assert says_new_old(" Rome, not Paris", "Rome", "Paris") == (True, True)
    assert says_new_old(" Paris", "Rome", None) == (False, None)
    # the longer target is matched first and blanked out: "Vatican City" is not also "Vatican"
    assert says_new_old(" the Vatican City", "Vatican", "Vatican City") == (False, True)
    assert says_new_old(" the Vatican.", "Vatican", "Vatican City") == (True, False)
    assert says_new_old(" Vatican City and the Vatican", "Vatican", "Vatican City") == (True, True)
    assert says_new_old(" Paris, Texas", "Paris, Texas", "Paris") == (True, False)
    assert says_new_old(" rome", "Rome", "ROME") == (True, True)  # the same word twice: said is said


def _canned(replies: dict, calls: list):
    """A stand-in for greedy_continuations: the reply to each prompt from ``replies`` (a chat prompt, given as
    token ids, under the key "chat"), recording (prompts, max_new_tokens) of every call."""
    def greedy(loaded, prompts, max_new_tokens=50, batch_size=16):
        calls.append((list(prompts), max_new_tokens))
        return [replies["chat"] if isinstance(p, list) else replies[p] for p in prompts]
    return greedy


def test_generation_family_scores_the_greedy_texts_exactly(tiny, monkeypatch):
    """Every prompt is generated once, with a budget of the longer target's tokens + GEN_EXTRA_TOKENS (a chat
    reply: + the question's tokens), and each metric is the share of texts naming its target."""
    from covedit.pipeline import evaluate as ev
    from covedit.pipeline.facts import Neighbor, Ripple
    from covedit.pipeline.keys import target_token_ids
    tok = tiny.tokenizer
    eiffel = Fact("eiffel", "Eiffel Tower", "The {} is located in the city of", "Rome", "Paris",
                  ("Where is the Eiffel Tower? It is in", "The Eiffel Tower stands in"),
                  (Neighbor("The Louvre is located in the city of", "Paris"),), 0,
                  (Ripple("The Eiffel Tower is located in the country of", "Italy"),
                   Ripple("The Eiffel Tower overlooks the river", "Tiber")))
    zsre = Fact("zsre", "Watts Humphrey", "What university did {} attend?", "Illinois Institute of Technology")
    replies = {"The Eiffel Tower is located in the city of": " Rome, Italy.",
               "Where is the Eiffel Tower? It is in": " Romeo's city",
               "The Eiffel Tower stands in": " rome, not Paris",
               "The Eiffel Tower is located in the country of": " Italy",
               "The Eiffel Tower overlooks the river": " Seine",
               "What university did Watts Humphrey attend?": " Illinois  Institute of\nTechnology",
               "chat": "The Eiffel Tower is in Paris."}
    calls: list = []
    monkeypatch.setattr(ev, "greedy_continuations", _canned(replies, calls))
    e, z = ev.fact_metrics(tiny, [eiffel, zsre])
    assert {k: e[k] for k in ev.GEN_METRICS} == {
        "efficacy_gen": 1.0, "generalization_gen": 0.5, "efficacy_gen_old_gone": 1.0,
        "generalization_gen_old_gone": 0.5, "chat_gen": 0.0, "chat_gen_old_gone": 0.0, "ripple_gen": 0.5}
    assert {k: z[k] for k in ev.GEN_METRICS} == {
        "efficacy_gen": 1.0, "generalization_gen": None, "efficacy_gen_old_gone": None,
        "generalization_gen_old_gone": None, "chat_gen": 0.0, "chat_gen_old_gone": None, "ripple_gen": None}
    assert e["generations"] == {"rewrite": " Rome, Italy.", "paraphrases": [" Romeo's city", " rome, not Paris"],
                                "chat": "The Eiffel Tower is in Paris.", "ripple": [" Italy", " Seine"]}
    assert z["ripple_acc"] is None and e["ripple_acc"] is not None
    # one call, every prompt once with its own budget; the neighbourhood is not generated
    n = {t: len(target_token_ids(tok, t)) for t in ("Rome", "Paris", "Italy", "Tiber", zsre.target_new)}
    q = {f.id: len(tok(f.rewrite_prompt(), add_special_tokens=False).input_ids) for f in (eiffel, zsre)}
    extra, chat_extra = ev.GEN_EXTRA_TOKENS, ev.CHAT_EXTRA_TOKENS
    [(prompts, limits)] = calls
    budgets = {}
    for p, budget in zip(prompts, limits, strict=True):
        budgets.setdefault("chat" if isinstance(p, list) else p, []).append(budget)
    assert budgets == {
        "The Eiffel Tower is located in the city of": [max(n["Rome"], n["Paris"]) + extra],
        "Where is the Eiffel Tower? It is in": [max(n["Rome"], n["Paris"]) + extra],
        "The Eiffel Tower stands in": [max(n["Rome"], n["Paris"]) + extra],
        "The Eiffel Tower is located in the country of": [n["Italy"] + extra],
        "The Eiffel Tower overlooks the river": [n["Tiber"] + extra],
        "What university did Watts Humphrey attend?": [n[zsre.target_new] + extra],
        "chat": sorted([q["eiffel"] + max(n["Rome"], n["Paris"]) + chat_extra, q["zsre"] + n[zsre.target_new] + chat_extra]),
    }
    assert limits[-2:] == budgets["chat"] and limits[:-2] == sorted(limits[:-2])  # by budget, chat last
    agg = ev.aggregate([e, z])
    assert (agg["efficacy_gen"], agg["n_efficacy_gen"], agg["generalization_gen"], agg["n_generalization_gen"]) == (100.0, 2, 50.0, 1)
    assert (agg["chat_gen"], agg["n_chat_gen"], agg["chat_gen_old_gone"], agg["n_chat_gen_old_gone"]) == (0.0, 2, 0.0, 1)
    assert (agg["ripple_gen"], agg["n_ripple_gen"], agg["n_ripple_acc"]) == (50.0, 1, 1)


def test_chat_prompt_is_the_models_own_template(tiny, tokenizer):
    from covedit.pipeline.evaluate import chat_prompt_ids
    ids = chat_prompt_ids(tokenizer, "Where is the Eiffel Tower?")
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nWhere is the Eiffel Tower?<|im_end|>\n<|im_start|>assistant\n")
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert chat_prompt_ids(plain, "Where is the Eiffel Tower?") is None


def test_generation_family_on_a_tiny_model(tokenizer, tmp_path):
    """The real greedy texts of the tiny llama (the tiny gpt2 says "odderodderodder...", no word at all): a fact whose new target is the first word the model says and
    whose true target its second one is generated-efficacious with its old target not gone; the texts are
    those of greedy_continuations; a tokenizer without a chat template has no chat measure (None, not 0);
    the unedited reference cache leaves the per-fact family alone; generation=False leaves it out."""
    from covedit.pipeline.facts import Ripple
    from covedit.pipeline.keys import target_token_ids
    tiny = build_tiny("llama", tokenizer)
    prompt = "The Eiffel Tower is located in the city of"
    first, second = re.findall(r"\w+", greedy_continuations(tiny, [prompt], max_new_tokens=12)[0])[:2]
    fact = Fact("f", "Eiffel Tower", "The {} is located in the city of", first, second,
                ripple=(Ripple("The Eiffel Tower is located in the country of", "Italy"),))
    kw = dict(unrelated_prompts=["Water boils at"], fluency_prompts=["Once upon a time"], max_new_tokens=4,
              reference_cache=tmp_path)
    cold = evaluate_model(tiny, [fact], **kw)
    warm = evaluate_model(tiny, [fact], **kw)
    assert (cold.extra, warm.extra) == ({"reference_cached": False}, {"reference_cached": True})
    assert cold.per_fact == warm.per_fact
    row = warm.per_fact[0]
    assert (row["efficacy_gen"], row["efficacy_gen_old_gone"], row["generalization_gen"]) == (1.0, 0.0, None)
    budget = max(len(target_token_ids(tiny.tokenizer, t)) for t in (first, second)) + 4
    assert row["generations"]["rewrite"] == greedy_continuations(tiny, [prompt], max_new_tokens=budget)[0]
    assert row["chat_gen"] in (0.0, 1.0) and row["generations"]["chat"]
    assert row["ripple_acc"] == score(tiny, ["The Eiffel Tower is located in the country of"], ["Italy"])[0].token_acc
    assert row["ripple_gen"] == float(says(row["generations"]["ripple"][0], "Italy"))
    assert warm.aggregate["n_ripple_acc"] == warm.aggregate["n_chat_gen"] == 1

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    nc = evaluate_model(build_tiny("llama", plain), [fact], unrelated=False, with_fluency=False)
    assert nc.per_fact[0]["chat_gen"] is None and nc.per_fact[0]["generations"]["chat"] is None
    assert nc.aggregate["chat_gen"] is None and nc.aggregate["n_chat_gen"] == 0

    off = evaluate_model(tiny, [fact], unrelated=False, with_fluency=False, generation=False)
    assert all(off.per_fact[0][m] is None for m in GEN_METRICS) and "generations" not in off.per_fact[0]
    assert off.per_fact[0]["ripple_acc"] == row["ripple_acc"]  # teacher-forced: measured all the same
    assert all(off.aggregate[m] is None and off.aggregate[f"n_{m}"] == 0 for m in GEN_METRICS)


def test_facts_without_ripple_prompts_have_no_ripple_metrics(evaluations):
    _, after = evaluations
    assert all(r["ripple_acc"] is None and r["ripple_gen"] is None for r in after.per_fact)
    assert after.aggregate["ripple_acc"] is None and after.aggregate["n_ripple_gen"] == 0
    assert after.aggregate["n_efficacy_gen"] == 3 and after.aggregate["n_efficacy_gen_old_gone"] == 2
    assert after.aggregate["n_generalization_gen"] == 2 and after.aggregate["n_chat_gen"] == 3


@pytest.mark.parametrize("head_slicing", [True, False])
def test_scores_read_the_output_head_only_where_needed_and_equal_full_logits(tiny, monkeypatch, head_slicing):
    """score and next_token_logprobs compute logits only at the positions they read (or, for a model whose
    forward cannot skip them, slice after): the numbers equal the full forward's, one prompt at a time."""
    from covedit.pipeline.keys import target_token_ids
    from covedit.pipeline.models import LoadedModel

    monkeypatch.setattr(LoadedModel, "takes_logits_to_keep", property(lambda self: head_slicing))
    prompts = ["The capital of France is", "A", "Water boils at a temperature of", "The Eiffel Tower is in"]
    targets = [" Paris", " lot of things", " 100 degrees", " Rome"]
    got = score(tiny, prompts, targets, batch_size=3)
    nexts = next_token_logprobs(tiny, prompts, batch_size=3)
    for k, (p, t) in enumerate(zip(prompts, targets)):
        p_ids, t_ids = tiny.tokenizer(p).input_ids, target_token_ids(tiny.tokenizer, t)
        with torch.no_grad():
            full = torch.log_softmax(tiny.model(input_ids=torch.tensor([p_ids + t_ids])).logits[0].float(), -1)
        lp = full[torch.arange(len(p_ids) - 1, len(p_ids) + len(t_ids) - 1), t_ids]
        assert got[k].logprob == pytest.approx(float(lp.sum()), abs=1e-5)
        assert got[k].nll == pytest.approx(float(-lp.mean()), abs=1e-5)
        top = full[len(p_ids) - 1:len(p_ids) + len(t_ids) - 1].argmax(-1)
        assert got[k].token_acc == float((top == torch.tensor(t_ids)).float().mean())
        torch.testing.assert_close(nexts.logprobs[k], full[len(p_ids) - 1], rtol=0, atol=1e-5)


def test_one_decoding_pass_gives_what_separate_measurements_give(tiny, tmp_path):
    """evaluate_model runs the generation family's and fluency's greedy generations in one pass: the same
    texts and numbers as generation_metrics and fluency called on their own; a cached reference run keeps
    the generation family and reads fluency back unchanged."""
    from covedit.pipeline.evaluate import fluency, generation_metrics

    opts = dict(fluency_prompts=SHORT, max_new_tokens=12)
    together = evaluate_model(tiny, FACTS, **opts)
    assert together.fluency == fluency(tiny, SHORT, max_new_tokens=12)
    alone = generation_metrics(tiny, FACTS)
    assert [{m: r[m] for m in GEN_METRICS + ["generations"]} for r in together.per_fact] == alone
    first = evaluate_model(tiny, FACTS, reference_cache=tmp_path, **opts)
    again = evaluate_model(tiny, FACTS, reference_cache=tmp_path, **opts)
    assert (first.extra, again.extra) == ({"reference_cached": False}, {"reference_cached": True})
    assert first.fluency == again.fluency == together.fluency
    assert first.per_fact == again.per_fact == together.per_fact
