"""The benchmarks' per-fact target cache: stored once, reused for any subset, keyed by what determines it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import benchmarks.common as common
from covedit.pipeline.facts import Fact
from covedit.pipeline.hparams import TargetHParams
from covedit.pipeline.targets import compute_targets

FACTS = [Fact("a", "Eiffel Tower", "The {} is located in", "Rome"),
         Fact("b", "Louvre", "The {} is a museum in", "Berlin")]
HP = TargetHParams(steps=4, lr=0.05, clamp_norm_factor=10.0)


def test_cache_optimises_each_fact_once_and_serves_subsets(tiny, tmp_path, monkeypatch):
    calls = []

    def counting(loaded, facts, layer, hp, templates):
        calls.append(len(facts))
        return compute_targets(loaded, facts, layer, hp, templates)

    monkeypatch.setattr(common, "compute_targets", counting)
    cache = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path)
    first = cache.get(FACTS[:1])
    both = cache.get(FACTS)
    again = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path).get(FACTS[::-1])  # a new process, reversed
    assert calls == [1, 1]  # fact a once, then only fact b
    assert torch.equal(both.z[0], first.z[0]) and torch.equal(again.z[0], both.z[1])
    direct = compute_targets(tiny, FACTS, 2, HP, ["{}"])
    torch.testing.assert_close(both.z, direct.z, rtol=1e-4, atol=1e-5)  # a fact's target ignores its batch


def test_cache_key_changes_with_the_hyperparameters(tiny, tmp_path):
    a = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path)
    b = common.TargetCache(tiny, 2, TargetHParams(steps=5), ["{}"], folder=tmp_path)
    c = common.TargetCache(tiny, 1, HP, ["{}"], folder=tmp_path)
    assert len({a.path, b.path, c.path}) == 3


def test_a_rule_added_later_keeps_older_caches_readable(tiny, tmp_path):
    """stop_when_top1 off is the rule the older caches hold: it stays out of the key, so the file name is the
    one the code before the option gave (pinned: computed at commit 122439a); on, it is another cache."""
    off = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path)
    assert off.path.name == {"tiny-llama-0": "targets-87de071581ad6115.pt",
                             "tiny-gpt2-0": "targets-d8b1debb53c7c08b.pt"}[tiny.model_id]
    on = common.TargetCache(tiny, 2, dataclasses.replace(HP, stop_when_top1=True), ["{}"], folder=tmp_path)
    assert on.path != off.path


def test_fill_saves_each_batch_so_a_killed_run_resumes(tiny, tmp_path, monkeypatch):
    calls = []

    def dies_on_second_batch(loaded, facts, layer, hp, templates):
        calls.append([f.id for f in facts])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed while optimising the second batch
        return compute_targets(loaded, facts, layer, hp, templates)

    monkeypatch.setattr(common, "compute_targets", dies_on_second_batch)
    cache = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path)
    try:
        cache.fill(FACTS, save_every=1)
    except KeyboardInterrupt:
        pass
    resumed = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path)  # a new process
    assert [f.id for f in resumed.missing(FACTS)] == ["b"] and resumed.seconds(FACTS[:1]) > 0
    monkeypatch.setattr(common, "compute_targets", compute_targets)
    resumed.fill(FACTS, save_every=1)
    assert resumed.missing(FACTS) == [] and resumed.seconds(FACTS) > resumed.seconds(FACTS[:1])
    assert calls == [["a"], ["b"]]


def test_seconds_is_unknown_when_a_fact_was_stored_without_its_time(tiny, tmp_path):
    cache = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path)
    cache.put(FACTS[:1], compute_targets(tiny, FACTS[:1], 2, HP, ["{}"]))
    cache.put(FACTS[1:], compute_targets(tiny, FACTS[1:], 2, HP, ["{}"]), seconds=2.0)
    assert cache.seconds(FACTS[1:]) == 2.0 and cache.seconds(FACTS) is None


def test_record_seconds_shares_a_measured_batch_time_over_untimed_targets(tiny, tmp_path):
    from benchmarks.warm_targets import record_seconds

    cache = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path)
    cache.put(FACTS, compute_targets(tiny, FACTS, 2, HP, ["{}"]))  # stored without a time
    z = cache.get(FACTS).z
    record_seconds(cache, FACTS, 6.0)
    reopened = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path)
    assert reopened.seconds(FACTS[:1]) == 3.0 and reopened.seconds(FACTS) == 6.0
    assert torch.equal(reopened.get(FACTS).z, z)  # the targets themselves untouched
    cache.put(FACTS[:1], cache.get(FACTS[:1]))  # one untimed again, the other timed: not one batch
    with pytest.raises(SystemExit):
        record_seconds(cache, FACTS, 6.0)


def test_leakage_counts_the_new_object_only_as_a_whole_word():
    from benchmarks.locality_study import names_object
    assert not names_object(" ab\ncombiner: 1 en en", "C")  # zsRE's new object "C" is not in "combiner"
    assert names_object("The capital is C, of course", "C")
    assert names_object(" London, the capital", " london ")
    assert not names_object(" Londoner by birth", "London")
    assert names_object("sung by a mezzo-soprano.", "mezzo-soprano")
    assert names_object("(C++)", "C++")


def test_merged_facts_are_cached_by_their_whole_group(tiny, tmp_path, monkeypatch):
    """Two facts with one subject and target share a δ: asked together they are optimised together; asked
    alone, one of them is a different (unmerged) fact and is optimised again, never read from the pair."""
    twin = Fact("a2", "Eiffel Tower", "Where is the {}? In", "Rome")
    calls = []

    def counting(loaded, facts, layer, hp, templates):
        calls.append([f.id for f in facts])
        return compute_targets(loaded, facts, layer, hp, templates)

    monkeypatch.setattr(common, "compute_targets", counting)
    cache = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path)
    pair = cache.get([FACTS[0], FACTS[1], twin])
    assert calls == [["a", "a2", "b"]]  # whole groups, in group order
    torch.testing.assert_close(pair.delta[0], pair.delta[2], rtol=0, atol=1e-6)
    alone = cache.get([FACTS[0]])
    assert calls[-1] == ["a"]
    assert not torch.allclose(alone.z[0], pair.z[0])
    torch.testing.assert_close(cache.get([twin, FACTS[0]]).z, pair.z[[2, 0]], rtol=0, atol=0)


def test_relation_benchmark_facts_are_what_it_says():
    """Deterministic; each subject edited once; neighbours never edited; counterfactual targets of the same
    relation; neighbour prompts of the fact's own relation."""
    from benchmarks.relation_locality import RELATIONS, build
    facts, neighbours = build(100)
    again, _ = build(100)
    assert [f.id for f in facts] == [f.id for f in again] and len(facts) == 100
    subjects = [f.subject for f in facts]
    assert len(set(subjects)) == len(subjects)
    held = {p for pairs in neighbours.values() for p, _ in pairs}
    assert not any(f.rewrite_prompt() in held for f in facts)
    for f in facts:
        rel = f.id.split(":")[0]
        assert f.target_new != f.target_true and f.prompt == RELATIONS[rel][1]
        assert all(n.prompt in {p for p, _ in neighbours[rel]} for n in f.neighborhood)
    assert len({f.id.split(":")[0] for f in facts}) == 4


