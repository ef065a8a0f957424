"""MEMIT and AlphaEdit: the closed-form batch updates of one down-projection, then the multi-layer driver.

The mathematics comes first in this file. Conventions as in rome.py: W is (d_model, d_ff) with
``out = W @ k``; K (d_ff, n) holds one key per column, R (d_model, n) the residuals each key's output
should move by; C = E[k kᵀ] (sum / count, uncentred, which is what MEMIT's λ ≈ 15,000-20,000 and
AlphaEdit's 2e-2 eigenvalue threshold assume). Everything is solved in float64, by Cholesky for the
symmetric MEMIT system and by LU for AlphaEdit's non-symmetric one; no explicit inverses. Updates come back
as low-rank factors ΔW = up @ down with r = n.

* MEMIT (kmeng01/memit): Δ = R Kᵀ (λC + K Kᵀ)⁻¹, the least-squares map of the new keys onto their
  residuals, regularised by λ times the keys the layer already serves. Optionally (covedit's
  ``preserve_prompts`` = μ, 0 in the reference) also μ·Σ k kᵀ over the *other* tokens of the edited prompts
  (``C_keep``): Δ = R Kᵀ (λC + C_keep + K Kᵀ)⁻¹ minimises Σ‖Δk − r‖² over the edited keys, plus
  μ Σ‖Δk‖² over the other tokens of those prompts (their outputs should stay as they were), plus λ
  tr(Δ C Δᵀ). Those tokens ("The capital of", "?", the answer's first tokens) are exactly the ones that
  prompts of the same relation about other subjects share.
* AlphaEdit (jianghoucheng/AlphaEdit, AlphaEdit_main.py): Δᵀ = (P (K Kᵀ + C_prev) + α I)⁻¹ P K Rᵀ, where P
  projects onto the near-null space of C, so Δ k ≈ 0 for the keys the layer already serves, and C_prev
  holds K Kᵀ of earlier sequential batches so that later batches do not undo them.
  The reference takes P over the eigenvalues of C below an absolute threshold (2e-2). Where C has no
  eigenvalue that small (SmolLM2: none below 1e-3, and 2e-2 is its median eigenvalue) that "null space"
  holds a fifth to almost half of ordinary tokens' key energy, so covedit can instead take the smallest
  eigen-directions that together hold at most a fraction ε of C's energy (``energy``: tr(P C) ≤ ε tr(C),
  so ordinary keys keep at most ε of their mean squared norm inside the space the edit may write), and can
  keep λC inside the solve: Δᵀ = (P (K Kᵀ + C_prev + λC) + α I)⁻¹ P K Rᵀ, which is MEMIT's solve when
  P = I and α = 0.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from covedit.pipeline.errors import DataError, UsageError
from covedit.pipeline.rome import cholesky_psd

log = logging.getLogger(__name__)


def _check_keys(K: Tensor, R: Tensor, d_ff: int) -> None:
    if K.ndim != 2 or R.ndim != 2 or K.shape[0] != d_ff or K.shape[1] != R.shape[1]:
        raise ValueError(f"keys {tuple(K.shape)} and residuals {tuple(R.shape)} "
                         f"do not fit a layer with d_ff={d_ff}")
    if not (torch.isfinite(K).all() and torch.isfinite(R).all()):
        raise DataError("The edit keys or residuals contain NaN or Inf values.")


def memit_solve(K: Tensor, R: Tensor, C: Tensor, lam: float, C_keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """MEMIT's Δ = R Kᵀ (λC + C_keep + K Kᵀ)⁻¹ as float64 factors up = R (d_model, n), down (n, d_ff).

    down = [(λC + C_keep + K Kᵀ)⁻¹ K]ᵀ; the matrix is symmetric, so Kᵀ A⁻¹ = (A⁻¹ K)ᵀ exactly. ``C_keep``
    (d_ff, d_ff, PSD, None = 0) is a raw sum of k kᵀ over keys whose outputs should not move, already weighted.
    Computed on C's device.
    """
    if not lam >= 0:
        raise UsageError(f"The MEMIT covariance weight λ must be zero or positive, got {lam}.")
    device = C.device
    C64 = C.detach().to(torch.float64)
    K64 = K.detach().to(device, torch.float64)
    R64 = R.detach().to(device, torch.float64)
    _check_keys(K64, R64, C64.shape[0])
    A = lam * C64 + K64 @ K64.T
    if C_keep is not None:
        A = A + C_keep.detach().to(device, torch.float64)
    L = cholesky_psd(A, "MEMIT system λC + KKᵀ")
    X = torch.cholesky_solve(K64, L)  # (d_ff, n) = A⁻¹ K
    if not torch.isfinite(X).all():
        raise DataError("The MEMIT solve produced NaN or Inf values (λC + KKᵀ is too ill-conditioned).")
    return R64, X.T.contiguous()


def null_space_projector(C: Tensor, threshold: float = 2e-2, energy: float = 0.0) -> Tensor:
    """P = U Uᵀ over the eigenvectors of C (float64, d_ff × d_ff): those with eigenvalue < ``threshold``
    (AlphaEdit), or, when ``energy`` > 0, the smallest ones whose eigenvalues sum to at most ``energy`` ×
    tr(C) (so tr(P C) ≤ energy · tr(C); energy ≥ 1 gives P = I).

    C = E[k kᵀ] is symmetric, so eigh (not AlphaEdit's SVD, which gives the same vectors for a PSD matrix);
    it is symmetrised first so rounding in the stored sums cannot make eigh see an asymmetric matrix.
    """
    C64 = C.detach().to(torch.float64)
    if not torch.isfinite(C64).all():
        raise DataError("The key covariance C contains NaN or Inf values.")
    if energy < 0:
        raise UsageError(f"The null-space energy fraction must be >= 0, got {energy}.")
    evals, evecs = torch.linalg.eigh((C64 + C64.T) / 2)  # ascending
    if energy > 0:
        energy_of = evals.clamp(min=0)
        share = energy_of.cumsum(0) / energy_of.sum()
        chosen = (share <= energy) if energy < 1 else torch.ones_like(share, dtype=torch.bool)
        how = f"hold at most {energy:g} of C's energy"
    else:
        chosen = evals < threshold
        how = f"have eigenvalue < {threshold:g}"
    U = evecs[:, chosen]
    log.info("null space: %d of %d directions %s", U.shape[1], C64.shape[0], how)
    if U.shape[1] == 0:
        log.warning("no direction of C qualifies (%s): the AlphaEdit projector is zero and no edit will be made", how)
    return U @ U.T


def alphaedit_solve(K: Tensor, R: Tensor, P: Tensor, C_prev: Tensor | None, alpha: float,
                    C: Tensor | None = None, lam: float = 0.0) -> tuple[Tensor, Tensor]:
    """AlphaEdit's Δ = ((P (K Kᵀ + C_prev + λC) + α I)⁻¹ P K Rᵀ)ᵀ as float64 factors up = R, down (n, d_ff);
    λC only when ``lam`` > 0 (0 in the reference).

    The reference solves for the (d_ff, d_model) matrix Δᵀ directly; solving for (P(KKᵀ+C_prev)+αI)⁻¹ P K
    (d_ff, n) and keeping R aside is the same product, cheaper. The system is not symmetric (P on the left
    only), hence LU (torch.linalg.solve). down's rows lie in the range of P, so Δ = Δ P.
    """
    if not alpha >= 0 or (alpha == 0 and lam == 0):
        raise UsageError(f"The AlphaEdit ridge α must be positive (or zero with λ > 0), got {alpha}.")
    if not lam >= 0:
        raise UsageError(f"The AlphaEdit covariance weight λ must be zero or positive, got {lam}.")
    device = P.device
    P64 = P.detach().to(torch.float64)
    K64 = K.detach().to(device, torch.float64)
    R64 = R.detach().to(device, torch.float64)
    _check_keys(K64, R64, P64.shape[0])
    M = K64 @ K64.T
    if C_prev is not None:
        M = M + C_prev.detach().to(device, torch.float64)
    if lam > 0:
        if C is None:
            raise UsageError("AlphaEdit with λ > 0 needs the covariance C.")
        M = M + lam * C.detach().to(device, torch.float64)
    A = P64 @ M + alpha * torch.eye(P64.shape[0], dtype=torch.float64, device=device)
    try:
        X = torch.linalg.solve(A, P64 @ K64)  # (d_ff, n)
    except torch.linalg.LinAlgError as e:
        raise DataError("The AlphaEdit system P(KKᵀ + C_prev) + αI is singular; increase α.") from e
    if not torch.isfinite(X).all():
        raise DataError("The AlphaEdit solve produced NaN or Inf values (check the keys and C_prev).")
    return R64, X.T.contiguous()
