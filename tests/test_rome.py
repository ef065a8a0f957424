"""ROME (pipeline/rome.py): rome_update against its defining properties and its formulas on random float64
data, cholesky_psd's refusal of NaN, the rank-one edit through the weight view of a real (tiny) Linear and
Conv1D module, and run_rome, the driver, on tiny models."""

from __future__ import annotations

import pytest
import torch

from conftest import D_FF, D_MODEL, FACTS, FAST, covariance, f64, rand, rel
from covedit.pipeline.delta import make_and_apply_delta
from covedit.pipeline.errors import DataError
from covedit.pipeline.rome import cholesky_psd, rome_update, run_rome
from covedit.pipeline.targets import block_outputs


def test_rome_with_covariance_maps_the_key_and_spares_c_orthogonal_inputs():
    W, k, v, C = rand(D_MODEL, D_FF), rand(D_FF, seed=11), rand(D_MODEL, seed=12), covariance()
    up, down = rome_update(W, k, v, C)
    assert up.shape == (D_MODEL, 1) and down.shape == (1, D_FF) and up.dtype == f64
    W_new = W + up @ down
    assert (W_new @ k - v).abs().max() < 1e-10
    u = torch.linalg.solve(C, k)
    X = rand(D_FF, 20, seed=13)
    X = X - u[:, None] * (u @ X)[None, :] / (u @ u)  # now xᵀ C⁻¹ k = 0 for every column
    assert (u @ X).abs().max() < 1e-12
    assert (W_new @ X - W @ X).abs().max() < 1e-10
    assert (W_new @ k - W @ k).abs().max() > 0.1  # the key itself did move


def test_rome_identity_variant_spares_orthogonal_inputs():
    W, k, v = rand(D_MODEL, D_FF), rand(D_FF, seed=14), rand(D_MODEL, seed=15)
    up, down = rome_update(W, k, v, None)
    W_new = W + up @ down
    assert (W_new @ k - v).abs().max() < 1e-10
    X = rand(D_FF, 20, seed=16)
    X = X - k[:, None] * (k @ X)[None, :] / (k @ k)
    assert (W_new @ X - W @ X).abs().max() < 1e-10


def test_rome_variants_agree_when_c_is_identity_and_follow_their_formulas_otherwise():
    W, k, v = rand(D_MODEL, D_FF), rand(D_FF, seed=17), rand(D_MODEL, seed=18)
    plain = torch.mm(*rome_update(W, k, v, None))
    assert rel(torch.mm(*rome_update(W, k, v, torch.eye(D_FF, dtype=f64))), plain) < 1e-12
    C = covariance()
    resid = (v - W @ k)[:, None]
    assert rel(plain, resid @ k[None, :] / (k @ k)) < 1e-12
    c_inv_k = torch.linalg.inv(C) @ k
    with_c = torch.mm(*rome_update(W, k, v, C))
    assert rel(with_c, resid @ c_inv_k[None, :] / (k @ c_inv_k)) < 1e-10
    assert rel(with_c, plain) > 0.1


def test_rome_refuses_a_zero_key():
    with pytest.raises(DataError, match="kᵀC⁻¹k"):
        rome_update(rand(D_MODEL, D_FF), torch.zeros(D_FF, dtype=f64), rand(D_MODEL), covariance())
    with pytest.raises(DataError, match="kᵀk"):
        rome_update(rand(D_MODEL, D_FF), torch.zeros(D_FF, dtype=f64), rand(D_MODEL), None)


def test_cholesky_psd_refuses_a_matrix_with_nan():
    A = torch.eye(3, dtype=f64)
    A[1, 2] = float("inf")
    with pytest.raises(DataError, match="NaN or Inf"):
        cholesky_psd(A, "test matrix")


# ------------------------------------------------------------------------------------ through real modules

def test_rome_edit_through_the_weight_view_gives_the_same_function_for_linear_and_conv1d(tiny):
    """GPT-2's Conv1D stores Wᵀ: the edit made on the (d_model, d_ff) view must act as x @ (W + Δ)ᵀ + b."""
    layer = 1
    module = tiny.down_proj(layer)
    bias = getattr(module, "bias", None)
    if bias is not None:  # zero at init: give it values so a transposed add would show
        with torch.no_grad():
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(27)))
    W0 = tiny.down_weight(layer).detach().to(f64).clone()
    k = rand(tiny.d_ff, seed=28)
    v = rand(tiny.d_model, seed=29)
    up, down = rome_update(tiny.down_weight(layer), k, v, None)
    delta = make_and_apply_delta(tiny, {layer: (up, down)}, {"method": "rome"})
    edited = W0 + delta.layers[0].dense()
    x = torch.randn(5, tiny.d_ff, generator=torch.Generator().manual_seed(30))
    expected = x.to(f64) @ edited.T + (bias.to(f64) if bias is not None else 0)
    assert (module(x).to(f64) - expected).abs().max() < 1e-4
    assert (module(k.float()).to(f64) - (v + (bias.to(f64) if bias is not None else 0))).abs().max() < 1e-4


# ------------------------------------------------------------------------------- run_rome on tiny models

def test_rome_with_covariance_leaves_c_orthogonal_inputs_alone(tiny):
    torch.manual_seed(0)
    layer = 1
    W0 = tiny.down_weight(layer).detach().double().clone()
    A = torch.randn(tiny.d_ff, tiny.d_ff, dtype=torch.float64)
    C = A @ A.T / tiny.d_ff + torch.eye(tiny.d_ff, dtype=torch.float64)
    out = run_rome(tiny, FACTS[:1], layer, C, FAST, ["{}"], lambda: 0.0)
    W1 = tiny.down_weight(layer).detach().double()
    k = out.keys[layer][0].double()
    x = torch.randn(tiny.d_ff, dtype=torch.float64)
    u = torch.linalg.solve(C, k)
    x = x - (x @ u) / (k @ u) * k  # now xᵀ C⁻¹ k = 0
    assert abs(float(x @ torch.linalg.solve(C, k))) < 1e-10
    torch.testing.assert_close(W1 @ x, W0 @ x, rtol=1e-5, atol=1e-6)  # float32 weights


def test_rome_with_given_targets_reaches_each_target_in_sequence(tiny):
    """ROME fed precomputed z (bare template, no covariance): after all edits each fact's block output is at
    its z, because each rank-one update aims at z from wherever the earlier edits left h."""
    from covedit.pipeline.targets import compute_targets

    layer = 2
    targets = compute_targets(tiny, FACTS[:1], layer, FAST, ["{}"])
    run_rome(tiny, FACTS[:1], layer, None, FAST, ["{}"], lambda: 0.0, targets=targets)
    torch.testing.assert_close(block_outputs(tiny, FACTS[:1], layer, 8), targets.z, rtol=1e-4, atol=1e-5)