def test_two_processes_filling_one_cache_keep_each_others_targets(tiny, tmp_path):
    """Two caches of the same key opened before either stores (two benchmarks at once): each save merges
    with the file, so the second save does not drop the first one's entries."""
    a = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path)
    b = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path)
    a.put(FACTS[:1], compute_targets(tiny, FACTS[:1], 2, HP, ["{}"]))
    b.put(FACTS[1:], compute_targets(tiny, FACTS[1:], 2, HP, ["{}"]))
    fresh = common.TargetCache(tiny, 2, HP, ["{}"], folder=tmp_path)
    assert fresh.missing(FACTS[:1]) == [] and fresh.missing(FACTS[1:]) == []


def test_held_out_slice_shares_no_subject_with_the_tuning_slice(tmp_path):
    """zsRE records cluster by subject: the held-out slice skips every subject of the tuning slice."""
    import json
    rows = [("A", "q1 {}?"), ("A", "q2 {}?"), ("B", "q1 {}?"), ("A", "q3 {}?"), ("C", "q1 {}?"), ("B", "q2 {}?"),
            ("D", "q1 {}?"), ("C", "q1 {}?")]  # the last repeats (C, q1): one fact
    path = tmp_path / "zsre.jsonl"
    path.write_text("".join(json.dumps({"subject": s, "src": q.replace("{}", s), "answers": ["x"], "alt": "y",
                                        "rephrase": q.replace("{}", s), "loc": "nq question: who?", "loc_ans": "z"})
                            + "\n" for s, q in rows))
    tuning = common.fact_slice(path, 2, 0)
    assert [(f.subject, f.prompt) for f in tuning] == [("A", "q1 {}?"), ("A", "q2 {}?")]
    held = common.fact_slice(path, 3, 2)
    assert [(f.subject, f.prompt) for f in held] == [("B", "q1 {}?"), ("C", "q1 {}?"), ("B", "q2 {}?")]
    assert [f.subject for f in common.fact_slice(path, 2, 3)] == ["C", "D"]  # A and B are tuning subjects
    with pytest.raises(SystemExit, match="only 2 facts"):
        common.fact_slice(path, 3, 3)


