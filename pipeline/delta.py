"""Revertible edits: per-layer low-rank deltas ΔW = up @ down, their file format, and writing edited models.

A Delta records, for every edited layer, the factors (float32, (d_model, r) and (r, d_ff) in the
``out = W @ k`` orientation of ``LoadedModel.down_weight``) and the sha256 of that layer's weight before
and after the edit. ``apply_delta`` and ``revert_delta`` refuse to touch a model whose weights do not hash
to what the delta expects, so a delta never lands on the wrong model, twice, or on an unedited one.

Rounding: apply stores W' = round(W + up@down) and revert round(W' − up@down), each sum formed in float64
and rounded once to the weight's dtype. Revert therefore returns W to within one rounding of W' plus one
of the result: elementwise |W_reverted − W| ≤ u·(|W'| + |W|)·(1 + 4u), u the unit roundoff of the dtype
(2⁻²⁴ for float32). Elements where W and W' share sign and exponent come back bit for bit (barring exact
ties), so only the elements the edit moved across a power of two can differ.
Making every element exact would need the dense difference, which is what the factors exist to avoid.
The edited hashes are those of the machine that applied the delta: float64 products on another device
can, rarely, round one element differently, which ``apply_delta`` reports.

File format (safetensors): tensors ``layer.<L>.up`` and ``layer.<L>.down``; the metadata key
``covedit_delta`` holds JSON of everything else. ``write_edited_model`` writes a whole Hugging Face folder
(model, tokenizer, delta.safetensors, manifest.json) into a temporary folder and renames it into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from covedit.pipeline.atomic import replace_folder
from covedit.pipeline.errors import CannotWrite, DataError, MissingInput
from covedit.pipeline.models import LoadedModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = "covedit_delta"
DELTA_FILE = "delta.safetensors"
MANIFEST_FILE = "manifest.json"
_BLOCK_ELEMENTS = 1 << 24  # elements of W updated per step: bounds each float64 temporary to 128 MiB


@dataclass
class LayerDelta:
    """ΔW = up @ down for one layer's down-projection, (d_model, d_ff) orientation, factors float32."""

    layer: int
    module: str
    up: Tensor  # (d_model, r)
    down: Tensor  # (r, d_ff)

    def dense(self) -> Tensor:
        """The full ΔW in float64 (d_model × d_ff: for tests and small models)."""
        return self.up.to(torch.float64) @ self.down.to(torch.float64)

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def norm(self) -> float:
        """‖up @ down‖_F without the dense product: sqrt(Σ (upᵀup) ∘ (down downᵀ)), in float64."""
        a = self.up.double().T @ self.up.double()
        b = self.down.double() @ self.down.double().T
        return float((a * b).sum().clamp_min(0).sqrt())


