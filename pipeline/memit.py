"""MEMIT and AlphaEdit: the closed-form batch updates of one down-projection, then the multi-layer driver.

The driver (``run_memit``) is the loop the papers describe: targets z at the top edited layer for all facts
at once (facts that share a subject and a new target share one δ, see targets.py); then for layers
l₁ < … < l_L bottom-up, keys K at lᵢ (the bare prompt's key weighing 1/2 against the mean of the prefixed
ones, as compute_ks), residual R = z − h (h recomputed after each layer's update, so later layers only fix
what earlier ones left), Δᵢ = (R / (L − i)) Kᵀ (λC + K Kᵀ)⁻¹. AlphaEdit runs the same loop with the
projected solve below, the keys of earlier sequential batches (``prev_keys``) kept fixed. ``targets``
computed elsewhere (compute_targets on the unedited model at the top layer) may be passed in, so that
studies compare update rules on the same targets.

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
  prompts of the same relation about other subjects share. Likewise (``preserve_relation`` = ν, 0 in the
  reference) ν times the mean k kᵀ of each edited prompt with ordinary entity names in its subject's place
  ("The capital of Erbium is"): the key a same-relation prompt about *another* subject produces shares the
  relation's context with the edited key, and this term asks Δ to leave that shared part's output alone.
* AlphaEdit (jianghoucheng/AlphaEdit, AlphaEdit_main.py): Δᵀ = (P (K Kᵀ + C_prev) + α I)⁻¹ P K Rᵀ, where P
  projects onto the near-null space of C, so Δ k ≈ 0 for the keys the layer already serves, and C_prev
  holds K Kᵀ of earlier sequential batches so that later batches do not undo them. MEMIT can carry them
  too (``protected_keys``, not in the reference): Δ = R Kᵀ (λC + K_prev K_prevᵀ + K Kᵀ)⁻¹ is the least-squares
  edit of all batches' keys at once, the earlier ones' residuals already written (so asked to stay 0).
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
from collections.abc import Callable

import torch
from torch import Tensor

from covedit.pipeline.edit import EditOutcome, Factors, apply_update, keys_at, realised_share, residual
from covedit.pipeline.errors import DataError, UsageError
from covedit.pipeline.keys import KeyWalk, memit_key_weights, prompt_token_moment, relation_key_moment
from covedit.pipeline.models import LoadedModel
from covedit.pipeline.rome import cholesky_psd
from covedit.pipeline.targets import TargetResult, compute_targets, fact_groups

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


def alphaedit_projectors(covariances: dict[int, torch.Tensor], threshold: float, energy: float = 0.0
                         ) -> dict[int, torch.Tensor]:
    return {layer: null_space_projector(C, threshold, energy) for layer, C in covariances.items()}


def fact_keys(loaded: LoadedModel, layer: int, facts: list, templates: list[str], keys_from: str = "templates",
              key_weights: list[float] | None = None) -> torch.Tensor:
    """Each fact's key at ``layer`` (n, d_ff) as the solve takes it: the subject's last token averaged over
    ``templates`` with ``key_weights`` (None: the bare ``"{}"`` against one group of prefixes, MEMIT's
    default), or at the bare rewrite prompt with ``keys_from="prompt"``. Keys to keep (``batch-edit --keep``)
    are taken the same way, so that they meet the edited keys in one space."""
    templates, key_weights = _key_spec(templates, keys_from, key_weights)
    return keys_at(loaded, layer, facts, templates, key_weights)


def key_walk(loaded: LoadedModel, facts: list, templates: list[str], keys_from: str = "templates",
             key_weights: list[float] | None = None) -> KeyWalk:
    """The facts' keys layer after layer (``fact_keys`` at each), for a loop that updates the layers bottom-up."""
    templates, key_weights = _key_spec(templates, keys_from, key_weights)
    return KeyWalk(loaded, [f.prompt for f in facts], [f.subject for f in facts], templates, key_weights)


def _key_spec(templates: list[str], keys_from: str, key_weights: list[float] | None) -> tuple[list[str], list[float] | None]:
    """The templates and weights that ``keys_from`` and ``key_weights`` ask for (see fact_keys)."""
    if keys_from == "prompt":
        return ["{}"], None
    if key_weights is None:
        key_weights = memit_key_weights([templates[:1], templates[1:]] if templates[0] == "{}" else [templates])
    return templates, key_weights


def protected_rows(*sources: tuple[dict[int, torch.Tensor], float]) -> dict[int, torch.Tensor]:
    """The keys a solve must leave alone, per layer, from several sources each with its weight w (0 leaves
    the source out): each source's rows scaled by √w, so that their Σ k kᵀ carries w Σ k kᵀ into the one
    preservation term (MEMIT's, added to λC) or AlphaEdit's C_prev. A batch-edit sequence gives the earlier
    batches' keys weight ``preserve_earlier`` and ``--keep`` facts' keys weight 1, a new key's own."""
    out: dict[int, torch.Tensor] = {}
    for keys, weight in sources:
        if weight <= 0:
            continue
        for layer, k in keys.items():
            if k is None or not len(k):
                continue
            rows = k * weight ** 0.5
            out[layer] = rows if layer not in out else torch.cat([out[layer], rows])
    return out


