"""Blocks whose MLP output passes through a norm before it joins the residual stream (Gemma-2/3, OLMo-2).

MEMIT and ROME reason in the residual stream: the block output h at the subject's last token should move
by d. A Llama block adds the down-projection's output m = W k to the stream itself, so m must move by
exactly d. A Gemma-2/3 or OLMo-2 block adds N(m) = g ⊙ m / √(mean(m²) + ε) instead (an RMSNorm, the
registry's ``post_mlp_norm``), and writing d into W k there is wrong twice over: N is not linear, and it
is scale-invariant, so W k ↦ W k + d rescales rather than shifts what the stream receives. (Writing d
anyway is what destroyed Gemma-3-270M.) The value to write is an m' with N(m') = N(m) + d, and:

* Only m's direction reaches the stream: N's outputs lie on the ellipsoid mean((N(m)/g)²) = c² with
  c = rms(m)/√(rms(m)² + ε) ≈ 1, so a d that leaves it is not reachable by any m'.
* m' cannot be found by dividing by g: Gemma-3-270M's gains run from about 0 (even negative) to over
  1,000 within one layer.

So every wanted change is mapped to the closest reachable one, exactly (a trust-region problem)::

    y = N(m) + d,    t = y / c,    û = argmin ‖g ⊙ u − t‖  subject to  mean(u²) = 1
    û_j = g_j t_j / (g_j² + μ),   μ ≥ −min g²  the root of mean(û²) = 1   (bisection, float64, all facts)
    m' = rms(m) · û,    R = m' − m   (what the solve writes into W k)

m' keeps m's scale, so N(m') = c g ⊙ û, which is y itself whenever y is reachable: the targets of
``targets.py`` are (they come from optimising δ at the down-projection's output, through the norm), so a
single-layer edit with λ → 0 puts the block output exactly on its target, up to ε's effect on c (relative
ε/rms(m)², 1e-6 or less on Gemma-3). A lower layer of a MEMIT edit asked for a share of the residual may
get less than it asked (the reachable part); the layers above it see that and make it up.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from covedit.pipeline.models import ModelError


def rms_norm_parts(norm: nn.Module) -> tuple[Tensor, float]:
    """(g, ε) of an RMSNorm module, g float64 (D,), read off the module's own output so that any way of
    storing the gain (Gemma's 1 + w, OLMo's w) is handled; checked on a random vector."""
    eps = next((float(getattr(norm, a)) for a in ("eps", "variance_epsilon") if hasattr(norm, a)), None)
    weight = getattr(norm, "weight", None)
    if eps is None or weight is None or weight.ndim != 1:
        raise ModelError(f"The norm after the MLP ({type(norm).__name__}) is not an RMSNorm with a gain and an ε, "
                         "which is the only post-MLP norm covedit can edit through.")
    D, device = weight.shape[0], weight.device
    with torch.no_grad():
        big = torch.full((1, D), 1e4, dtype=torch.float32, device=device)  # rms 1e4: ε is negligible
        g = norm(big).double()[0] * (1 + eps / 1e8) ** 0.5
        x = torch.randn(1, D, generator=torch.Generator().manual_seed(0)).to(device)
        expected = g * x.double()[0] / (x.double().pow(2).mean() + eps).sqrt()
        if not torch.allclose(norm(x).double()[0], expected, rtol=1e-3, atol=1e-5 * float(g.abs().max())):
            raise ModelError(f"The norm after the MLP ({type(norm).__name__}) does not behave as an RMSNorm "
                             "g ⊙ m / rms(m), which is the only post-MLP norm covedit can edit through.")
    return g, eps


def mlp_residual(norm: nn.Module | None, m: Tensor, d: Tensor) -> Tensor:
    """The change R (n, D) of the down-projection's output m (n, D) that moves the block output by d (n, D).

    No norm: R = d. Behind an RMSNorm: R = m' − m as in the module docstring (float64)."""
    if norm is None:
        return d
    g, eps = rms_norm_parts(norm)
    m64, d64 = m.double(), d.double().to(m.device)
    g = g.to(m64.device)
    rms = m64.pow(2).mean(1, keepdim=True).sqrt()
    c = rms / (rms.pow(2) + eps).sqrt()
    y = g * m64 / (rms.pow(2) + eps).sqrt() + d64
    u = nearest_unit_rms(g, y / c)
    return rms * u - m64


def nearest_unit_rms(g: Tensor, t: Tensor, iterations: int = 200) -> Tensor:
    """Per row of t (n, D): argmin ‖g ⊙ u − t‖ subject to mean(u²) = 1 (float64).

    Stationarity gives u = g t / (g² + μ); on μ > −min g² the mean square of u falls monotonically, so the
    root is bracketed by −min g² and √(mean((g t)²)) − min g², and bisection finds it. Where the bracket's
    lower end is not low enough (t has no component along the smallest gains: the 'hard case') the result
    is rescaled onto the constraint, which is then the nearest point only up to that component."""
    g2 = g * g
    gt = g * t
    lo = torch.full((t.shape[0], 1), float(-g2.min()), dtype=torch.float64, device=t.device)
    hi = gt.pow(2).mean(1, keepdim=True).sqrt() - g2.min() + 1e-12
    for _ in range(iterations):
        mid = (lo + hi) / 2
        too_long = (gt / (g2 + mid)).pow(2).mean(1, keepdim=True) > 1
        lo = torch.where(too_long, mid, lo)
        hi = torch.where(too_long, hi, mid)
    u = gt / (g2 + hi)
    return u / u.pow(2).mean(1, keepdim=True).sqrt()
