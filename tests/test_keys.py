"""Keys: the subject's last token is found exactly (BOS or not, left or right padding), keys equal a
hand-hooked per-prompt computation, and context templates are deterministic."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny
from covedit.pipeline import keys as keys_module
from covedit.pipeline.errors import DataError
from covedit.pipeline.keys import (KeyWalk, compute_keys, context_templates, encode_with_subject, memit_key_weights,
                                   target_token_ids)

CASES = [  # prompts of different lengths; subjects mid-prompt, at the start, with a leading space, with punctuation
    ("The {} is located in the city of", "Eiffel Tower"),
    ("{} was born in", "Danielle Darrieux"),
    ("Where is{}? It is in", " St. Peter's Basilica"),
    ("The pope says Mass at {}, which is in", "St. Peter's Basilica"),
    ("{}", "Rome"),
    ("I visited {}'s gardens", "Versailles"),
    ("{}is a city", "Paris "),
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("tok_name", ["tokenizer", "bos_tokenizer"])
def test_subject_last_points_at_the_subjects_last_token(request, tok_name, padding_side):
    tok = request.getfixturevalue(tok_name)
    prompts, subjects = [c[0] for c in CASES], [c[1] for c in CASES]
    enc = encode_with_subject(tok, prompts, subjects, padding_side=padding_side)
    width = enc.input_ids.shape[1]
    for i, (prompt, subject) in enumerate(CASES):
        text = prompt.replace("{}", subject)
        expected_ids = tok(text).input_ids
        real = enc.attention_mask[i].bool()
        assert enc.input_ids[i, real].tolist() == expected_ids  # tokenised once, as the tokenizer does
        assert (enc.input_ids[i, ~real] == tok.pad_token_id).all()
        n = len(expected_ids)
        first = width - n if padding_side == "left" else 0
        assert real.nonzero().flatten().tolist() == list(range(first, first + n))
        assert enc.last[i].item() == first + n - 1
        if tok_name == "bos_tokenizer":
            assert enc.input_ids[i, first].item() == tok.bos_token_id

        j = enc.subject_last[i].item()
        upto = tok.decode(enc.input_ids[i, first:j + 1], skip_special_tokens=True)
        assert upto.endswith(subject.strip()), (upto, subject)
        before = tok.decode(enc.input_ids[i, first:j], skip_special_tokens=True)
        assert not before.endswith(subject.strip())  # the token at j belongs to the subject
        if j < first + n - 1:  # the next token is not part of the subject
            assert text.startswith(upto) and len(tok.decode(enc.input_ids[i, first:j + 2])) > len(upto)
            assert text.index(subject.strip()) + len(subject.strip()) == len(upto)


def test_subject_last_exact_positions(tokenizer, bos_tokenizer):
    # "The" "ĠE" "iffel" "ĠTower" "Ġis": the subject ends at token 3 (4 with a BOS in front)
    enc = encode_with_subject(tokenizer, ["The {} is"], ["Eiffel Tower"])
    assert tokenizer.convert_ids_to_tokens(enc.input_ids[0].tolist()) == ["The", "ĠE", "iffel", "ĠTower", "Ġis"]
    assert enc.subject_last.tolist() == [3]
    assert encode_with_subject(bos_tokenizer, ["The {} is"], ["Eiffel Tower"]).subject_last.tolist() == [4]
    # a subject whose last word is followed by "'s" (a separate token)
    enc = encode_with_subject(tokenizer, ["{}'s dome"], ["St. Peter's Basilica"])
    assert tokenizer.convert_ids_to_tokens(enc.input_ids[0, :enc.subject_last[0] + 2].tolist())[-2:] == ["ĠBasilica", "'s"]


def test_subject_without_tokens_is_a_data_error(tokenizer):
    for prompt, subject in [("The {} is", ""), ("The {} is", "   "), ("The is", "X"), ("{} {}", "X")]:
        with pytest.raises(DataError):
            encode_with_subject(tokenizer, [prompt], [subject])


def test_target_tokens_have_a_leading_space_and_no_bos(tokenizer, bos_tokenizer):
    rome = tokenizer(" Rome", add_special_tokens=False).input_ids
    assert target_token_ids(tokenizer, "Rome") == rome == target_token_ids(tokenizer, "  Rome ")
    assert target_token_ids(bos_tokenizer, "Rome") == rome
    assert tokenizer.convert_ids_to_tokens(target_token_ids(tokenizer, "Vatican City")) == ["ĠVatican", "ĠCity"]
    with pytest.raises(DataError):
        target_token_ids(tokenizer, " ")


def manual_keys(loaded, layer: int, prompt: str, subject: str, templates: list[str]) -> torch.Tensor:
    """The reference: one unpadded prompt at a time, the subject's last token found by growing the
    decoded prefix, the down-projection input read by a hook registered by hand."""
    tok = loaded.tokenizer
    found = []
    for template in templates:
        text = template.replace("{}", prompt.replace("{}", subject))
        ids = tok(text, return_tensors="pt").input_ids
        end = text.index(prompt.replace("{}", subject)) + prompt.index("{}") + len(subject)
        j = next(j for j in range(ids.shape[1]) if len(tok.decode(ids[0, :j + 1])) >= end)
        seen = []
        handle = loaded.down_proj(layer).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            loaded.model(input_ids=ids)
        finally:
            handle.remove()
        found.append(seen[0][0, j])
    return torch.stack(found).mean(0)


TEMPLATES = ["{}", "Because of the rain. {}", "I think. {}"]
FACTS = [("The {} is located in the city of", "Eiffel Tower"), ("{} was born in", "Danielle Darrieux"),
         ("Pilgrims travel to {}", "St. Peter's Basilica")]


def test_keys_equal_a_hand_hooked_computation(tiny):
    prompts, subjects = [f[0] for f in FACTS], [f[1] for f in FACTS]
    got = compute_keys(tiny, [1, 3], prompts, subjects, TEMPLATES, batch_size=4)
    assert sorted(got) == [1, 3]
    for layer in (1, 3):
        assert got[layer].shape == (3, tiny.d_ff) and got[layer].dtype == torch.float32
        for i, (prompt, subject) in enumerate(FACTS):
            torch.testing.assert_close(got[layer][i], manual_keys(tiny, layer, prompt, subject, TEMPLATES),
                                       rtol=0, atol=1e-6)


def test_memit_key_weights_are_compute_ks_grouping():
    """compute_ks: the mean within each group of templates, then the mean over the groups."""
    assert memit_key_weights([["{}"], ["a. {}", "b. {}", "c. {}", "d. {}", "e. {}"]]) == [0.5] + [0.1] * 5
    w = memit_key_weights([["{}"], ["a. {}", "b. {}"], ["c. {}", "d. {}", "e. {}", "f. {}"]])
    assert w == pytest.approx([1 / 3, 1 / 6, 1 / 6, 1 / 12, 1 / 12, 1 / 12, 1 / 12])
    assert memit_key_weights([["{}"]]) == [1.0]


def test_weighted_keys_equal_the_weighted_hand_hooked_keys(tiny):
    prompts, subjects = [f[0] for f in FACTS], [f[1] for f in FACTS]
    weights = memit_key_weights([TEMPLATES[:1], TEMPLATES[1:]])  # 1/2, 1/4, 1/4
    got = compute_keys(tiny, [2], prompts, subjects, TEMPLATES, batch_size=4, weights=weights)[2]
    for i, (prompt, subject) in enumerate(FACTS):
        want = sum(w * manual_keys(tiny, 2, prompt, subject, [t]) for w, t in zip(weights, TEMPLATES))
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sum to 1"):
        compute_keys(tiny, [2], prompts, subjects, TEMPLATES, weights=[0.5, 0.5, 0.5])


def test_left_and_right_padding_give_the_same_keys(tiny):
    prompts, subjects = [f[0] for f in FACTS], [f[1] for f in FACTS]
    right = compute_keys(tiny, [0, 2], prompts, subjects, TEMPLATES, padding_side="right")
    left = compute_keys(tiny, [0, 2], prompts, subjects, TEMPLATES, padding_side="left")
    for layer in (0, 2):
        torch.testing.assert_close(left[layer], right[layer], rtol=0, atol=1e-5)


def test_one_forward_per_batch_that_stops_after_the_deepest_layer(tokenizer):
    loaded = build_tiny("llama", tokenizer)
    calls = {"first": 0, "after": 0}
    h1 = loaded.block(0).register_forward_hook(lambda *_: calls.__setitem__("first", calls["first"] + 1))
    h2 = loaded.block(3).register_forward_hook(lambda *_: calls.__setitem__("after", calls["after"] + 1))
    try:
        compute_keys(loaded, [2, 1], [f[0] for f in FACTS], [f[1] for f in FACTS], TEMPLATES, batch_size=4)
    finally:
        h1.remove()
        h2.remove()
    assert calls == {"first": 3, "after": 0}  # 9 rows in batches of 4; block 3 never runs


def _forwards(loaded):
    """A list that gets an entry for every forward of block 0, and the hook's handle."""
    calls = []
    return calls, loaded.block(0).register_forward_hook(lambda *_: calls.append(1))


