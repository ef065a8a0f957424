"""The weight-update mathematics (ROME, MEMIT, AlphaEdit) against its defining properties and against
direct float64 evaluations with explicit inverses, on random data; then through real (tiny) modules."""

from __future__ import annotations

import logging

import pytest
import torch

from covedit.pipeline.delta import Delta, LayerDelta, check_finite, make_and_apply_delta, make_delta
from covedit.pipeline.errors import DataError, UsageError
from covedit.pipeline.memit import alphaedit_solve, memit_solve, null_space_projector
from covedit.pipeline.rome import cholesky_psd, rome_update

D_MODEL, D_FF = 12, 40
f64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=f64, generator=torch.Generator().manual_seed(seed))


def covariance(d=D_FF, tokens=400, seed=1):
    """An uncentred second moment of correlated keys, as build-stats produces: sum / count."""
    keys = rand(tokens, d, seed=seed) @ rand(d, d, seed=seed + 1) / d ** 0.5 + 0.3
    return keys.T @ keys / tokens


def spectrum_covariance(small: int, seed=2):
    """C = Q diag(eigs) Qᵀ with ``small`` eigenvalues below AlphaEdit's 2e-2; returns C, Q_small, Q_large."""
    Q, _ = torch.linalg.qr(rand(D_FF, D_FF, seed=seed))
    eigs = torch.cat([torch.linspace(1e-4, 1e-2, small, dtype=f64), torch.linspace(0.5, 8.0, D_FF - small, dtype=f64)])
    return Q @ torch.diag(eigs) @ Q.T, Q[:, :small], Q[:, small:]


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------- MEMIT

def test_memit_with_vanishing_lambda_maps_every_key_to_its_target():
    W, K, R, C = rand(D_MODEL, D_FF), rand(D_FF, 6, seed=3), rand(D_MODEL, 6, seed=4), covariance()
    up, down = memit_solve(K, R, C, lam=1e-10)
    assert up.shape == (D_MODEL, 6) and down.shape == (6, D_FF) and up.dtype == down.dtype == f64
    W_new = W + up @ down
    assert (W_new @ K - (W @ K + R)).abs().max() < 1e-8


def test_memit_equals_the_closed_form_with_an_explicit_inverse():
    K, R, C, lam = rand(D_FF, 7, seed=5), rand(D_MODEL, 7, seed=6), covariance(), 1.5
    up, down = memit_solve(K, R, C, lam)
    expected = R @ K.T @ torch.linalg.inv(lam * C + K @ K.T)
    assert rel(up @ down, expected) < 1e-10


def test_memit_lambda_trades_fit_for_locality():
    """Larger λ: keys fit less exactly, and directions C weights heavily move less."""
    K, R, C = rand(D_FF, 4, seed=7), rand(D_MODEL, 4, seed=8), covariance()
    fits = [float((torch.mm(*memit_solve(K, R, C, lam)) @ K - R).norm()) for lam in (1e-3, 1.0, 100.0)]
    assert fits[0] < fits[1] < fits[2] < float(R.norm())


def test_memit_singular_system_is_jittered_with_a_warning(caplog):
    """λ = 0 with fewer keys than d_ff: KKᵀ is singular, the jitter makes it solvable and fits the keys."""
    K, R = rand(D_FF, 3, seed=9) * 5, rand(D_MODEL, 3, seed=10)
    with caplog.at_level(logging.WARNING, logger="covedit.pipeline.rome"):
        up, down = memit_solve(K, R, torch.zeros(D_FF, D_FF, dtype=f64), lam=0.0)
    assert "jitter" in caplog.text
    assert (up @ down @ K - R).abs().max() < 1e-5


def test_memit_rejects_bad_input():
    K, R, C = rand(D_FF, 3), rand(D_MODEL, 3), covariance()
    with pytest.raises(UsageError):
        memit_solve(K, R, C, lam=-1.0)
    with pytest.raises(DataError):
        memit_solve(K, R, -torch.eye(D_FF, dtype=f64) * 1e3, lam=1.0)  # negative definite even with jitter
    bad = K.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DataError):
        memit_solve(bad, R, C, lam=1.0)


