"""The edit methods end to end on a loaded model: targets, keys, residuals, layer by layer.

The closed-form solves live in ``memit.py`` (MEMIT, AlphaEdit) and ``rome.py``; this file is the loop
around them that the papers describe:

* MEMIT: targets z at the top edited layer for all facts at once (facts that share a subject and a new
  target share one δ, see targets.py); then for layers l₁ < … < l_L bottom-up, keys K at lᵢ (the bare
  prompt's key weighing 1/2 against the mean of the prefixed ones, as compute_ks), residual R = z − h (h recomputed after each layer's update, so later layers only fix what
  earlier ones left), Δᵢ = (R / (L − i)) Kᵀ (λC + K Kᵀ)⁻¹.
* AlphaEdit: the same loop, with the update projected onto the null space of C and the keys of earlier
  batches (``prev_keys``) kept fixed, so sequential batches do not undo each other.
* ROME: one fact, one layer: u = C⁻¹k*, ΔW = (v* − W k*) uᵀ / (uᵀ k*) with the same averaged k* in both
  places (the plain mean over its templates, as compute_u), v* = W k_bare + δ, δ clamped and decayed
  relative to ‖W k_bare‖ (compute_v).

Where a block normalises its MLP output before adding it to the residual stream (Gemma-2/3, OLMo-2), each
layer's residual is first mapped through that norm to the change of W k that produces it (postnorm.py);
elsewhere it is the residual itself.

Every update is applied to the model in place as it is computed (later layers must see it) and returned as
low-rank factors, so the caller can write a revertible delta or take it back off.

Both drivers take ``targets`` computed elsewhere (a TargetResult of ``compute_targets`` on the unedited
model at the method's top layer): the locality study gives every method the same targets, so it compares
the update rules and not the optimisation. ROME then aims each fact at its target z from wherever the
earlier edits left the block output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from covedit.pipeline.delta import add_low_rank
from covedit.pipeline.errors import DataError
from covedit.pipeline.keys import compute_keys, context_templates, memit_key_weights, prompt_token_moment
from covedit.pipeline.memit import alphaedit_solve, memit_solve, null_space_projector
from covedit.pipeline.models import LoadedModel
from covedit.pipeline.rome import rome_update
from covedit.pipeline.postnorm import mlp_residual
from covedit.pipeline.targets import TargetResult, block_outputs, compute_targets, fact_groups, subject_outputs

log = logging.getLogger(__name__)

Factors = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (up (d_model, r), down (r, d_ff))


@dataclass
class EditOutcome:
    factors: Factors
    keys: dict[int, torch.Tensor]  # layer -> (n, d_ff) keys of these facts (AlphaEdit carries them forward)
    timings: dict[str, float] = field(default_factory=dict)
    target_info: dict = field(default_factory=dict)
    z: torch.Tensor | None = None  # (n, d_model) the targets at the top edited layer (MEMIT, AlphaEdit)


def _apply(loaded: LoadedModel, layer: int, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add up @ down to layer's W in place (later layers must see it); return the float32 CPU factors."""
    up32, down32 = up.float().cpu(), down.float().cpu()
    if not (torch.isfinite(up32).all() and torch.isfinite(down32).all()):
        raise DataError(f"The update of layer {layer} has NaN or Inf entries: nothing was written. "
                        "Try a larger λ, fewer facts per batch, or check the statistics.")
    add_low_rank(loaded.down_weight(layer), up32, down32)
    return up32, down32


def _keys(loaded, layer, facts, templates, weights: list[float] | None = None) -> torch.Tensor:
    return compute_keys(loaded, [layer], [f.prompt for f in facts], [f.subject for f in facts], templates,
                        weights=weights)[layer]