def run_memit(loaded: LoadedModel, facts: list, layers: list[int], covariances: dict[int, torch.Tensor] | None,
              lam: float, target_hp, templates: list[str], clock: Callable[[], float],
              alphaedit: dict | None = None, targets: TargetResult | None = None,
              keys_from: str = "templates", key_weights: list[float] | None = None,
              preserve_prompts: float = 0.0, preserve_relation: float = 0.0, relation_subjects: int = 16,
              protected_keys: dict[int, torch.Tensor] | None = None) -> EditOutcome:
    """MEMIT (or AlphaEdit when ``alphaedit`` = {"P": {layer: P}, "prev_keys": {layer: K}, "alpha": a}, and
    optionally "lam": λ with ``covariances`` for λC inside the projected solve).

    ``preserve_prompts`` = μ > 0 adds μ Σ k kᵀ over the edited prompts' other tokens to MEMIT's λC
    (memit.py); AlphaEdit ignores it. ``preserve_relation`` = ν > 0 adds ν Σ k kᵀ of the edited prompts with
    ``relation_subjects`` ordinary entity names in place of their subjects (keys.relation_key_moment).
    ``protected_keys`` ({layer: (m, d_ff)}, MEMIT only) are keys whose outputs this solve must leave alone
    (Δ k ≈ 0): earlier sequential batches' keys, kept facts' keys. Their Σ k kᵀ is added to λC as it is, so
    each source's weight is already in its rows (``protected_rows``).

    ``key_weights`` weigh ``templates`` in the key average (``key_weights_for``); None takes ``templates``
    as the bare ``"{}"`` followed by one group of prefixes (MEMIT's default). ``keys_from="prompt"`` takes
    each fact's key at its bare rewrite prompt instead (the targets still use the templates)."""
    layers = sorted(layers)
    t0 = clock()
    result = targets if targets is not None else compute_targets(loaded, facts, layers[-1], target_hp, templates)
    timings = {"targets_s": clock() - t0}
    z = result.z.double()
    factors: Factors = {}
    keys_out: dict[int, torch.Tensor] = {}
    t1 = clock()
    walk = key_walk(loaded, facts, templates, keys_from, key_weights)
    for i, layer in enumerate(layers):
        at = loaded.layer_device(layer)  # every tensor of this layer's update lives with its weight
        K = walk(layer).double().T.to(at)  # (d_ff, n)
        keys_out[layer] = K.T.float().cpu()
        R, h = residual(loaded, facts, layer, layers[-1], z, len(layers) - i)
        if i == 0:
            h_unedited = h
        R = R.T.to(at)  # (d_model, n)
        if alphaedit is None:
            C = covariances[layer].to(at) if covariances is not None else torch.eye(K.shape[0], dtype=torch.float64, device=at)
            C_keep = None
            if preserve_prompts > 0:
                C_keep = preserve_prompts * prompt_token_moment(
                    loaded, layer, [f.prompt for f in facts], [f.subject for f in facts], [f.target_new for f in facts])
            if preserve_relation > 0:
                moment = preserve_relation * relation_key_moment(
                    loaded, layer, [f.prompt for f in facts], [f.subject for f in facts], relation_subjects)
                C_keep = moment if C_keep is None else C_keep + moment
            protected = (protected_keys or {}).get(layer)
            if protected is not None and len(protected):
                moment = protected.to(at).double().T @ protected.to(at).double()
                C_keep = moment if C_keep is None else C_keep + moment
            up, down = memit_solve(K, R, C, lam, C_keep)
        else:
            prev = alphaedit["prev_keys"].get(layer)
            C_prev = (prev.to(at).double().T @ prev.to(at).double()) if prev is not None and len(prev) else None
            lam_c = alphaedit.get("lam", 0.0)
            up, down = alphaedit_solve(K, R, alphaedit["P"][layer].to(at), C_prev, alphaedit["alpha"],
                                       covariances[layer].to(at) if lam_c > 0 else None, lam_c)
        factors[layer] = apply_update(loaded, layer, up, down)
        log.info("layer %d: update norm %.3g, mean residual norm %.3g", layer,
                 float((up.double() @ down.double()).norm()), float(R.norm(dim=0).mean()))
    timings["solve_s"] = clock() - t1
    info = {"nll_before": result.nll_before.tolist(), "nll_after": result.nll_after.tolist(),
            "steps": result.steps_taken.tolist(), "realised": realised_share(loaded, facts, layers[-1], z, h_unedited)}
    if targets is None:  # the facts that shared one δ (same subject and target), by id
        info["merged"] = [[facts[i].id for i in g] for g in fact_groups(facts) if len(g) > 1]
    return EditOutcome(factors, keys_out, timings, info, result.z)