def test_context_templates_are_deterministic(tokenizer, tmp_path, monkeypatch):
    loaded = build_tiny("llama", tokenizer)
    monkeypatch.setenv("COVEDIT_CACHE", str(tmp_path / "a"))
    first = context_templates(loaded, n_per_starter=2, length=6)
    loaded.template_cache.clear()
    monkeypatch.setenv("COVEDIT_CACHE", str(tmp_path / "b"))  # an empty cache folder: generated again
    second = context_templates(loaded, n_per_starter=2, length=6)
    assert first == second
    assert first[0] == "{}" and 1 < len(first) <= 11
    for template in first:
        assert template.count("{}") == 1 and "\n" not in template
        assert template.count("{") == template.count("}") == 1
    assert all(t.endswith(". {}") and t.startswith(keys_module.STARTERS) for t in first[1:])
    calls, handle = _forwards(loaded)
    try:
        assert context_templates(loaded, n_per_starter=2, length=6) == first  # cached: no forward
    finally:
        handle.remove()
    assert calls == []


def test_context_templates_are_kept_by_model_fingerprint_not_in_the_process(tokenizer, tmp_path, monkeypatch):
    """Templates live on the LoadedModel and on disk under the model's fingerprint: another object with the
    same weights reads them back without a forward; the same model with an edited down-projection (same
    model id) generates its own; nothing module-wide remembers them."""
    monkeypatch.setenv("COVEDIT_CACHE", str(tmp_path))
    first = build_tiny("llama", tokenizer)
    templates = context_templates(first, n_per_starter=1, length=4)
    assert first.template_cache == {(1, 4, 0): templates}
    assert len(list((tmp_path / "templates").glob("*.json"))) == 1
    other = build_tiny("llama", tokenizer)
    assert other.model_id == first.model_id and other.template_cache == {}
    calls, handle = _forwards(other)
    try:
        assert context_templates(other, n_per_starter=1, length=4) == templates
    finally:
        handle.remove()
    assert calls == [], "the same weights generated their templates again"
    edited = build_tiny("llama", tokenizer)
    with torch.no_grad():
        edited.down_weight(1).add_(1e-3)
    calls, handle = _forwards(edited)
    try:
        context_templates(edited, n_per_starter=1, length=4)
    finally:
        handle.remove()
    assert calls, "an edited model read another model's templates"
    assert len(list((tmp_path / "templates").glob("*.json"))) == 2
    assert not [name for name, value in vars(keys_module).items()  # no module-level cache of any kind
                if isinstance(value, (dict, list, set)) and not name.startswith("__")]


