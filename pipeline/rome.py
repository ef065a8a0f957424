"""ROME: one rank-one update of an MLP down-projection that maps one key k* to one value v*.

Conventions shared with memit.py: W is (d_model, d_ff) with ``out = W @ k`` (``LoadedModel.down_weight``),
C = E[k kᵀ] is the uncentred second moment (sum / count) of the keys, and every solve runs in float64 by
Cholesky, never through an explicit inverse. Updates come back as low-rank factors, ΔW = up @ down.

Two variants:

* covariance: u = C⁻¹ k*, ΔW = (v* − W k*) uᵀ / (uᵀ k*). The same averaged k* appears in numerator and
  denominator (kmeng01/rome mixed the bare-prompt key into the denominator, which occasionally makes the
  update explode). W' k* = v*, and W' x = W x for every x with uᵀ x = 0.
* identity (``--covariance identity``, the plain update of the seed study): ΔW = (v* − W k*) k*ᵀ / (k*ᵀ k*),
  the least-norm change that maps k* to v*; it leaves x ⟂ k* unchanged.

The driver (``run_rome``) edits one fact after another (each sees the previous edits) at one layer, with
the same averaged k* in both places (the plain mean over its templates, as compute_u) and
v* = W k_bare + δ, δ optimised at the MLP output and clamped and decayed relative to ‖W k_bare‖ (compute_v).
Given ``targets`` from elsewhere, it aims each fact at its target z from wherever the earlier edits left
the block output.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from covedit.pipeline.edit import EditOutcome, Factors, apply_update, keys_at, residual
from covedit.pipeline.errors import DataError
from covedit.pipeline.models import LoadedModel
from covedit.pipeline.targets import TargetResult, compute_targets

log = logging.getLogger(__name__)

JITTER = 1e-9  # diagonal added, relative to the mean diagonal, when a matrix is not numerically PD


def cholesky_psd(A: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor of a symmetric float64 matrix that should be positive definite.

    If the factorisation fails (PSD but singular to rounding, e.g. too few tokens behind C), retry once
    with a diagonal jitter of ``JITTER`` times the mean diagonal and log a warning; if that fails too the
    matrix is genuinely not usable and a DataError names ``what``.
    """
    if not torch.isfinite(A).all():
        raise DataError(f"The {what} contains NaN or Inf values.")
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return L
    scale = float(torch.diagonal(A).mean())
    if not scale > 0:
        raise DataError(f"The {what} is not positive definite (its mean diagonal is {scale:.3g}).")
    jitter = JITTER * scale
    log.warning("the %s is not numerically positive definite; retrying Cholesky with a diagonal jitter of %.3g",
                what, jitter)
    L, info = torch.linalg.cholesky_ex(A + jitter * torch.eye(A.shape[0], dtype=A.dtype, device=A.device))
    if int(info) != 0:
        raise DataError(f"The {what} is not positive definite, even with a diagonal jitter of {jitter:.3g}.")
    return L


def rome_update(W: Tensor, k: Tensor, v: Tensor, C: Tensor | None) -> tuple[Tensor, Tensor]:
    """Rank-one ΔW = up @ down so that (W + ΔW) k = v; C None gives the identity variant.

    W (d_model, d_ff), k (d_ff,), v (d_model,), C (d_ff, d_ff) or None. Returns float64
    up (d_model, 1) = v − W k and down (1, d_ff) = uᵀ / (uᵀ k), with u = C⁻¹ k or u = k.
    """
    device = C.device if C is not None else W.device
    W64 = W.detach().to(device, torch.float64)
    k64 = k.detach().reshape(-1).to(device, torch.float64)
    v64 = v.detach().reshape(-1).to(device, torch.float64)
    if k64.shape[0] != W64.shape[1] or v64.shape[0] != W64.shape[0]:
        raise ValueError(f"rome_update: W {tuple(W.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if C is None:
        u = k64
    else:
        C64 = C.detach().to(device, torch.float64)
        L = cholesky_psd(C64, "key covariance C")
        u = torch.cholesky_solve(k64[:, None], L)[:, 0]
    denom = float(u @ k64)
    if not (denom > 0 and math.isfinite(denom)):
        which = "kᵀk" if C is None else "kᵀC⁻¹k"
        raise DataError(f"The ROME update is undefined: {which} of the edit key is {denom:.3g}, not a positive number.")
    up = (v64 - W64 @ k64)[:, None]
    down = (u / denom)[None, :]
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise DataError("The ROME update contains NaN or Inf values (check the key and target vectors).")
    return up, down


def run_rome(loaded: LoadedModel, facts: list, layer: int, covariance: torch.Tensor | None, target_hp,
             templates: list[str], clock: Callable[[], float], targets: TargetResult | None = None) -> EditOutcome:
    """ROME, one fact after another (each sees the previous edits), rank one each."""
    factors: Factors = {}
    keys_out = []
    timings = {"targets_s": 0.0, "solve_s": 0.0}
    infos = []
    for i, fact in enumerate(facts):
        t0 = clock()
        result = (compute_targets(loaded, [fact], layer, target_hp, templates, relative_to="mlp")
                  if targets is None else targets.select([i]))
        delta = residual(loaded, [fact], layer, layer, result.z.double(), 1)[0][0]  # W k_bare moves by this
        timings["targets_s"] += clock() - t0
        t1 = clock()
        k_star = keys_at(loaded, layer, [fact], templates)[0].double()
        k_bare = keys_at(loaded, layer, [fact], ["{}"])[0].double()
        W = loaded.down_weight(layer).double()
        delta = delta.double().to(W.device)
        v_star = W @ k_bare.to(W.device) + delta
        C = covariance.to(W.device) if covariance is not None else None
        up, down = rome_update(W, k_star.to(W.device), v_star, C)
        up, down = apply_update(loaded, layer, up, down)
        if layer in factors:
            old_up, old_down = factors[layer]
            factors[layer] = (torch.cat([old_up, up], 1), torch.cat([old_down, down], 0))
        else:
            factors[layer] = (up, down)
        keys_out.append(k_star.float().cpu())
        timings["solve_s"] += clock() - t1
        infos.append({"nll_before": result.nll_before.tolist()[0], "nll_after": result.nll_after.tolist()[0]})
    return EditOutcome(factors, {layer: torch.stack(keys_out)}, timings,
                       {"nll_before": [i["nll_before"] for i in infos], "nll_after": [i["nll_after"] for i in infos]})
