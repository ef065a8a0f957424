"""MEMIT's preserve_relation: keys of the edited prompts with ordinary names in the subject's place, kept."""

import pytest
import torch

from covedit.pipeline.facts import Fact
from covedit.pipeline.hparams import TargetHParams, load_hparams
from covedit.pipeline.errors import UsageError
from covedit.pipeline.keys import compute_keys, preserve_subjects, relation_key_moment
from covedit.pipeline.memit import run_memit

FACTS = [Fact("a", "Eiffel Tower", "The {} is located in", "Rome"),
         Fact("b", "Louvre", "The {} is located in", "Berlin"),
         Fact("c", "Danielle Darrieux", "The mother tongue of {} is", "English")]
FAST = TargetHParams(steps=8, lr=0.05, clamp_norm_factor=10.0)


def test_the_shipped_names_are_plain_and_distinct():
    names = preserve_subjects()
    assert len(names) >= 200 and len(set(names)) == len(names)
    assert all(n == n.strip() and "{" not in n and not n.startswith("#") for n in names)


def test_relation_moment_is_the_count_weighted_mean_of_the_substituted_keys(tiny):
    """Σ over facts of (1/m) Σ_s k(prompt, s) k(prompt, s)ᵀ (to float32 rounding of the keys): a prompt of
    two facts counts twice; an edited subject is never one of the substitutes."""
    layer, m = 1, 3
    pool = [s for s in preserve_subjects() if s not in {f.subject for f in FACTS}][:m]
    expected = torch.zeros(tiny.d_ff, tiny.d_ff, dtype=torch.float64)
    for fact in FACTS:
        k = compute_keys(tiny, [layer], [fact.prompt] * m, pool, ["{}"])[layer].double()
        expected += k.T @ k / m
    got = relation_key_moment(tiny, layer, [f.prompt for f in FACTS], [f.subject for f in FACTS], m)
    tol = 1e-6 * float(expected.abs().max())  # float32 keys, batched differently: rounding only
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)
    first = preserve_subjects()[0]
    without = relation_key_moment(tiny, layer, [FACTS[0].prompt], [first], 1)
    k_second = compute_keys(tiny, [layer], [FACTS[0].prompt], [preserve_subjects()[1]], ["{}"])[layer].double()
    torch.testing.assert_close(without, k_second.T @ k_second, rtol=0, atol=1e-6 * float(without.abs().max()))


def test_a_large_weight_leaves_the_substituted_keys_outputs_alone(tiny):
    """ν → ∞: Δ k ≈ 0 for the keys of the edited prompts about the substitute subjects, while the edited
    keys are still written (one layer, identity covariance, so only this term protects them)."""
    layer, m = 2, 4
    pool = [s for s in preserve_subjects() if s not in {f.subject for f in FACTS}][:m]
    probes = compute_keys(tiny, [layer], [f.prompt for f in FACTS for _ in pool], pool * len(FACTS), ["{}"])[layer]
    edited = compute_keys(tiny, [layer], [f.prompt for f in FACTS], [f.subject for f in FACTS], ["{}"])[layer]
    moved = {}
    for nu in (0.0, 1e6):
        W0 = tiny.down_weight(layer).detach().clone()
        out = run_memit(tiny, FACTS, [layer], None, 1e-4, FAST, ["{}"], lambda: 0.0, preserve_relation=nu,
                        relation_subjects=m)
        up, down = out.factors[layer]
        delta = up.double() @ down.double()
        moved[nu] = (float((probes.double() @ delta.T).norm(dim=1).max()),
                     float((edited.double() @ delta.T).norm(dim=1).min()))
        with torch.no_grad():
            tiny.down_weight(layer).copy_(W0)
    assert moved[0.0][0] > 100 * moved[1e6][0]  # the substitutes' outputs stopped moving
    assert moved[1e6][1] > 0.1 * moved[0.0][1]  # the edited keys are still written


def test_bad_values_are_refused(tiny):
    with pytest.raises(UsageError, match="preserve_relation must be >= 0 and relation_subjects at least 1"):
        load_hparams("memit", "llama", 4, None, ["preserve_relation=-1"])
    with pytest.raises(UsageError, match="relation_subjects at least 1"):
        load_hparams("memit", "llama", 4, None, ["relation_subjects=0"])
