"""One-pass, multi-layer accumulation of Σ k kᵀ: the inner loop of the statistics stage.

One forward pass per batch serves every requested layer: a pre-hook on each layer's MLP down-projection
reads its input (the keys k), and the forward stops as soon as the deepest of them has been read, so the
blocks above it, the final norm and the unembedding never run.

Precision (``accumulate``):

* ``mixed`` (the default of ``build-stats``): each batch's product in float32 (the keys' own precision on a
  float32 model), the running sum in float64, so rounding does not grow with the corpus. 1.09× faster than
  float64 on a 2-core CPU and within 3.5e-8 (largest relative difference) of its sums at 1M tokens
  (docs/statistics.md).
* ``float64``: keys widened to float64, products and running sums in float64.
* ``float32``: products and sums in float32, as the reference code does.

Only the upper block triangle of Σ k kᵀ is computed (it is symmetric), one row panel at a time;
``state()`` mirrors it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from covedit.pipeline.hooks import capture_inputs, run_until
from covedit.pipeline.models import LoadedModel
from covedit.stats.store import ACCUMULATE, sum_dtype

# Each policy's product dtype; its sums' dtype is the store's rule (stats.store.sum_dtype).
PRODUCT_DTYPE = {"float64": torch.float64, "mixed": torch.float32, "float32": torch.float32}


def _panel_edges(d: int, n_panels: int) -> list[tuple[int, int]]:
    size = -(-d // n_panels)
    return [(i, min(i + size, d)) for i in range(0, d, size)]


class SecondMoment:
    """Running uncentred second moment of one layer's keys: ``sum`` = Σ k kᵀ and ``count`` = tokens.

    C = sum / count is E[k kᵀ], the convention the published λ values and AlphaEdit's threshold assume.
    """

    def __init__(self, d: int, accumulate: str = "float64", device: torch.device | str = "cpu", panels: int = 8):
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {', '.join(ACCUMULATE)}")
        self.product_dtype, self.sum_dtype = PRODUCT_DTYPE[accumulate], getattr(torch, sum_dtype(accumulate))
        self.sum = torch.zeros(d, d, dtype=self.sum_dtype, device=device)
        self.count = 0
        # Row panel i covers columns from its own diagonal block on: (n+1)/2n of a full product's work,
        # 9/16 with 8 panels, in one large matrix product per panel (benchmarks/bench_panels.py, d 1536, 2-core
        # CPU: 7 % faster than 4 × 4 blocks taken pairwise; 4-8 panels within 2 % of each other).
        self._panels = _panel_edges(d, panels if d >= 256 else 1)

    def add(self, keys: torch.Tensor) -> None:
        """Add the keys of a batch, shape (tokens, d)."""
        k = keys.to(self.product_dtype)
        same = self.product_dtype == self.sum_dtype
        for r0, r1 in self._panels:
            left, right = k[:, r0:r1].T, k[:, r0:]
            if same:
                self.sum[r0:r1, r0:].addmm_(left, right)
            else:
                self.sum[r0:r1, r0:] += (left @ right).to(self.sum_dtype)
        self.count += int(keys.shape[0])

    def state(self) -> tuple[np.ndarray, int]:
        """(symmetric sum as a numpy array, count)."""
        upper = torch.triu(self.sum)
        return (upper + torch.triu(self.sum, 1).T).cpu().numpy(), self.count

    def load(self, total: np.ndarray, count: int) -> None:
        """Restore from ``state()``; continuing from here gives bitwise the sums of an unbroken run."""
        self.sum.copy_(torch.from_numpy(np.asarray(total)).to(self.sum_dtype))
        self.count = int(count)


@dataclass
class BatchKeys:
    """The counted keys of one batch, per layer."""

    keys: dict[int, torch.Tensor]
    n_tokens: int


def batch_keys(loaded: LoadedModel, layers: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor,
               count_mask: torch.Tensor) -> BatchKeys:
    """Run one truncated forward and return the keys at the counted positions of every layer."""
    modules = [loaded.down_proj(layer) for layer in layers]
    deepest = modules[int(np.argmax(layers))]
    device = loaded.device
    with torch.inference_mode(), capture_inputs(modules, stop_after=deepest) as seen:
        run_until(loaded.model, input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                  use_cache=False)
    mask = count_mask.to(device)
    return BatchKeys({layer: seen[i][mask] for i, layer in enumerate(layers)}, int(mask.sum()))


def accumulate_batches(loaded: LoadedModel, layers: list[int], batches: Iterable, moments: dict[int, SecondMoment]
                       ) -> Iterator:
    """Add each batch's keys to ``moments``; yield each batch after it has been counted.

    The caller decides when to checkpoint (only after batches with a ``resume_doc``) and when to stop.
    """
    for batch in batches:
        got = batch_keys(loaded, layers, batch.input_ids, batch.attention_mask, batch.count_mask)
        with torch.inference_mode():
            for layer, keys in got.keys.items():
                moments[layer].add(keys)
        yield batch