@pytest.mark.slow
def test_context_templates_on_the_real_model(smol):
    templates = context_templates(smol, n_per_starter=1, length=4)  # short: the KV-cached path on a real model
    assert templates[0] == "{}" and len(templates) == 1 + len(keys_module.STARTERS)
    assert all(t.count("{}") == 1 and t.startswith(keys_module.STARTERS) for t in templates[1:])


def test_prompt_token_moment_sums_every_token_but_the_subjects_last(tiny):
    """Σ k kᵀ over each rewrite prompt with its target teacher-forced (all but its last token), every
    position except the subject's last token, read one unpadded prompt at a time by hand."""
    from covedit.pipeline.keys import prompt_token_moment
    tok = tiny.tokenizer
    prompts, subjects = [f[0] for f in FACTS], [f[1] for f in FACTS]
    targets = ["Rome", "the city of Paris", "Berlin"]
    got = prompt_token_moment(tiny, 2, prompts, subjects, targets, batch_size=2)
    want = torch.zeros(tiny.d_ff, tiny.d_ff, dtype=torch.float64)
    for (prompt, subject), target in zip(FACTS, targets):
        text = prompt.replace("{}", subject)
        ids = tok(text).input_ids + tok(" " + target, add_special_tokens=False).input_ids[:-1]
        subject_last = len(tok(text[: text.index(subject) + len(subject)]).input_ids) - 1
        seen = []
        handle = tiny.down_proj(2).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            tiny.model(input_ids=torch.tensor([ids]))
        finally:
            handle.remove()
        k = seen[0][0].double()
        k = torch.cat([k[:subject_last], k[subject_last + 1:]])
        want += k.T @ k
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


