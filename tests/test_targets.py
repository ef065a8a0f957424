"""Target optimisation: batched equals one fact at a time, the loss is what the docstring says, the clamp
and early stopping hold, no hook is left behind, and on the real model the Eiffel Tower moves to Rome."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, build_tiny
from covedit.pipeline.errors import DataError
from covedit.pipeline.facts import Fact
from covedit.pipeline.hooks import capture_outputs, edit_output
from covedit.pipeline.hparams import TargetHParams
from covedit.pipeline.targets import compute_targets

FACTS = [
    Fact("f1", "Eiffel Tower", "The {} is located in the city of", "Rome"),
    Fact("f2", "Danielle Darrieux", "The mother tongue of {} is", "English"),
    Fact("f3", "Toko Yasuda", "{} plays the instrument called the", "electric bass guitar"),
]
TEMPLATES = ["{}", "Hello there. {}", "Because of this, {}"]
# Tiny models have small residuals (‖h‖ ≈ 0.07 at layer 2 of the tiny llama): the published lr 0.5 and the
# weight decay ‖δ‖/‖h‖² would swamp them, so the tests scale lr down and leave weight decay to one test.
NO_STOP = TargetHParams(steps=6, lr=0.02, weight_decay=0.0, clamp_norm_factor=4.0, early_stop_loss=0.0)
DECAY = TargetHParams(steps=6, lr=0.02, weight_decay=0.5, clamp_norm_factor=0.75, early_stop_loss=0.0)


def _responsive(loaded):
    """Scale the unembedding so the tiny model's next-token distributions are far from uniform."""
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(50)
    return loaded


def _logits(loaded, text):
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


