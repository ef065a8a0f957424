"""What every edit method shares: the outcome it returns, applying an update in place, the keys and the
residual at a layer, how much of a target the weights realised, and the context templates.

Each method's loop and its closed-form solve read together in its own file: MEMIT and AlphaEdit in
``memit.py``, ROME in ``rome.py``. Where a block normalises its MLP output before adding it to the residual
stream (Gemma-2/3, OLMo-2), a layer's residual is first mapped through that norm to the change of W k that
produces it (postnorm.py); elsewhere it is the residual itself.

Every update is applied to the model in place as it is computed (later layers, and later facts, must see
it) and returned as low-rank factors, so the caller can write a revertible delta or take it back off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from covedit.pipeline.delta import add_low_rank
from covedit.pipeline.errors import DataError
from covedit.pipeline.keys import compute_keys, context_templates, memit_key_weights
from covedit.pipeline.models import LoadedModel
from covedit.pipeline.postnorm import mlp_residual
from covedit.pipeline.targets import block_outputs, subject_outputs

log = logging.getLogger(__name__)

Factors = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (up (d_model, r), down (r, d_ff))


@dataclass
class EditOutcome:
    factors: Factors
    keys: dict[int, torch.Tensor]  # layer -> (n, d_ff) keys of these facts (AlphaEdit carries them forward)
    timings: dict[str, float] = field(default_factory=dict)
    target_info: dict = field(default_factory=dict)
    z: torch.Tensor | None = None  # (n, d_model) the targets at the top edited layer (MEMIT, AlphaEdit)


def apply_update(loaded: LoadedModel, layer: int, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add up @ down to layer's W in place (later layers must see it); return the float32 CPU factors."""
    up32, down32 = up.float().cpu(), down.float().cpu()
    if not (torch.isfinite(up32).all() and torch.isfinite(down32).all()):
        raise DataError(f"The update of layer {layer} has NaN or Inf entries: nothing was written. "
                        "Try a larger λ, fewer facts per batch, or check the statistics.")
    add_low_rank(loaded.down_weight(layer), up32, down32)
    return up32, down32


def keys_at(loaded, layer, facts, templates, weights: list[float] | None = None) -> torch.Tensor:
    """Each fact's key at ``layer`` (n, d_ff): its subject's last token averaged over ``templates``."""
    return compute_keys(loaded, [layer], [f.prompt for f in facts], [f.subject for f in facts], templates,
                        weights=weights)[layer]


def residual(loaded: LoadedModel, facts: list, layer: int, top: int, z: torch.Tensor, share: int
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
