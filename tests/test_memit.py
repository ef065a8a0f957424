"""MEMIT and AlphaEdit (pipeline/memit.py): the solves against their defining properties and against direct
float64 evaluations with explicit inverses, on random data; then run_memit, the driver, on tiny models:
exact algebra of keys, targets reached, λ's trade-off, given targets, keys from the bare prompt."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import D_FF, D_MODEL, FACTS, FAST, covariance, f64, rand, rel
from covedit.pipeline.errors import DataError, UsageError
from covedit.pipeline.facts import Fact
from covedit.pipeline.memit import alphaedit_solve, memit_solve, null_space_projector, run_memit
from covedit.pipeline.targets import block_outputs


def spectrum_covariance(small: int, seed=2):
    """C = Q diag(eigs) Qᵀ with ``small`` eigenvalues below AlphaEdit's 2e-2; returns C, Q_small, Q_large."""
    Q, _ = torch.linalg.qr(rand(D_FF, D_FF, seed=seed))
    eigs = torch.cat([torch.linspace(1e-4, 1e-2, small, dtype=f64), torch.linspace(0.5, 8.0, D_FF - small, dtype=f64)])
    return Q @ torch.diag(eigs) @ Q.T, Q[:, :small], Q[:, small:]


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


# ------------------------------------------------------------------------------ run_memit on tiny models

def test_memit_keys_weigh_the_bare_prompt_half_and_merged_facts_are_listed(tiny):
    """MEMIT's default key average is compute_ks' (bare 1/2, prefixes 1/2 together), and facts that share a
    subject and target (one δ) are named in target_info["merged"]."""
    from covedit.pipeline.keys import compute_keys
    templates = ["{}", "Hello there. {}", "Because of this, {}"]
    twin = Fact("a2", "Eiffel Tower", "Where is the {}? It is in", "Rome")
    facts = FACTS + [twin]
    out = run_memit(tiny, facts, [2], None, 1e-8, FAST, templates, lambda: 0.0)
    want = compute_keys(tiny, [2], [f.prompt for f in facts], [f.subject for f in facts], templates,
                        weights=[0.5, 0.25, 0.25])[2]
    torch.testing.assert_close(out.keys[2], want, rtol=0, atol=1e-6)
    assert out.target_info["merged"] == [["a", "a2"]]


def test_memit_single_layer_reaches_targets_exactly(tiny):
    """λ → 0, one layer, bare template: after the update the block output at every subject equals z."""
    layer = 2
    out = run_memit(tiny, FACTS, [layer], None, 1e-8, FAST, ["{}"], lambda: 0.0)
    after = block_outputs(tiny, FACTS, layer, 8)
    torch.testing.assert_close(after, out.z, rtol=1e-4, atol=1e-5)
    assert (out.z - block_outputs(tiny, FACTS, layer, 8)).abs().max() < 1e-4


def test_memit_spreads_over_layers_and_reaches_targets(tiny):
    """Two layers, λ → 0: bottom-up with recomputed residuals, the top layer still ends at z."""
    out = run_memit(tiny, FACTS, [1, 2], None, 1e-8, FAST, ["{}"], lambda: 0.0)
    torch.testing.assert_close(block_outputs(tiny, FACTS, 2, 8), out.z, rtol=1e-4, atol=1e-5)
    assert set(out.factors) == {1, 2} and all(u.shape[1] == 3 for u, _ in out.factors.values())
    assert out.target_info["realised"] == pytest.approx([1.0] * 3, abs=1e-3)


def test_realised_share_falls_with_lambda(tiny):
    """A large λ keeps the update near zero: the targets are barely written, and the share says so."""
    originals = tiny.down_weight(2).detach().clone()
    exact = run_memit(tiny, FACTS, [2], None, 1e-8, FAST, ["{}"], lambda: 0.0).target_info["realised"]
    with torch.no_grad():
        tiny.down_weight(2).copy_(originals)
    damped = run_memit(tiny, FACTS, [2], None, 1e6, FAST, ["{}"], lambda: 0.0).target_info["realised"]
    assert all(abs(r - 1) < 1e-3 for r in exact) and all(0 <= r < 0.5 for r in damped)