WALK_LAYERS = [1, 2, 2, 3]  # resumed from a state kept by a resumed call, the same layer twice, and a gap


def _update_down(loaded, layer: int, seed: int) -> None:
    """A random low-rank change of one down-projection, as an edit makes (in place, so its version moves)."""
    g = torch.Generator().manual_seed(seed)
    w = loaded.down_weight(layer)
    with torch.no_grad():
        w += 0.5 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)


def _block_runs(loaded, layer: int) -> tuple[list, object]:
    """A list that gets an entry whenever block ``layer`` really runs (its MLP; a skipped block does not)."""
    calls = []
    return calls, loaded.down_proj(layer).register_forward_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_key_walk_equals_compute_keys_after_each_update_and_runs_the_low_blocks_once(tokenizer, model_type):
    """MEMIT's loop: keys at each layer after the updates below it. The walk must give compute_keys' keys
    at every step while running block 0 only on its first call (6 batches of 4 rows: 6 runs, not 24)."""
    loaded = build_tiny(model_type, tokenizer)
    prompts, subjects = [c[0] for c in CASES], [c[1] for c in CASES]
    weights = memit_key_weights([TEMPLATES[:1], TEMPLATES[1:]])
    walk = KeyWalk(loaded, prompts, subjects, TEMPLATES, weights, batch_size=4)
    runs = 0
    for i, layer in enumerate(WALK_LAYERS):
        calls, handle = _block_runs(loaded, 0)
        try:
            got = walk(layer)
        finally:
            handle.remove()
        runs += len(calls)
        want = compute_keys(loaded, [layer], prompts, subjects, TEMPLATES, batch_size=5, weights=weights)[layer]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        _update_down(loaded, layer, seed=i)
    assert walk.resume  # every architecture here starts from a kept state
    assert runs == 6 + 1  # + 1: the check of the first batch that resumes


def test_key_walk_without_room_to_keep_states_gives_the_same_keys(tiny):
    prompts, subjects = [c[0] for c in CASES], [c[1] for c in CASES]
    free, none_kept = (KeyWalk(tiny, prompts, subjects, TEMPLATES, batch_size=4, keep_bytes=b) for b in (1 << 30, 0))
    for i, layer in enumerate(WALK_LAYERS):
        torch.testing.assert_close(free(layer), none_kept(layer), rtol=1e-5, atol=1e-6)
        _update_down(tiny, layer, seed=i)
    assert all(b.state is None for b in none_kept.batches)


