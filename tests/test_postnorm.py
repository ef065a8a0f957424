"""Edits behind a post-MLP norm (Gemma-2/3, OLMo-2), and an edit test for every architecture in the registry:
the nearest reachable MLP output is found exactly, and the targets and the MEMIT/ROME drivers put the block
output on its target with λ → 0 on a tiny model of every architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ARCHS, POST_NORM_ARCHS, build_tiny
from covedit.pipeline.memit import run_memit
from covedit.pipeline.rome import run_rome
from covedit.pipeline.facts import Fact
from covedit.pipeline.hparams import TargetHParams
from covedit.pipeline.models import ARCHITECTURES, ModelError
from covedit.pipeline.postnorm import mlp_residual, nearest_unit_rms, rms_norm_parts
from covedit.pipeline.targets import block_outputs, compute_targets

FACTS = [Fact("a", "Eiffel Tower", "The {} is located in", "Rome"),
         Fact("b", "Louvre", "The {} is a museum in", "Berlin"),
         Fact("c", "Danielle Darrieux", "The mother tongue of {} is", "English")]
FAST = TargetHParams(steps=8, lr=0.05, clamp_norm_factor=10.0)


def realistic(loaded):
    """A tiny model in the regime of real ones. Its next-token distributions are sharpened (the unembedding
    ×50); behind a post-MLP norm its MLP outputs are scaled ×1,000, which the norm removes, so the block
    computes the same function, but rms(W k) is ~0.3 as in real models instead of ~1e-4, where the norm's
    ε = 1e-6 would dominate (postnorm.py is exact up to ε / rms(W k)²)."""
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(50)
        if loaded.post_mlp_norm(0) is not None:
            for layer in range(loaded.num_layers):
                loaded.down_weight(layer).mul_(1000)
    return loaded


def test_every_registry_architecture_has_a_tiny_model():
    assert set(ARCHS) == set(ARCHITECTURES)
    assert {a for a in ARCHS if ARCHITECTURES[a].post_mlp_norm} == set(POST_NORM_ARCHS)


def test_nearest_unit_rms_recovers_a_reachable_point():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(64, generator=gen, dtype=torch.float64) * 50  # some gains near 0, some negative
    u0 = torch.randn(5, 64, generator=gen, dtype=torch.float64)
    u0 = u0 / u0.pow(2).mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(nearest_unit_rms(g, g * u0), u0, rtol=0, atol=1e-9)


def test_nearest_unit_rms_beats_every_other_point_on_the_constraint():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(16, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(4, 16, generator=gen, dtype=torch.float64) * 5  # not reachable
    u = nearest_unit_rms(g, t)
    torch.testing.assert_close(u.pow(2).mean(1), torch.ones(4, dtype=torch.float64))
    best = (g * u - t).norm(dim=1)
    for _ in range(200):
        v = u + 0.3 * torch.randn(4, 16, generator=gen, dtype=torch.float64)
        v = v / v.pow(2).mean(1, keepdim=True).sqrt()
        assert ((g * v - t).norm(dim=1) >= best - 1e-9).all()


def test_without_a_norm_the_residual_is_the_wanted_change():
    d = torch.randn(3, 8, dtype=torch.float64)
    assert mlp_residual(None, torch.randn(3, 8), d) is d


@pytest.mark.parametrize("arch", POST_NORM_ARCHS)
def test_norm_output_moves_by_a_reachable_change(arch, tokenizer):
    m = build_tiny(arch, tokenizer)
    norm = m.post_mlp_norm(1)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.9, 3.0, m.d_model))  # gains from near 0 to 4 (or -0.9 to 3)
    gen = torch.Generator().manual_seed(2)
    x, x2 = torch.randn(2, 5, m.d_model, generator=gen)
    d = (norm(x2) - norm(x)).double()
    R = mlp_residual(norm, x, d)
    torch.testing.assert_close(norm((x.double() + R).float()).double(), norm(x).double() + d, rtol=0, atol=1e-5)
    g, eps = rms_norm_parts(norm)
    torch.testing.assert_close(norm(x).double(), g * x.double() / (x.double().pow(2).mean(1, keepdim=True) + eps).sqrt(),
                               rtol=1e-5, atol=1e-6)


def test_a_layer_norm_after_the_mlp_is_refused():
    with pytest.raises(ModelError, match="RMSNorm"):
        rms_norm_parts(nn.LayerNorm(16))


@pytest.mark.parametrize("arch", ARCHS)
def test_memit_single_layer_reaches_targets_on_every_architecture(arch, tokenizer):
    """λ → 0, one layer: the block output at every subject lands on the target z, whose δ lowered the NLL."""
    m = realistic(build_tiny(arch, tokenizer))
    targets = compute_targets(m, FACTS, 2, FAST, ["{}"])
    run_memit(m, FACTS, [2], None, 1e-8, FAST, ["{}"], lambda: 0.0, targets=targets)
    scale = float(targets.z.abs().max())
    torch.testing.assert_close(block_outputs(m, FACTS, 2, 8), targets.z, rtol=0, atol=1e-4 * scale + 1e-5)  # float32 weights
    assert (targets.nll_after < targets.nll_before).all()


@pytest.mark.parametrize("arch", POST_NORM_ARCHS)
def test_memit_spreads_over_two_layers_behind_a_post_mlp_norm(arch, tokenizer):
    """The lower layer writes the reachable part of its share, the top layer the rest it can reach."""
    m = realistic(build_tiny(arch, tokenizer))
    out = run_memit(m, FACTS, [1, 2], None, 1e-8, FAST, ["{}"], lambda: 0.0)
    assert min(out.target_info["realised"]) > 0.85


@pytest.mark.parametrize("arch", POST_NORM_ARCHS)
def test_rome_behind_a_post_mlp_norm_writes_its_target(arch, tokenizer):
    m = realistic(build_tiny(arch, tokenizer))
    targets = compute_targets(m, FACTS[:1], 2, FAST, ["{}"])
    run_rome(m, FACTS[:1], 2, None, FAST, ["{}"], lambda: 0.0, targets=targets)
    torch.testing.assert_close(block_outputs(m, FACTS[:1], 2, 1), targets.z, rtol=0,
                               atol=1e-5 * float(targets.z.abs().max()))


@pytest.mark.parametrize("arch", POST_NORM_ARCHS)
def test_writing_the_residual_straight_into_w_k_misses_behind_a_norm(arch, tokenizer):
    """Why postnorm.py exists: what MEMIT writes for a Llama block lands far from z behind a norm."""
    m = realistic(build_tiny(arch, tokenizer))
    targets = compute_targets(m, FACTS, 2, FAST, ["{}"])
    h = block_outputs(m, FACTS, 2, 8)
    norm_path = ARCHITECTURES[arch].post_mlp_norm
    m.arch = type(m.arch)(m.arch.layers, m.arch.down_proj)  # pretend the block has no norm
    run_memit(m, FACTS, [2], None, 1e-8, FAST, ["{}"], lambda: 0.0, targets=targets)
    miss = (block_outputs(m, FACTS, 2, 8) - targets.z).norm(dim=1) / (targets.z - h).norm(dim=1)
    assert norm_path and (miss > 0.1).all()
