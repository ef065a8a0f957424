"""Statistics in the ``.npz`` files of ROME, MEMIT, EasyEdit and AlphaEdit: export a store's layer, import one.

The layout is runningstats' ``CombinedStat(mom2=SecondMoment())`` state dict plus the ``sample_size`` entry
their ``tally`` insists on: ``mom2.mom2`` is the raw sum Σ k kᵀ, not the mean, and ``mom2.count`` the token
count, the same two numbers a covedit store keeps per layer, so nothing is rescaled either way. This lives
apart from :mod:`covedit.stats.store` because it is a translation at the edge (the command line's
``stats export`` / ``stats import``): the store itself never reads or writes another tool's format. An import
checks what the file claims (square, symmetric, non-negative diagonal, finite, positive count and, when
given, the model's key width) before anything is written, since a wrong file would otherwise only show as
bad edits.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import numpy as np

from covedit.pipeline.errors import CannotWrite, DataError, MissingInput, StoreConflict
from covedit.pipeline.fileio import file_sha256
from covedit.stats.store import (ACCUMULATE, StatsStore, array_sha256, brief_error, canonical_json, canonical_key,
                                 default_provenance, ensure_writable_dir, store_path, sum_dtype)

log = logging.getLogger(__name__)

ROME_CONSTRUCTOR = "util.runningstats.SecondMoment()"
# runningstats stores None as this NaN bit pattern so that npz files need no pickle.
ROME_NULL = np.array(struct.unpack(">d", struct.pack(">Q", 0xFFF8000000000002))[0], dtype=np.float64)


def export_npz(store: StatsStore, layer: int, out_path: Path | str, *, sample_size: int | None = 100000) -> Path:
    """Write one layer in the ROME/MEMIT ``runningstats`` layout (``mom2.mom2`` = raw sum).

    Their ``tally`` refuses a cache file whose ``sample_size`` differs from the one it is asked for
    (``mom2_n_samples``, 100000 in every published config), so pass the value their run will use.
    """
    total, count = store.read_layer(layer)
    out_path = Path(out_path)
    ensure_writable_dir(out_path.parent)
    entries = {
        "mom2.constructor": np.array(ROME_CONSTRUCTOR),
        "mom2.count": np.array(count, dtype=np.int64),
        "mom2.mom2": total,
        "sample_size": ROME_NULL if sample_size is None else np.array(int(sample_size), dtype=np.int64),
        "covedit.key": np.array(canonical_json({**store.key, "layers": [int(layer)]})),
    }
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **entries)
        os.replace(tmp, out_path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CannotWrite(f"cannot write {out_path} ({exc.strerror or exc}).") from exc
    return out_path


def _accumulate_of(exported_key: str | None, dtype_name: str) -> str:
    """How the sums were accumulated: the policy covedit's own export recorded (``mixed`` sums are float64),
    if it agrees with the file's dtype; otherwise the dtype itself (another tool's file)."""
    try:
        policy = json.loads(exported_key).get("accumulate") if exported_key else None
    except (ValueError, AttributeError):
        policy = None
    return policy if policy in ACCUMULATE and sum_dtype(policy) == dtype_name else dtype_name


def import_npz(npz_path: Path | str, stats_dir: Path | str, key: dict, layer: int,
               expected_dim: int | None = None) -> StatsStore:
    """A complete one-layer store from a ROME/MEMIT/EasyEdit ``.npz`` (raw sum + count).

    The key's ``accumulate`` is the one covedit's export recorded, else the file's dtype (float16 files are
    widened to float32).
    ``expected_dim`` (the model's key width) refuses a file made for another model before anything is written.
    """
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise MissingInput(f"no statistics file at {npz_path}.")
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            names = list(npz.keys())
            if "mom2.mom2" not in names or "mom2.count" not in names:
                raise DataError(f"{npz_path} has no mom2.mom2 / mom2.count (it holds {', '.join(names)}).")
            total = np.asarray(npz["mom2.mom2"])
            count_value = npz["mom2.count"]
            sample_size = npz["sample_size"].item() if "sample_size" in names else None
            exported_key = str(npz["covedit.key"]) if "covedit.key" in names else None
    except (ValueError, OSError) as exc:
        raise DataError(f"{npz_path} cannot be read as an npz file ({brief_error(exc)}).") from exc
    if total.ndim != 2 or total.shape[0] != total.shape[1]:
        raise DataError(f"mom2.mom2 in {npz_path} has shape {total.shape}, not a square matrix.")
    if expected_dim is not None and total.shape[0] != expected_dim:
        raise DataError(f"mom2.mom2 in {npz_path} is {total.shape[0]}×{total.shape[0]}, but this model's keys have "
                        f"{expected_dim} dimensions: the file was made for another model.")
    if total.dtype == np.float16:
        total = total.astype(np.float32)
    if total.dtype not in (np.float32, np.float64):
        raise DataError(f"mom2.mom2 in {npz_path} has dtype {total.dtype}, not a float.")
    count = int(count_value)
    if count <= 0 or count != count_value:
        raise DataError(f"mom2.count in {npz_path} is {count_value}, not a positive token count.")
    if not np.isfinite(total).all():
        raise DataError(f"mom2.mom2 in {npz_path} holds NaN or infinite values.")
    scale = float(np.abs(total).max()) or 1.0
    if float(np.abs(total - total.T).max()) > 1e-4 * scale or (np.diagonal(total) < 0).any():
        raise DataError(f"mom2.mom2 in {npz_path} is not a raw second moment Σ k kᵀ (not symmetric PSD-like).")
    if isinstance(sample_size, float) and np.isnan(sample_size):
        sample_size = None
    dtype_name = total.dtype.name
    key = canonical_key(**{**key, "layers": [int(layer)], "accumulate": _accumulate_of(exported_key, dtype_name)})
    provenance = {**default_provenance(), "imported_from": str(npz_path.resolve()),
                  "npz_sha256": file_sha256(npz_path), "npz_sample_size": sample_size}
    store = StatsStore.open_or_create(store_path(Path(stats_dir), key), key, provenance, [int(layer)],
                                      total.shape[0], dtype_name)
    checksum = array_sha256(np.ascontiguousarray(total))
    if store.is_complete():
        recorded = store.layer_record(int(layer))
        if recorded["sha256"] == checksum and recorded["count"] == count:
            return store
        raise StoreConflict(f"store at {store.path} already holds other statistics for this key; "
                            f"delete it to import {npz_path}.")
    store.write_final_layers({int(layer): (np.ascontiguousarray(total), count)}, {"n_shards": 0})
    log.info("imported %s into %s", npz_path, store.path)
    return store