def test_key_walk_refuses_to_go_down_or_to_resume_from_stale_states(tiny):
    prompts, subjects = [c[0] for c in CASES], [c[1] for c in CASES]
    walk = KeyWalk(tiny, prompts, subjects, ["{}"])
    walk(2)
    with pytest.raises(ValueError, match="goes up the layers"):
        walk(1)
    _update_down(tiny, 1, seed=0)  # below the kept states (they entered block 2)
    with pytest.raises(RuntimeError, match="stale"):
        walk(3)


@pytest.mark.parametrize("fault", ["wrong state", "raises"])
def test_key_walk_falls_back_when_a_kept_state_does_not_reproduce_the_forward(tokenizer, monkeypatch, caplog, fault):
    """An architecture whose blocks take something else than the kept state (the forward gives other keys, or
    fails): warned, and the keys are still right."""
    loaded = build_tiny("llama", tokenizer)
    prompts, subjects = [c[0] for c in CASES], [c[1] for c in CASES]
    real = keys_module.skip_blocks

    def broken(blocks, output):
        if fault == "raises":
            raise TypeError("this block takes no hidden state")
        return real(blocks, 2 * output)

    monkeypatch.setattr(keys_module, "skip_blocks", broken)
    walk = KeyWalk(loaded, prompts, subjects, TEMPLATES, batch_size=4)
    walk(1)
    with caplog.at_level("WARNING"):
        got = walk(3)
    assert not walk.resume and "does not reproduce" in caplog.text
    assert ("TypeError" in caplog.text) == (fault == "raises")
    torch.testing.assert_close(got, compute_keys(loaded, [3], prompts, subjects, TEMPLATES)[3], rtol=1e-5, atol=1e-6)


def test_a_key_walk_call_that_fails_keeps_no_state(tokenizer, monkeypatch):
    """Half the batches would hold states of the failed call's layer: none is kept, and the next call is right."""
    loaded = build_tiny("llama", tokenizer)
    prompts, subjects = [c[0] for c in CASES], [c[1] for c in CASES]
    walk = KeyWalk(loaded, prompts, subjects, TEMPLATES, batch_size=4)
    walk(1)
    real, seen = keys_module._add_keys, []

    def fails_on_the_third(sums, batch, k):
        seen.append(1)
        if len(seen) == 3:
            raise MemoryError("out of memory")
        real(sums, batch, k)

    monkeypatch.setattr(keys_module, "_add_keys", fails_on_the_third)
    with pytest.raises(MemoryError):
        walk(2)
    assert all(b.state is None for b in walk.batches)
    monkeypatch.setattr(keys_module, "_add_keys", real)
    torch.testing.assert_close(walk(3), compute_keys(loaded, [3], prompts, subjects, TEMPLATES)[3], rtol=1e-5, atol=1e-6)


def test_subject_outputs_stop_after_the_last_watched_module(tokenizer):
    """The residual's forward reads block outputs: the blocks above them and the output head never run, and
    the outputs are those of the full forward, bit for bit."""
    from covedit.pipeline.facts import Fact
    from covedit.pipeline.hooks import capture_outputs
    from covedit.pipeline.targets import subject_outputs
    loaded = build_tiny("llama", tokenizer)
    facts = [Fact(id=str(i), prompt=p, subject=s, target_new="Rome") for i, (p, s) in enumerate(CASES)]
    calls, handle = _block_runs(loaded, 3)
    try:
        got = subject_outputs(loaded, facts, [loaded.block(2), loaded.down_proj(1)], len(facts))
    finally:
        handle.remove()
    assert calls == []
    enc = encode_with_subject(tokenizer, [f.prompt for f in facts], [f.subject for f in facts], "left")
    with torch.no_grad(), capture_outputs([loaded.down_proj(1)]) as seen:
        hidden = loaded.model(**enc.model_inputs(), output_hidden_states=True).hidden_states[3]  # block 2's output
    rows = torch.arange(len(facts))
    assert torch.equal(got[0], hidden[rows, enc.subject_last])
    assert torch.equal(got[1], seen[0][rows, enc.subject_last])