def test_delta_at_every_position_is_the_edited_model_and_at_none_the_original(tiny):
    """The hook that applies an edit at chosen tokens only (diagnose_writes --sites, relation_leak_sites)."""
    g = torch.Generator().manual_seed(0)
    d_model, d_ff = tiny.down_weight(1).shape
    factors = {1: (torch.randn(d_model, 2, generator=g, dtype=torch.float64) * 0.3,
                   torch.randn(2, d_ff, generator=g, dtype=torch.float64) * 0.3)}
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    with torch.no_grad():
        original = tiny.model(input_ids=ids).logits
        with common.delta_at(tiny, factors, torch.zeros(1, 6, dtype=torch.bool)):
            none = tiny.model(input_ids=ids).logits
        with common.delta_at(tiny, factors, torch.ones(1, 6, dtype=torch.bool)):
            every = tiny.model(input_ids=ids).logits
        mask = torch.tensor([[False, False, False, True, True, True]])
        with common.delta_at(tiny, factors, mask):
            late = tiny.model(input_ids=ids).logits
        W = tiny.down_weight(1)
        W += (factors[1][0] @ factors[1][1]).to(W.dtype)
        edited = tiny.model(input_ids=ids).logits
    assert torch.equal(none, original)
    torch.testing.assert_close(every, edited, rtol=1e-4, atol=1e-5)  # and no hook was left on
    assert not torch.allclose(every, original, atol=1e-3)
    torch.testing.assert_close(late[:, :3], original[:, :3], rtol=0, atol=0)  # causal: earlier tokens untouched
    assert not torch.allclose(late[:, 3:], original[:, 3:], atol=1e-3)


@pytest.mark.parametrize("with_bos", [False, True])
@pytest.mark.parametrize("template, subject, subject_tokens", [
    ("What university did {} attend?", "Watts Humphrey", ["ĠWatts", "ĠHumph", "rey"]),
    ("{} was born in", "Watts Humphrey", ["W", "atts", "ĠHumph", "rey"]),  # at the start, no leading space
    ("Who founded {}?", "Bob", ["ĠBob"]),  # followed directly by "?"
])
def test_diagnose_sites_split_the_teacher_forced_prompt(tokenizer, bos_tokenizer, with_bos, template, subject,
                                                        subject_tokens):
    """diagnose_writes --sites: the subject's tokens, the prompt's other tokens and the answer tokens
    partition the teacher-forced input, by position."""
    from benchmarks.diagnose_writes import forced
    from conftest import build_tiny

    tok = bos_tokenizer if with_bos else tokenizer
    f = forced(build_tiny("llama", tok), template, subject, "Illinois Institute of Technology")
    tokens = tok.convert_ids_to_tokens(f.inputs[0].tolist())
    at = {site: [i for i, m in enumerate(mask) if m] for site, mask in f.sites.items()}
    n, p = len(tokens), f.prompt_len
    assert [tokens[i] for i in at["subject tokens"]] == subject_tokens
    assert at["subject's last token"] == [at["subject tokens"][-1]] == [f.subject_last]
    assert at["answer tokens"] == list(range(p, n)) and [tokens[i] for i in at["answer tokens"]] == [
        "ĠIllinois", "ĠInstitute", "Ġof"]  # the last answer token is only predicted, never an input
    assert at["prompt's other tokens"] == [i for i in range(p) if i not in at["subject tokens"]]
    assert at["all but the subject"] == at["prompt's other tokens"] + at["answer tokens"]
    assert at["everywhere"] == list(range(n))
    if with_bos:
        assert at["prompt's other tokens"][0] == 0 and tokens[0] == tok.bos_token


@pytest.mark.parametrize("with_bos", [False, True])
@pytest.mark.parametrize("template, subject, subject_tokens", [
    ("The capital of {} is", "Burkina Faso", ["ĠBurk", "ina", "ĠF", "aso"]),
    ("{} is a city in the country of", "Kenya", ["Ken", "ya"]),  # at the start, no leading space
])
def test_relation_leak_sites_positions_cover_the_prompt_as_the_edit_tokenises_it(
        tokenizer, bos_tokenizer, with_bos, template, subject, subject_tokens):
    """relation_leak_sites: the subject's tokens are the ones the edit finds (encode_with_subject), the last
    token is the one that predicts, the rest are the other tokens; one mask entry per token of the prompt."""
    from benchmarks.relation_leak_sites import positions

    tok = bos_tokenizer if with_bos else tokenizer
    ids = tok(template.replace("{}", subject)).input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    masks = positions(tok, template, subject)
    assert all(len(m) == len(ids) for m in masks.values())
    at = {c: [i for i, m in enumerate(mask) if m] for c, mask in masks.items()}
    assert [tokens[i] for i in at["subject tokens"]] == subject_tokens
    assert at["last token"] == [len(ids) - 1] and at["unedited"] == [] and at["everywhere"] == list(range(len(ids)))
    assert sorted(at["subject tokens"] + at["last token"] + at["other tokens"]) == list(range(len(ids)))