def test_cholesky_psd_refuses_a_matrix_with_nan():
    A = torch.eye(3, dtype=f64)
    A[1, 2] = float("inf")
    with pytest.raises(DataError, match="NaN or Inf"):
        cholesky_psd(A, "test matrix")


# -------------------------------------------------------------------------------------------------- ROME

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


# --------------------------------------------------------------------------------------------- AlphaEdit

def test_null_space_projector_keeps_the_small_eigenvectors():
    C, Q_small, _ = spectrum_covariance(small=15)
    P = null_space_projector(C, threshold=2e-2)
    assert P.dtype == f64
    assert rel(P, Q_small @ Q_small.T) < 1e-10
    assert abs(float(torch.trace(P)) - 15) < 1e-10
    assert null_space_projector(C, threshold=1e-5).abs().max() == 0  # nothing below: zero projector


def test_alphaedit_update_lies_in_the_null_space():
    C, _, Q_large = spectrum_covariance(small=25)
    P = null_space_projector(C)
    K, R, C_prev = rand(D_FF, 5, seed=19), rand(D_MODEL, 5, seed=20), covariance(seed=21) * 3
    up, down = alphaedit_solve(K, R, P, C_prev, alpha=1.0)
    assert up.shape == (D_MODEL, 5) and down.shape == (5, D_FF)
    delta = up @ down
    assert delta.abs().max() > 1e-3
    assert (delta @ P - delta).abs().max() < 1e-8
    assert (delta @ Q_large).abs().max() < 1e-8  # keys the layer already serves are untouched


def test_alphaedit_matches_the_formula_of_the_reference():
    C, _, _ = spectrum_covariance(small=25)
    P = null_space_projector(C)
    K, R, C_prev, alpha = rand(D_FF, 5, seed=22), rand(D_MODEL, 5, seed=23), covariance(seed=24), 10.0
    up, down = alphaedit_solve(K, R, P, C_prev, alpha)
    expected_T = torch.linalg.inv(P @ (K @ K.T + C_prev) + alpha * torch.eye(D_FF, dtype=f64)) @ P @ K @ R.T
    assert rel(up @ down, expected_T.T) < 1e-10
    no_prev = torch.mm(*alphaedit_solve(K, R, P, None, alpha))
    assert rel(no_prev, torch.mm(*alphaedit_solve(K, R, P, torch.zeros(D_FF, D_FF, dtype=f64), alpha))) < 1e-12
    assert rel(no_prev, up @ down) > 1e-3  # C_prev matters
    with pytest.raises(UsageError):
        alphaedit_solve(K, R, P, None, alpha=0.0)


def test_null_space_by_energy_holds_at_most_that_share_of_c():
    """energy ε: the smallest eigen-directions whose eigenvalues sum to ≤ ε tr(C), and not one more."""
    C, Q_small, _ = spectrum_covariance(small=15)
    evals = torch.linalg.eigvalsh(C)
    for eps in (1e-3, 0.05, 0.3):
        P = null_space_projector(C, energy=eps)
        m = int(round(float(torch.trace(P))))
        assert float(torch.trace(P @ C)) <= eps * float(torch.trace(C)) + 1e-12
        assert float(evals[:m + 1].sum()) > eps * float(evals.sum())  # the next direction would exceed it
        assert rel(P @ P, P) < 1e-10
    # the 15 tiny eigenvalues (sum 0.08 of a total 106) fit in 1e-3 of the energy, the next one (0.5) does not
    assert rel(null_space_projector(C, energy=1e-3), Q_small @ Q_small.T) < 1e-10
    assert rel(null_space_projector(C, energy=1.0), torch.eye(D_FF, dtype=f64)) < 1e-10
    with pytest.raises(UsageError):
        null_space_projector(C, energy=-0.1)