def run_memit(loaded: LoadedModel, facts: list, layers: list[int], covariances: dict[int, torch.Tensor] | None,
              lam: float, target_hp, templates: list[str], clock: Callable[[], float],
              alphaedit: dict | None = None, targets: TargetResult | None = None,
              keys_from: str = "templates", key_weights: list[float] | None = None,
              preserve_prompts: float = 0.0) -> EditOutcome:
    """MEMIT (or AlphaEdit when ``alphaedit`` = {"P": {layer: P}, "prev_keys": {layer: K}, "alpha": a}, and
    optionally "lam": λ with ``covariances`` for λC inside the projected solve).

    ``preserve_prompts`` = μ > 0 adds μ Σ k kᵀ over the edited prompts' other tokens to MEMIT's λC
    (memit.py); AlphaEdit ignores it.

    ``key_weights`` weigh ``templates`` in the key average (``key_weights_for``); None takes ``templates``
    as the bare ``"{}"`` followed by one group of prefixes (MEMIT's default). ``keys_from="prompt"`` takes
    each fact's key at its bare rewrite prompt instead (the targets still use the templates)."""
    if keys_from == "prompt":
        key_templates, key_weights = ["{}"], None
    else:
        key_templates = templates
        if key_weights is None:
            key_weights = memit_key_weights([templates[:1], templates[1:]] if templates[0] == "{}" else [templates])
    layers = sorted(layers)
    t0 = clock()
    result = targets if targets is not None else compute_targets(loaded, facts, layers[-1], target_hp, templates)
    timings = {"targets_s": clock() - t0}
    z = result.z.double()
    factors: Factors = {}
    keys_out: dict[int, torch.Tensor] = {}
    t1 = clock()
    for i, layer in enumerate(layers):
        at = loaded.layer_device(layer)  # every tensor of this layer's update lives with its weight
        K = _keys(loaded, layer, facts, key_templates, key_weights).double().T.to(at)  # (d_ff, n)
        keys_out[layer] = K.T.float().cpu()
        R, h = _residual(loaded, facts, layer, layers[-1], z, len(layers) - i)
        if i == 0:
            h_unedited = h
        R = R.T.to(at)  # (d_model, n)
        if alphaedit is None:
            C = covariances[layer].to(at) if covariances is not None else torch.eye(K.shape[0], dtype=torch.float64, device=at)
            C_keep = None
            if preserve_prompts > 0:
                C_keep = preserve_prompts * prompt_token_moment(
                    loaded, layer, [f.prompt for f in facts], [f.subject for f in facts], [f.target_new for f in facts])
            up, down = memit_solve(K, R, C, lam, C_keep)
        else:
            prev = alphaedit["prev_keys"].get(layer)
            C_prev = (prev.to(at).double().T @ prev.to(at).double()) if prev is not None and len(prev) else None
            lam_c = alphaedit.get("lam", 0.0)
            up, down = alphaedit_solve(K, R, alphaedit["P"][layer].to(at), C_prev, alphaedit["alpha"],
                                       covariances[layer].to(at) if lam_c > 0 else None, lam_c)
        factors[layer] = _apply(loaded, layer, up, down)
        log.info("layer %d: update norm %.3g, mean residual norm %.3g", layer,
                 float((up.double() @ down.double()).norm()), float(R.norm(dim=0).mean()))
    timings["solve_s"] = clock() - t1
    info = {"nll_before": result.nll_before.tolist(), "nll_after": result.nll_after.tolist(),
            "steps": result.steps_taken.tolist(), "realised": realised_share(loaded, facts, layers[-1], z, h_unedited)}
    if targets is None:  # the facts that shared one δ (same subject and target), by id
        info["merged"] = [[facts[i].id for i in g] for g in fact_groups(facts) if len(g) > 1]
    return EditOutcome(factors, keys_out, timings, info, result.z)


def _residual(loaded: LoadedModel, facts: list, layer: int, top: int, z: torch.Tensor, share: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``layer``'s down-projection output should move by for each fact (n, d_model, float64): its
    share 1/``share`` of the gap between z and the top layer's block output h now, mapped through the
    block's post-MLP norm where it has one (postnorm.py); and h."""
    norm = loaded.post_mlp_norm(layer)
    watched = [loaded.block(top)] + ([loaded.down_proj(layer)] if norm is not None else [])
    seen = subject_outputs(loaded, facts, watched, 64)
    h = seen[0].double()
    gap = (z.to(h.device) - h) / share
    return (gap if norm is None else mlp_residual(norm, seen[1].to(h.device), gap)), h


def realised_share(loaded: LoadedModel, facts: list, layer: int, z: torch.Tensor, h_unedited: torch.Tensor) -> list[float]:
    """Per fact, how much of the way from h to its target z the edited weights went at ``layer`` on the bare
    prompt: 1 − ‖z − h_edited‖ / ‖z − h_unedited‖ (1: z written exactly; λ, and keys averaged over context
    templates rather than the bare prompt's own, keep it below 1)."""
    h_edited = block_outputs(loaded, facts, layer, 64).double()
    z = z.to(h_edited.device)
    gap = (z - h_unedited.to(h_edited.device)).norm(dim=1).clamp(min=1e-30)
    return (1 - (z - h_edited).norm(dim=1) / gap).tolist()


def alphaedit_projectors(covariances: dict[int, torch.Tensor], threshold: float, energy: float = 0.0
                         ) -> dict[int, torch.Tensor]:
    return {layer: null_space_projector(C, threshold, energy) for layer, C in covariances.items()}


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
        delta = _residual(loaded, [fact], layer, layer, result.z.double(), 1)[0][0]  # W k_bare moves by this
        timings["targets_s"] += clock() - t0
        t1 = clock()
        k_star = _keys(loaded, layer, [fact], templates)[0].double()
        k_bare = _keys(loaded, layer, [fact], ["{}"])[0].double()
        W = loaded.down_weight(layer).double()
        delta = delta.double().to(W.device)
        v_star = W @ k_bare.to(W.device) + delta
        C = covariance.to(W.device) if covariance is not None else None
        up, down = rome_update(W, k_star.to(W.device), v_star, C)
        up, down = _apply(loaded, layer, up, down)
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


def template_groups(loaded: LoadedModel, hp) -> list[list[str]]:
    """The context templates of a method's hyperparameters, grouped: ``["{}"]``, then the generated prefixes
    of each length (as MEMIT: ``n_templates`` per length in all, spread over the five starter words)."""
    groups, seen = [["{}"]], {"{}"}
    for length in hp.template_lengths:
        group = [t for t in context_templates(loaded, max(1, hp.n_templates // 5), length) if t not in seen]
        seen.update(group)
        groups.append(group)
    return [g for g in groups if g]


def templates_for(loaded: LoadedModel, hp) -> list[str]:
    """The context templates of a method's hyperparameters, flat: "{}" plus generated prefixes of each length."""
    return [t for g in template_groups(loaded, hp) for t in g]


def key_weights_for(loaded: LoadedModel, hp) -> list[float]:
    """MEMIT's (and AlphaEdit's) key weights over ``templates_for``: each group weighs the same."""
    return memit_key_weights(template_groups(loaded, hp))