@pytest.mark.slow
def test_batched_equals_one_at_a_time(tiny):
    """Also with GPT-2's absolute positions: left padding must not shift them."""
    m = _responsive(tiny)
    batched = compute_targets(m, FACTS, 2, DECAY, TEMPLATES)
    chunked = compute_targets(m, FACTS, 2, DECAY, TEMPLATES, max_rows=1)  # one fact per forward
    grouped = compute_targets(m, FACTS, 2, DECAY, TEMPLATES, max_facts=2)  # two optimisation loops: 2 + 1
    for i, fact in enumerate(FACTS):
        alone = compute_targets(m, [fact], 2, DECAY, TEMPLATES)
        torch.testing.assert_close(batched.z[i], alone.z[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(batched.nll_after[i], alone.nll_after[0], rtol=0, atol=1e-4)
        assert batched.steps_taken[i] == alone.steps_taken[0] == DECAY.steps - 1
    torch.testing.assert_close(chunked.z, batched.z, rtol=0, atol=1e-4)
    torch.testing.assert_close(grouped.z, batched.z, rtol=0, atol=1e-4)
    assert torch.equal(grouped.steps_taken, batched.steps_taken) and grouped.z.shape == batched.z.shape
    assert batched.z.shape == (3, m.d_model) and batched.z.dtype == torch.float32


def test_nll_before_is_the_teacher_forced_nll(bos_tokenizer):
    """Mean over templates of the mean over target tokens, multi-token target, BOS tokenizer."""
    m = build_tiny("llama", bos_tokenizer, seed=1)
    fact = FACTS[2]
    target = bos_tokenizer(" " + fact.target_new, add_special_tokens=False).input_ids
    assert len(target) > 1
    expected = []
    for t in TEMPLATES:
        prompt_ids = bos_tokenizer(t.replace("{}", fact.rewrite_prompt())).input_ids
        ids = torch.tensor([prompt_ids + target[:-1]])
        with torch.no_grad():
            logp = m.model(input_ids=ids).logits[0].log_softmax(-1)
        positions = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(target))
        expected.append(-torch.stack([logp[p, tok] for p, tok in zip(positions, target)]).mean())
    result = compute_targets(m, [FACTS[0], fact], 1, TargetHParams(steps=1), TEMPLATES)
    torch.testing.assert_close(result.nll_before[1], torch.stack(expected).mean(), rtol=0, atol=1e-5)
    assert result.steps_taken.tolist() == [0, 0]  # one pass measures only
    torch.testing.assert_close(result.z, result.h)


def test_h_is_the_block_output_at_the_subjects_last_token(tokenizer):
    m = build_tiny("gpt2", tokenizer)
    result = compute_targets(m, FACTS, 1, TargetHParams(steps=2), ["{}"])
    for i, fact in enumerate(FACTS):
        ids = tokenizer(fact.rewrite_prompt(), return_tensors="pt").input_ids
        subject_end = len(tokenizer(fact.prompt.split("{}")[0] + fact.subject).input_ids) - 1
        with torch.no_grad(), capture_outputs([m.block(1)]) as seen:
            m.model(input_ids=ids)
        torch.testing.assert_close(result.h[i], seen[0][0, subject_end], rtol=0, atol=1e-5)


def test_nll_decreases_for_every_fact(tiny):
    """Without the KL term: on the tiny GPT-2 the NLL's gradient is so small (saturated logits) that the KL
    at the edited position itself, which δ moves directly, would dominate Adam's normalised steps."""
    result = compute_targets(_responsive(tiny), FACTS, 2, dataclasses.replace(NO_STOP, kl_factor=0.0), TEMPLATES)
    assert (result.nll_after < result.nll_before).all()


def test_delta_applied_reproduces_nll_after(tokenizer):
    """z − h added at the subject's last token gives the reported nll_after (bare template)."""
    m = _responsive(build_tiny("llama", tokenizer))
    fact = FACTS[0]
    result = compute_targets(m, [fact], 2, NO_STOP, ["{}"])
    assert result.nll_after[0] < result.nll_before[0]
    ids = tokenizer(fact.rewrite_prompt(), return_tensors="pt").input_ids
    subject_end = len(tokenizer("The Eiffel Tower").input_ids) - 1
    delta = result.delta[0]

    def add(h):
        h = h.clone()
        h[0, subject_end] += delta
        return h

    with torch.no_grad(), edit_output(m.block(2), add):
        logp = m.model(input_ids=ids).logits[0, -1].log_softmax(-1)
    rome = tokenizer(" Rome", add_special_tokens=False).input_ids
    assert len(rome) == 1
    torch.testing.assert_close(-logp[rome[0]], result.nll_after[0], rtol=0, atol=1e-5)


def test_norm_clamp_binds(tokenizer):
    m = _responsive(build_tiny("llama", tokenizer))
    hp = dataclasses.replace(NO_STOP, lr=1.0, clamp_norm_factor=0.1)
    result = compute_targets(m, FACTS, 2, hp, TEMPLATES)
    ratio = result.delta.norm(dim=1) / result.h.norm(dim=1)
    torch.testing.assert_close(ratio, torch.full((3,), 0.1), rtol=1e-5, atol=0)


def test_early_stopping_freezes_a_fact(tokenizer):
    """The fact whose target is likeliest stops once below the threshold; its δ then never moves again."""
    m = _responsive(build_tiny("llama", tokenizer))
    hp = dataclasses.replace(NO_STOP, steps=3, kl_factor=0.0)  # the whole loss is the NLL here
    two = compute_targets(m, FACTS, 2, hp, TEMPLATES)  # 2 updates
    three = compute_targets(m, FACTS, 2, dataclasses.replace(hp, steps=4), TEMPLATES)  # 3 updates
    likeliest = int(two.nll_before.argmin())
    assert three.nll_after[likeliest] < two.nll_after[likeliest]
    threshold = float(three.nll_after[likeliest] + two.nll_after[likeliest]) / 2
    others = [i for i in range(3) if i != likeliest]
    assert (two.nll_after[others] > threshold).all()  # only one fact can cross it early

    trace: list = []
    stopped = compute_targets(m, FACTS, 2, dataclasses.replace(hp, steps=10, early_stop_loss=threshold), TEMPLATES,
                              trace=trace)
    assert stopped.steps_taken[likeliest] == 3
    assert stopped.steps_taken[others].tolist() == [9, 9]
    # the trace: one entry per forward pass; the stopped fact's loss crosses the threshold at pass 3, then NaN
    assert [t["pass"] for t in trace] == list(range(10))
    losses = torch.tensor([t["loss"] for t in trace])
    assert (losses[:3, likeliest] >= threshold).all() and losses[3, likeliest] < threshold
    assert losses[4:, likeliest].isnan().all() and not losses[:, others].isnan().any()
    torch.testing.assert_close(torch.tensor(trace[-1]["nll"])[others], stopped.nll_after[others], rtol=0, atol=1e-6)
    # frozen after 3 updates although Adam kept stepping the others with momentum
    torch.testing.assert_close(stopped.z[likeliest], three.z[likeliest], rtol=0, atol=1e-5)
    torch.testing.assert_close(stopped.nll_after[likeliest], three.nll_after[likeliest], rtol=0, atol=1e-5)


def test_all_facts_already_likely_stop_at_once(tokenizer):
    m = build_tiny("llama", tokenizer)
    result = compute_targets(m, FACTS, 2, TargetHParams(steps=10, early_stop_loss=100.0), TEMPLATES)
    assert result.steps_taken.tolist() == [0, 0, 0]
    assert torch.equal(result.z, result.h)
    # δ = 0 throughout: the same NLL, read once from the full forward and once from the suffix-only one
    torch.testing.assert_close(result.nll_after, result.nll_before, rtol=0, atol=1e-5)


def test_model_is_unchanged_and_hooks_removed(tiny):
    text = "The Eiffel Tower is located in the city of"
    before = _logits(tiny, text)
    compute_targets(tiny, FACTS, 2, NO_STOP, TEMPLATES)
    assert torch.equal(_logits(tiny, text), before)
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in tiny.blocks)
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_bad_template_is_data_error(tokenizer):
    m = build_tiny("llama", tokenizer)
    with pytest.raises(DataError, match="exactly one"):
        compute_targets(m, FACTS, 2, NO_STOP, ["{}", "no slot here"])