def test_memit_with_given_targets_equals_memit_computing_them(tiny):
    """The locality study hands every method the same targets: that must be exactly MEMIT's own run."""
    from covedit.pipeline.targets import compute_targets

    originals = {layer: tiny.down_weight(layer).detach().clone() for layer in (1, 2)}
    own = run_memit(tiny, FACTS, [1, 2], None, 0.5, FAST, ["{}"], lambda: 0.0)
    with torch.no_grad():
        for layer, W in originals.items():
            tiny.down_weight(layer).copy_(W)
    targets = compute_targets(tiny, FACTS, 2, FAST, ["{}"])
    given = run_memit(tiny, FACTS, [1, 2], None, 0.5, FAST, ["{}"], lambda: 0.0, targets=targets)
    for layer in (1, 2):
        for a, b in zip(own.factors[layer], given.factors[layer]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert given.timings["targets_s"] == 0.0


def test_keys_from_prompt_writes_the_target_exactly_at_the_bare_prompt(tiny):
    """λ → 0, one layer, context templates: with keys averaged over the templates the bare prompt's block
    output misses z (its key is not the average); with the bare prompt's own key it is z."""
    from covedit.pipeline.targets import compute_targets

    templates = ["{}", "Hello there. {}", "Because of this, {}"]
    targets = compute_targets(tiny, FACTS, 2, FAST, templates)
    originals = tiny.down_weight(2).detach().clone()
    averaged = run_memit(tiny, FACTS, [2], None, 1e-8, FAST, templates, lambda: 0.0, targets=targets)
    with torch.no_grad():
        tiny.down_weight(2).copy_(originals)
    own = run_memit(tiny, FACTS, [2], None, 1e-8, FAST, templates, lambda: 0.0, targets=targets, keys_from="prompt")
    torch.testing.assert_close(block_outputs(tiny, FACTS, 2, 8), targets.z, rtol=1e-4, atol=1e-5)
    assert own.target_info["realised"] == pytest.approx([1.0] * 3, abs=1e-3)
    assert max(averaged.target_info["realised"]) < 0.999


def test_memit_protected_keys_solve_with_their_moment_added(tiny):
    """protected_keys: the single-layer update is R Kᵀ (λC + K_p K_pᵀ + K Kᵀ)⁻¹ (identity C here), and it
    moves the protected keys' outputs less than the same edit without them."""
    from covedit.pipeline.edit import keys_at
    from covedit.pipeline.targets import compute_targets

    targets = compute_targets(tiny, FACTS, 2, FAST, ["{}"])
    original = tiny.down_weight(2).detach().clone()
    torch.manual_seed(1)
    prev = torch.randn(5, tiny.d_ff)
    alone = run_memit(tiny, FACTS, [2], None, 0.3, FAST, ["{}"], lambda: 0.0, targets=targets)
    with torch.no_grad():
        tiny.down_weight(2).copy_(original)
    carried = run_memit(tiny, FACTS, [2], None, 0.3, FAST, ["{}"], lambda: 0.0, targets=targets,
                        protected_keys={2: prev})
    up, down = (f.double() for f in carried.factors[2])
    K = keys_at(tiny, 2, FACTS, ["{}"], None).double().T  # (d_ff, n), as run_memit reads them
    P = prev.double()
    A = 0.3 * torch.eye(tiny.d_ff, dtype=torch.float64) + P.T @ P + K @ K.T
    torch.testing.assert_close(up @ down, up @ torch.linalg.solve(A, K).T, rtol=1e-6, atol=1e-9)
    moved = lambda f: float((f[0].double() @ f[1].double() @ P.T).norm())  # noqa: E731
    assert moved(carried.factors[2]) < moved(alone.factors[2])


def test_protected_rows_carry_each_sources_weight_into_one_moment():
    """protected_rows((K1, w1), (K2, w2)): rows √w1 K1 then √w2 K2 per layer, so their Σ k kᵀ is
    w1 K1ᵀK1 + w2 K2ᵀK2; weight 0 leaves a source out (preserve_earlier=0: each batch solved alone), and a
    layer only one source has gets that source's rows."""
    from covedit.pipeline.memit import protected_rows

    torch.manual_seed(1)
    earlier, kept, other = torch.randn(5, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8)
    rows = protected_rows(({2: earlier, 3: other}, 4.0), ({2: kept}, 1.0))
    torch.testing.assert_close(rows[2].T @ rows[2], 4.0 * earlier.T @ earlier + kept.T @ kept, rtol=1e-12, atol=1e-12)
    assert torch.equal(rows[2][5:], kept) and torch.equal(rows[3], 2.0 * other)
    assert protected_rows(({2: earlier}, 0.0), ({2: kept}, 1.0)).keys() == {2}
    assert torch.equal(protected_rows(({2: earlier}, 0.0), ({2: kept}, 1.0))[2], kept)
    assert protected_rows(({2: earlier}, 0.0)) == {}