def test_alphaedit_with_lambda_c_is_memit_when_nothing_is_projected_away():
    """λC inside the projected solve: P = I, α = 0 gives MEMIT's R Kᵀ (λC + KKᵀ)⁻¹ exactly, and with a real
    projector the formula (P (KKᵀ + C_prev + λC) + αI)⁻¹ P K Rᵀ."""
    C = covariance()
    K, R, lam = rand(D_FF, 5, seed=31), rand(D_MODEL, 5, seed=32), 1.7
    eye = torch.eye(D_FF, dtype=f64)
    assert rel(torch.mm(*alphaedit_solve(K, R, eye, None, 0.0, C, lam)), torch.mm(*memit_solve(K, R, C, lam))) < 1e-10
    P = null_space_projector(C, energy=0.2)
    C_prev = covariance(seed=33)
    got = torch.mm(*alphaedit_solve(K, R, P, C_prev, 0.5, C, lam))
    expected_T = torch.linalg.inv(P @ (K @ K.T + C_prev + lam * C) + 0.5 * eye) @ P @ K @ R.T
    assert rel(got, expected_T.T) < 1e-10
    with pytest.raises(UsageError):
        alphaedit_solve(K, R, P, None, 0.5, None, lam)  # λ > 0 needs C


def test_alphaedit_with_full_projector_and_no_history_is_ridge_regression():
    """P = I, C_prev = 0: Δ = R Kᵀ (KKᵀ + αI)⁻¹, MEMIT with C = I and λ = α."""
    K, R = rand(D_FF, 5, seed=25), rand(D_MODEL, 5, seed=26)
    eye = torch.eye(D_FF, dtype=f64)
    assert rel(torch.mm(*alphaedit_solve(K, R, eye, None, 2.0)), torch.mm(*memit_solve(K, R, eye, 2.0))) < 1e-10


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


def test_nan_in_a_factor_is_refused(tiny):
    W = tiny.down_weight(0)
    up, down = rome_update(W, rand(tiny.d_ff), rand(tiny.d_model), None)
    bad = down.clone()
    bad[0, 3] = float("nan")
    before = W.detach().clone()
    with pytest.raises(DataError, match="layer 0"):
        make_delta(tiny, {0: (up, bad)}, {})
    delta = Delta([LayerDelta(0, "m", up.float(), bad.float())], tiny.model_id, {}, {}, {})
    with pytest.raises(DataError, match="NaN or Inf"):
        check_finite(delta)
    overflow = Delta([LayerDelta(0, "m", up.float() * float("inf"), down.float())], tiny.model_id, {}, {}, {})
    with pytest.raises(DataError):
        check_finite(overflow)
    assert torch.equal(W, before)


def test_memit_with_kept_tokens_is_the_stacked_least_squares():
    """Δ = R Kᵀ (λC + C_keep + KKᵀ)⁻¹ minimises Σ‖Δk − r‖² + Σ‖Δ k_keep‖² + λ tr(Δ C Δᵀ): the same Δ as
    the normal equations of that objective written out with the kept keys as extra zero-residual columns."""
    torch.manual_seed(0)
    d_ff, d, n, m = 12, 5, 3, 7
    K, R, K_keep = torch.randn(d_ff, n, dtype=torch.float64), torch.randn(d, n, dtype=torch.float64), torch.randn(d_ff, m, dtype=torch.float64)
    X = torch.randn(d_ff, 40, dtype=torch.float64)
    C = X @ X.T / 40
    up, down = memit_solve(K, R, C, 2.0, K_keep @ K_keep.T)
    K_all = torch.cat([K, K_keep], 1)
    R_all = torch.cat([R, torch.zeros(d, m, dtype=torch.float64)], 1)
    want = R_all @ K_all.T @ torch.linalg.inv(2.0 * C + K_all @ K_all.T)
    torch.testing.assert_close(up @ down, want, rtol=1e-9, atol=1e-10)
    # and C_keep = None is the reference MEMIT
    up0, down0 = memit_solve(K, R, C, 2.0)
    torch.testing.assert_close(up0 @ down0, R @ K.T @ torch.linalg.inv(2.0 * C + K @ K.T), rtol=1e-9, atol=1e-10)