def test_no_facts(tokenizer):
    m = build_tiny("llama", tokenizer)
    result = compute_targets(m, [], 2, NO_STOP, TEMPLATES)
    assert result.z.shape == (0, m.d_model) and result.steps_taken.shape == (0,)


@pytest.mark.slow
def test_eiffel_tower_moves_to_rome(smol):
    fact = FACTS[0]
    tok = smol.tokenizer
    text = fact.rewrite_prompt()
    rome, paris = (tok(" " + w, add_special_tokens=False).input_ids[0] for w in ("Rome", "Paris"))
    assert int(_logits(smol, text)[0, -1].argmax()) == paris

    result = compute_targets(smol, [fact], 8, TargetHParams(steps=25), ["{}"])
    assert result.nll_after[0] < 0.05 < result.nll_before[0]
    assert 0 < result.steps_taken[0] < 24  # stopped early
    subject_end = len(tok("The Eiffel Tower").input_ids) - 1

    def add(h):
        h = h.clone()
        h[0, subject_end] += result.delta[0].to(h.dtype)
        return h

    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad(), edit_output(smol.block(8), add):
        logits = smol.model(input_ids=ids).logits[0, -1]
    assert int(logits.argmax()) == rome
    assert float(F.softmax(logits.float(), -1)[rome]) > 0.9


def test_half_precision_model_gives_float32_targets(tokenizer):
    m = _responsive(build_tiny("llama", tokenizer))
    m.model.to(torch.bfloat16)
    result = compute_targets(m, FACTS, 2, NO_STOP, TEMPLATES)
    assert result.z.dtype == result.h.dtype == result.nll_after.dtype == torch.float32
    assert torch.isfinite(result.z).all() and (result.nll_after < result.nll_before).all()