def test_update_sizes_are_the_norms_of_delta_w_k_at_each_site(tokenizer):
    """diagnose_writes --sizes: per layer and site, the mean ‖ΔW k‖ (and over ‖W k‖) at the site's positions,
    computed directly from the captured keys; the model's weights are left as they were."""
    from benchmarks.diagnose_writes import SITES, forced, update_sizes
    from conftest import build_tiny

    tiny = build_tiny("llama", tokenizer)
    g = torch.Generator().manual_seed(0)
    d_model, d_ff = tiny.down_weight(1).shape
    factors = {1: (torch.randn(d_model, 2, generator=g, dtype=torch.float64),
                   torch.randn(2, d_ff, generator=g, dtype=torch.float64))}
    f = forced(tiny, "What university did {} attend?", "Watts Humphrey", "Illinois Institute of Technology")
    before = tiny.down_weight(1).clone()
    sizes = update_sizes(tiny, [(f, None)], factors, ["Who wrote Hamlet?"])
    assert torch.equal(tiny.down_weight(1), before)
    keys = []
    handle = tiny.down_proj(1).register_forward_hook(lambda m, a, o: keys.append((a[0][0].double(), o[0].double())))
    with torch.no_grad():
        tiny.model(input_ids=f.inputs)
    handle.remove()
    k, wk = keys[0]
    delta = (k @ factors[1][1].T @ factors[1][0].T).norm(dim=-1)
    for site in SITES[1:-1]:
        at = torch.tensor(f.sites[site])
        at[0] = False  # the first position is left out
        got = sizes["1"][site]
        assert got["positions"] == int(at.sum()) > 0
        assert got["delta_norm"] == pytest.approx(float(delta[at].mean()), rel=1e-9)
        assert got["delta_norm_median"] == pytest.approx(float(delta[at].median()), rel=1e-9)
        assert got["delta_over_wk"] == pytest.approx(float((delta[at] / wk.norm(dim=-1)[at]).mean()), rel=1e-9)
    assert sizes["1"]["neighbourhood prompts"]["positions"] == len(tokenizer("Who wrote Hamlet?").input_ids) - 1


def test_edit_variants_starts_every_call_from_the_same_weights(tiny, monkeypatch):
    """Each variant is edited from the weights the call began with, and the weights are put back once the last
    variant is consumed, so a second call does not stack its edits on the first call's last one."""
    import covedit.pipeline.evaluate as evaluate
    import covedit.pipeline.memit as memit

    layers = [1, 2]
    seen = []

    def fake_memit(loaded, facts, layers_, covs, lam, target_hp, templates, clock, **kwargs):
        seen.append({layer: loaded.down_weight(layer).detach().clone() for layer in layers_})
        with torch.no_grad():
            for layer in layers_:
                loaded.down_weight(layer).add_(lam)
        return dataclasses.make_dataclass("Out", ["target_info"])({"realised": [1.0]})

    class Fake:
        aggregate, next_tokens, fluency = {}, None, None

    monkeypatch.setattr(memit, "run_memit", fake_memit)
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: Fake())
    monkeypatch.setattr(evaluate, "drift", lambda *a, **k: {"mean_kl": 0.0, "top1_changed_pct": 0.0})
    monkeypatch.setattr(common, "templates_for", lambda loaded, hp: ["{}"])
    hp = dataclasses.make_dataclass("HP", ["layers", "target"])(layers, None)
    original = {layer: tiny.down_weight(layer).detach().clone() for layer in layers}
    variants = [("a", {"lam": 1.0}), ("b", {"lam": 2.0})]
    for _ in range(2):
        for label, _row in common.edit_variants(tiny, hp, [FACTS[0]], None, {}, variants, Fake(), False):
            edited = tiny.down_weight(1).detach()
            assert torch.equal(edited, original[1] + {"a": 1.0, "b": 2.0}[label])  # in place while yielded
        for layer in layers:
            assert torch.equal(tiny.down_weight(layer).detach(), original[layer])  # put back after the last
    assert len(seen) == 4
    for before_edit in seen:
        for layer in layers:
            assert torch.equal(before_edit[layer], original[layer])