@dataclass
class Delta:
    """An edit of several layers plus what it must be applied to and what it produces."""

    layers: list[LayerDelta]
    base_model_id: str
    base_hashes: dict[int, str]
    edited_hashes: dict[int, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # method, hyperparameters, facts sha256, ...


def weight_hash(W: Tensor) -> str:
    """sha256 of W's bytes in its stored dtype, laid out row-major in the (d_model, d_ff) orientation.

    Hashing the orientation rather than the storage makes a Conv1D model and its Linear twin agree.
    """
    data = W.detach().cpu().contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def layer_hashes(loaded: LoadedModel, layers: list[int]) -> dict[int, str]:
    return {layer: weight_hash(loaded.down_weight(layer)) for layer in layers}


def check_finite(delta: Delta) -> None:
    """DataError naming the first layer whose factors hold NaN or Inf."""
    for ld in delta.layers:
        if not (torch.isfinite(ld.up).all() and torch.isfinite(ld.down).all()):
            raise DataError(f"The update for layer {ld.layer} contains NaN or Inf values; nothing was changed.")


def _module_name(loaded: LoadedModel, layer: int) -> str:
    return loaded.arch.template().format(layer)


def _check_fits(loaded: LoadedModel, delta: Delta, expected: dict[int, str], state: str,
                check_model_id: bool) -> None:
    """Refuse (DataError) unless the model is the delta's and every layer hashes to ``expected``."""
    if check_model_id and loaded.model_id != delta.base_model_id:
        raise DataError(f"This delta was made for model {delta.base_model_id!r}, not {loaded.model_id!r}.")
    check_finite(delta)
    loaded.check_layers([ld.layer for ld in delta.layers])
    for ld in delta.layers:
        module = _module_name(loaded, ld.layer)
        if ld.module != module:
            raise DataError(f"The delta edits module {ld.module!r} but this model's layer {ld.layer} is {module!r}.")
        W = loaded.down_weight(ld.layer)
        if ld.up.shape != (W.shape[0], ld.rank) or ld.down.shape != (ld.rank, W.shape[1]):
            raise DataError(f"The delta for layer {ld.layer} has factors {tuple(ld.up.shape)} @ "
                            f"{tuple(ld.down.shape)}, which do not fit its {tuple(W.shape)} weight.")
        if ld.layer not in expected:
            raise DataError(f"The delta records no {state} weight hash for layer {ld.layer}.")
        current = weight_hash(W)
        if current != expected[ld.layer]:
            raise DataError(f"Layer {ld.layer}'s weight ({module}) hashes to {current[:12]}, not to the {state} hash "
                            f"{expected[ld.layer][:12]} this delta expects (same model and dtype needed).")


def add_low_rank(W: Tensor, up: Tensor, down: Tensor, sign: float = 1.0) -> None:
    """W ← round(W + sign · up @ down), the sum in float64, a block of rows at a time, in place."""
    up64 = up.to(W.device, torch.float64)
    down64 = down.to(W.device, torch.float64)
    rows = max(1, _BLOCK_ELEMENTS // W.shape[1])
    with torch.no_grad():
        for start in range(0, W.shape[0], rows):
            block = W[start:start + rows]
            block.copy_((block.to(torch.float64) + sign * (up64[start:start + rows] @ down64)).to(W.dtype))


def apply_delta(loaded: LoadedModel, delta: Delta, check_model_id: bool = True) -> dict[int, str]:
    """W += up @ down for every layer, after checking the model id (skippable) and every base hash.

    All checks run before any weight changes. Returns the edited weight hashes; a mismatch with hashes the
    delta already records is logged (rounding on another device), since revert needs the exact ones.
    """
    _check_fits(loaded, delta, delta.base_hashes, "base", check_model_id)
    for ld in delta.layers:
        add_low_rank(loaded.down_weight(ld.layer), ld.up, ld.down, 1.0)
    edited = layer_hashes(loaded, [ld.layer for ld in delta.layers])
    differ = [layer for layer, h in edited.items() if delta.edited_hashes and delta.edited_hashes.get(layer) != h]
    if differ:
        log.warning("applying the delta gave layers %s weights that differ in rounding from the edited hashes it "
                    "records (another device?): reverting needs the hashes apply_delta returned", differ)
    return edited


def revert_delta(loaded: LoadedModel, delta: Delta, check_model_id: bool = True) -> None:
    """W -= up @ down for every layer, after checking that the weights are exactly the edited ones."""
    if not delta.edited_hashes:
        raise DataError("This delta records no edited weight hashes, so it cannot be verified before reverting.")
    _check_fits(loaded, delta, delta.edited_hashes, "edited", check_model_id)
    for ld in delta.layers:
        add_low_rank(loaded.down_weight(ld.layer), ld.up, ld.down, -1.0)
    exact = layer_hashes(loaded, [ld.layer for ld in delta.layers]) == {
        layer: delta.base_hashes.get(layer) for layer in (ld.layer for ld in delta.layers)}
    log.info("reverted the delta on layers %s (%s)", [ld.layer for ld in delta.layers],
             "bit for bit" if exact else "to within float rounding")


def make_delta(loaded: LoadedModel, factors: dict[int, tuple[Tensor, Tensor]], meta: dict) -> Delta:
    """A Delta of float32 CPU factors with the current (base) weight hashes; applies nothing."""
    layers = []
    for layer in sorted(factors):
        up, down = factors[layer]
        W = loaded.down_weight(layer)
        if up.ndim != 2 or down.ndim != 2 or up.shape[0] != W.shape[0] or down.shape != (up.shape[1], W.shape[1]):
            raise ValueError(f"factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit "
                             f"layer {layer}'s {tuple(W.shape)} weight")
        layers.append(LayerDelta(layer, _module_name(loaded, layer),
                                 up.detach().to("cpu", torch.float32).contiguous(),
                                 down.detach().to("cpu", torch.float32).contiguous()))
    delta = Delta(layers, loaded.model_id, layer_hashes(loaded, sorted(factors)), {}, dict(meta))
    check_finite(delta)  # after the float32 cast, which can overflow
    return delta


def make_and_apply_delta(loaded: LoadedModel, factors: dict[int, tuple[Tensor, Tensor]], meta: dict) -> Delta:
    """make_delta, apply it, and record the edited hashes: what the edit driver calls."""
    delta = make_delta(loaded, factors, meta)
    delta.edited_hashes = apply_delta(loaded, delta)
    return delta


# ------------------------------------------------------------------------------------------- file format

def _header(delta: Delta) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "base_model_id": delta.base_model_id,
        "layers": [{"layer": ld.layer, "module": ld.module} for ld in delta.layers],
        "base_hashes": {str(k): v for k, v in delta.base_hashes.items()},
        "edited_hashes": {str(k): v for k, v in delta.edited_hashes.items()},
        "meta": delta.meta,
    }


def save_delta(delta: Delta, path: Path | str) -> None:
    """Write the delta as safetensors, atomically (temporary file in the same folder, then os.replace)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    layers = [ld.layer for ld in delta.layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"a delta edits each layer once, got layers {layers}")
    tensors = {}
    for ld in delta.layers:
        tensors[f"layer.{ld.layer}.up"] = ld.up.detach().cpu().contiguous()
        tensors[f"layer.{ld.layer}.down"] = ld.down.detach().cpu().contiguous()
    header = json.dumps(_header(delta))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise CannotWrite(f"Cannot write the delta to {path}: {e.strerror or e}.") from e
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: header})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CannotWrite(f"Cannot write the delta to {path}: {e.strerror or e}.") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_delta(path: Path | str) -> Delta:
    """Read a delta written by save_delta; MissingInput if absent, DataError if it is not one."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"Delta file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if METADATA_KEY not in metadata:
                raise DataError(f"{path} is a safetensors file but not a covedit delta (no {METADATA_KEY!r} metadata).")
            header = json.loads(metadata[METADATA_KEY])
            if header.get("format_version") != FORMAT_VERSION:
                raise DataError(f"{path} has delta format version {header.get('format_version')!r}; "
                                f"this covedit reads version {FORMAT_VERSION}.")
            layers = [LayerDelta(int(e["layer"]), str(e["module"]),
                                 f.get_tensor(f"layer.{e['layer']}.up"), f.get_tensor(f"layer.{e['layer']}.down"))
                      for e in header["layers"]]
            if len({ld.layer for ld in layers}) != len(layers):
                raise DataError(f"{path} lists the same layer twice.")
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is not a readable covedit delta ({type(e).__name__}: {e}).") from e
    return Delta(layers, str(header["base_model_id"]),
                 {int(k): v for k, v in header["base_hashes"].items()},
                 {int(k): v for k, v in header["edited_hashes"].items()},
                 header.get("meta", {}))


# ------------------------------------------------------------------------------------- the edited model

def _input_folders(loaded: LoadedModel) -> list[Path]:
    """Folders the model was read from: writing over (or around) them would destroy the input."""
    places = [loaded.source, getattr(getattr(loaded.model, "config", None), "_name_or_path", None)]
    return [Path(p).expanduser().resolve() for p in places if p and Path(p).expanduser().is_dir()]


def write_edited_model(loaded: LoadedModel, out_dir: Path | str, delta: Delta, manifest: dict,
                       overwrite: bool = False, extra_files: dict | None = None) -> None:
    """Write the edited model, its tokenizer, the delta and the manifest as one Hugging Face folder.

    The model must hold exactly the delta's edited weights. Everything is written to a temporary folder next
    to ``out_dir`` and renamed into place, so a crash leaves either the old ``out_dir`` or the new one, and
    no temporary folder. With ``overwrite`` the old folder is moved aside and deleted after the rename.
    ``extra_files`` maps a file name to a function that writes that file at the path it is given.
    """
    out_dir = Path(out_dir).expanduser()
    check_finite(delta)
    if not delta.edited_hashes:
        raise DataError("The delta records no edited weight hashes: apply it before writing the edited model.")
    current = layer_hashes(loaded, [ld.layer for ld in delta.layers])
    stale = [layer for layer, h in current.items() if delta.edited_hashes.get(layer) != h]
    if stale:
        raise DataError(f"The model does not hold this delta's edited weights (layer {stale[0]} differs).")
    if out_dir.exists() and not out_dir.is_dir():
        raise CannotWrite(f"Output {out_dir} exists and is not a folder.")
    resolved = out_dir.resolve()
    for source in _input_folders(loaded):
        if source == resolved or resolved in source.parents:
            raise CannotWrite(f"Output {out_dir} would overwrite the input model at {source}; choose another folder.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CannotWrite(f"Output folder {out_dir} exists and is not empty; pass --overwrite to replace it.")

    def fill(tmp: Path) -> None:
        loaded.model.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        save_delta(delta, tmp / DELTA_FILE)
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    replace_folder(out_dir, fill, "the edited model")
    log.info("wrote the edited model, delta and manifest to %s", out_dir)