def _reference_z(m, fact, layer, hp, templates, relative_to):
    """kmeng01's compute_z (MEMIT, scale = block output) or compute_v (ROME, scale = MLP output) for one fact,
    written out: each prompt through the full model on its own, δ added to the MLP output at the subject's
    last token, KL read at the subject's last token of "{subject} is a", stop when the whole loss < threshold
    (and with ``stop_when_top1``, ENCORE's rule, when every target token ranks first in every row); with
    ``first_step``, the first update goes to that fraction of the clamp radius along the negative gradient.
    Returns (δ, Adam updates made, [(nll, loss) at each forward])."""
    tok = m.tokenizer
    target = tok(" " + fact.target_new, add_special_tokens=False).input_ids

    def subject_end(template: str) -> tuple[list[int], int]:
        before = template.replace("{}", fact.prompt).split("{}")[0] + fact.subject
        text = template.replace("{}", fact.prompt).replace("{}", fact.subject)
        return tok(text).input_ids, len(tok(before).input_ids) - 1

    rows = [subject_end(t) for t in templates]
    kl_ids, kl_at = tok(fact.subject + " is a").input_ids, len(tok(fact.subject).input_ids) - 1

    def run(ids, at, delta):
        def add(out):
            out = out.clone()
            out[0, at] += delta
            return out
        with edit_output(m.down_proj(layer), add):
            return m.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)

    with torch.no_grad(), capture_outputs([m.block(layer), m.down_proj(layer)]) as seen:
        m.model(input_ids=torch.tensor([rows[0][0]]))
    scale = (seen[0] if relative_to == "block" else seen[1])[0, rows[0][1]].norm()
    delta = torch.zeros(m.d_model, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    kl_init, updates, trace = None, 0, []
    for it in range(hp.steps):
        opt.zero_grad()
        nlls, all_first = [], True
        for ids, at in rows:
            logp = run(ids + target[:-1], at, delta)
            positions = range(len(ids) - 1, len(ids) - 1 + len(target))
            nlls.append(-torch.stack([logp[p, t] for p, t in zip(positions, target)]).mean())
            all_first &= all(int(logp[p].argmax()) == t for p, t in zip(positions, target))
        nll = torch.stack(nlls).mean()
        kl_now = run(kl_ids, kl_at, delta)[kl_at]
        if kl_init is None:
            kl_init = kl_now.detach()
        kl = F.kl_div(kl_init, kl_now, log_target=True, reduction="sum")  # KL(p_now ‖ p_init)
        loss = nll + hp.kl_factor * kl + hp.weight_decay * delta.norm() / scale ** 2
        trace.append((float(nll.detach()), float(loss.detach())))
        if loss < hp.early_stop_loss or (hp.stop_when_top1 and all_first) or it == hp.steps - 1:
            break
        loss.backward()
        max_norm = hp.clamp_norm_factor * scale
        if updates == 0 and hp.first_step > 0:  # the first update: straight to first_step × the clamp along −∇
            with torch.no_grad():
                delta.copy_(-hp.first_step * max_norm * delta.grad / delta.grad.norm())
        else:
            opt.step()
        updates += 1
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return delta.detach(), updates, trace


@pytest.mark.slow
@pytest.mark.parametrize("relative_to,kl_factor,weight_decay,clamp", [
    ("block", 0.0625, 5e-4, 4.0), ("mlp", 0.5, 0.0, 4.0), ("block", 0.0625, 0.0, 0.05), ("mlp", 0.0625, 1e-4, 0.05)])
def test_equals_the_reference_compute_z(tokenizer, relative_to, kl_factor, weight_decay, clamp):
    """Loss, KL position, weight decay and clamp scale (block output for MEMIT, MLP output for ROME), and
    early stopping on the whole loss: δ and the number of updates as the reference procedure's, with a
    threshold that the NLL alone would cross sooner where the trajectory allows one."""
    m = _responsive(build_tiny("llama", tokenizer))
    fact = FACTS[0]
    hp = TargetHParams(steps=8, lr=0.02, kl_factor=kl_factor, weight_decay=weight_decay, clamp_norm_factor=clamp,
                       early_stop_loss=0.0)
    _, _, trace = _reference_z(m, fact, 2, hp, TEMPLATES, relative_to)
    for j in range(1, len(trace)):  # a threshold the NLL crosses at pass j, the whole loss not (yet)
        threshold = (trace[j][0] + trace[j][1]) / 2
        if trace[j][1] - trace[j][0] > 1e-3 and all(min(t) > threshold + 1e-4 for t in trace[:j]):
            hp = dataclasses.replace(hp, early_stop_loss=threshold)
            break
    want, updates, _ = _reference_z(m, fact, 2, hp, TEMPLATES, relative_to)
    got = compute_targets(m, [fact], 2, hp, TEMPLATES, relative_to=relative_to)
    assert int(got.steps_taken[0]) == updates
    torch.testing.assert_close(got.delta[0], want, rtol=0, atol=1e-5)
    if hp.early_stop_loss:
        assert updates != j  # the NLL alone would have stopped after j updates
    if clamp < 1:  # the clamp binds, relative to the right scale
        scale = (got.h[0] if relative_to == "block" else _reference_mlp_output(m, fact)).norm()
        torch.testing.assert_close(got.delta[0].norm(), clamp * scale, rtol=1e-4, atol=0)


@pytest.mark.parametrize("stop_when_top1", [False, True])
def test_most_probable_early_stopping(tokenizer, stop_when_top1):
    """ENCORE's MPES on the tiny model: a fact whose target already ranks first in every row stops before
    its first update (z = h); one whose target ranks first in two of its three rows but third in the other
    (and stays so) runs on, as does one never ranked first; each δ is the written-out reference's. Off,
    every fact runs to the last pass (the loss threshold is 0)."""
    m = _responsive(build_tiny("llama", tokenizer))
    everywhere = Fact("f0", FACTS[0].subject, FACTS[0].prompt, "Rams")  # the tiny model's top-1 in every row
    two_of_three = Fact("f1", FACTS[1].subject, FACTS[1].prompt, "Zoro")  # top-1 with 2 of the 3 templates
    facts = [everywhere, two_of_three, FACTS[2]]
    hp = TargetHParams(steps=6, lr=0.05, weight_decay=0.0, clamp_norm_factor=4.0, early_stop_loss=0.0,
                       stop_when_top1=stop_when_top1)
    got = compute_targets(m, facts, 2, hp, TEMPLATES)
    for i, fact in enumerate(facts):
        want, updates, _ = _reference_z(m, fact, 2, hp, TEMPLATES, "block")
        assert int(got.steps_taken[i]) == updates
        torch.testing.assert_close(got.delta[i], want, rtol=0, atol=1e-5)
    assert got.steps_taken.tolist() == ([0, 5, 5] if stop_when_top1 else [5, 5, 5])


@pytest.mark.parametrize("first_step", [0.5, 1.0])
def test_first_step_along_the_gradient_to_the_clamp_sphere(tokenizer, first_step):
    """target.first_step: the first update puts δ at first_step × the clamp radius along −∇loss at δ = 0,
    then Adam runs as before: every fact's δ and updates as the written-out reference's, batched."""
    m = _responsive(build_tiny("llama", tokenizer))
    hp = TargetHParams(steps=5, lr=0.05, weight_decay=0.5, clamp_norm_factor=4.0, early_stop_loss=0.0,
                       first_step=first_step)  # one Adam step (‖δ‖ ≈ lr √d = 0.2) stays inside the sphere (4 ‖h‖)
    got = compute_targets(m, FACTS, 2, hp, TEMPLATES)
    for i, fact in enumerate(FACTS):
        want, updates, _ = _reference_z(m, fact, 2, hp, TEMPLATES, "block")
        assert int(got.steps_taken[i]) == updates == 4
        torch.testing.assert_close(got.delta[i], want, rtol=0, atol=1e-5)
    once = compute_targets(m, FACTS, 2, dataclasses.replace(hp, steps=2), TEMPLATES)  # the jump alone
    torch.testing.assert_close(once.delta.norm(dim=1), first_step * 4.0 * once.h.norm(dim=1), rtol=1e-5, atol=0)
    adam = compute_targets(m, FACTS, 2, dataclasses.replace(hp, steps=2, first_step=0.0), TEMPLATES)
    assert (adam.delta.norm(dim=1) < 0.9 * once.delta.norm(dim=1)).all() or first_step < 1


@pytest.mark.slow
def test_most_probable_early_stopping_on_the_embedded_model(smol):
    """On SmolLM2 (layer 8, the llama step rule) Eiffel Tower → Rome ranks first in every context after a few
    updates, before the loss threshold: MPES stops there, with the reference's δ."""
    fact = FACTS[0]
    hp = TargetHParams(steps=15, lr=2.0, stop_when_top1=True)
    mpes = compute_targets(smol, [fact], 8, hp, TEMPLATES)
    loss_rule = compute_targets(smol, [fact], 8, dataclasses.replace(hp, stop_when_top1=False), TEMPLATES)
    want, updates, trace = _reference_z(smol, fact, 8, hp, TEMPLATES, "block")
    assert 0 < int(mpes.steps_taken[0]) == updates < int(loss_rule.steps_taken[0])
    assert trace[-1][1] > hp.early_stop_loss  # stopped by the rank, not by the loss
    torch.testing.assert_close(mpes.delta[0], want, rtol=0, atol=1e-3 * float(want.norm()))


def _reference_mlp_output(m, fact):
    with torch.no_grad(), capture_outputs([m.down_proj(2)]) as seen:
        m.model(input_ids=m.tokenizer(fact.rewrite_prompt(), return_tensors="pt").input_ids)
    return seen[0][0, len(m.tokenizer("The Eiffel Tower").input_ids) - 1]


def test_facts_with_one_subject_and_target_share_one_delta(tokenizer):
    """Merged: one δ over both prompts (the mean of their NLLs); each fact keeps its own h; the order of the
    results is the order of the facts; merge=False gives each its own δ."""
    m = _responsive(build_tiny("llama", tokenizer))
    a = Fact("a", "Eiffel Tower", "The {} is located in the city of", "Rome")
    b = Fact("b", "Eiffel Tower", "Where is the {}? In the city of", "Rome")
    hp = dataclasses.replace(NO_STOP, kl_factor=0.0)
    merged = compute_targets(m, [a, FACTS[1], b], 2, hp, TEMPLATES)
    torch.testing.assert_close(merged.delta[0], merged.delta[2], rtol=0, atol=1e-6)
    assert not torch.equal(merged.h[0], merged.h[2])
    alone = compute_targets(m, [FACTS[1]], 2, hp, TEMPLATES)
    torch.testing.assert_close(merged.z[1], alone.z[0], rtol=0, atol=1e-5)
    apart = compute_targets(m, [a, FACTS[1], b], 2, hp, TEMPLATES, merge=False)
    assert not torch.allclose(apart.delta[0], apart.delta[2])
    # the merged NLL before editing is the mean of the two facts' own NLLs
    torch.testing.assert_close(merged.nll_before[0], (apart.nll_before[0] + apart.nll_before[2]) / 2,
                               rtol=0, atol=1e-5)


def test_target_results_select_and_concat_round_trip(tiny):
    from covedit.pipeline.targets import TargetResult, compute_targets

    t = compute_targets(tiny, FACTS, 2, FAST, ["{}"])
    back = TargetResult.concat([t.select([0]), t.select([1, 2])])
    for name in ("z", "h", "nll_before", "nll_after", "steps_taken"):
        assert torch.equal(getattr(back, name), getattr(t, name))
