"""The zarr v3 store of the statistics stage: cache key, crash-safe shard checkpoints, reduction, reading.

One store holds, per requested layer, ``sum = Σ k kᵀ`` (d×d, float64 unless ``--accumulate float32``) and
``count`` (tokens), for exactly one cache key. Layout of ``<stats_dir>/<model slug>-<key hash>.zarr``::

    zarr.json               root attributes: key, key_hash, schema_version, provenance, layers, d, dtype,
                            plan, complete, tokens, layer_stats {"<L>": {"count", "sha256"}}
    layer_<L>/sum           final d×d sum (written by finalize / write_final_layers)
    layer_<L>/count         int64, shape ()
    shards/<i>_of_<N>/slot_a|slot_b/layer_<L>/sum
                            partial sums of shard i; the slot group's attributes hold the checkpoint
                            record (seq, position, counts, sha256 per layer)
    covedit.lock            lock file while a run builds the store (covedit.shard-<i>.lock: one shard);
                            taken and broken by covedit.stats.locks, only passed over here

Quirks worth knowing:

- Crash safety comes from two alternating slots per shard. A save first marks the older slot invalid, then
  writes its arrays, then writes its record (one atomic zarr.json replace). A SIGKILL at any moment leaves
  the other slot untouched, so the loader always finds the last complete checkpoint. sha256 of every array
  guards against damage from outside (disk, hand edits); SIGKILL needs no fsync, power loss is not covered.
- ``complete`` is written last, in the same attribute write as the per-layer checksums, so a store killed
  while being created or reduced never looks complete.
- Every read of a final ``sum`` is checked against its sha256, so damaged data never reaches the edit stage.
  ``open`` does the cheap checks (groups, shapes, counts, chunk files present); ``verify`` reads everything.
- A deleted chunk file would silently read back as zeros in zarr; the chunk-presence and checksum checks are
  what turn that into a DataError.

Neighbours: the locks that keep two builders apart are :mod:`covedit.stats.locks`, export to and import from
the ROME/MEMIT ``.npz`` layout is :mod:`covedit.stats.interop`; both use this module's small helpers
(``ensure_writable_dir``, ``read_json``, ``utc_now``, ``array_sha256``, ...), which is why those are public.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from covedit.pipeline.errors import CannotWrite, DataError, MissingInput, StoreConflict, UsageError
from covedit.pipeline.tokens import check_bos_policy

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SLOTS = ("a", "b")
SUM_DTYPES = ("float64", "float32")  # what a store's sums are kept in
ACCUMULATE = ("float64", "mixed", "float32")  # how they were accumulated (the key's ``accumulate``)


def sum_dtype(accumulate: str) -> str:
    """The dtype a store keeps its sums in for an accumulation policy: float32 only for ``float32``."""
    return "float32" if accumulate == "float32" else "float64"

WHOLE_CHUNK_MAX = 2048
CHUNK = 1024


# --------------------------------------------------------------------------------------------- cache key


def _jsonable(value: Any) -> Any:
    """Plain JSON types with sorted dict keys; Paths become strings, tuples lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"cache key value {value!r} ({type(value).__name__}) is not JSON-serialisable")


def _dtype_name(dtype: Any) -> str:
    """'float32' from 'float32', np.float32, np.dtype('float32') or torch.float32."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        text = str(dtype).removeprefix("torch.")
    try:
        return np.dtype(text).name
    except TypeError:
        return text


def canonical_key(**fields: Any) -> dict:
    """The cache key in one canonical form: sorted keys, sorted unique layers, normalised dtypes.

    Unknown fields are kept (JSON-normalised), so a caller can add identity it knows about (a revision, a
    weight fingerprint). ``schema_version`` and ``accumulate`` get their defaults when absent.
    """
    key: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "accumulate": "float64"}
    key.update(fields)
    if "layers" in key and key["layers"] is not None:
        key["layers"] = sorted({int(layer) for layer in key["layers"]})
    if key.get("dtype") is not None:
        key["dtype"] = _dtype_name(key["dtype"])
    key["accumulate"] = _dtype_name(key["accumulate"])
    if key["accumulate"] not in ACCUMULATE:
        raise UsageError(f"accumulation must be float64, mixed or float32, not {key['accumulate']!r}.")
    if key.get("bos") is not None:
        check_bos_policy(key["bos"])
    for name in ("tokens", "max_length", "seed", "schema_version"):
        if key.get(name) is not None:
            key[name] = int(key[name])
    return _jsonable(key)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def key_hash(key: dict) -> str:
    """First 16 hex digits of the sha256 of the canonical JSON of the key."""
    return hashlib.sha256(canonical_json(canonical_key(**key)).encode()).hexdigest()[:16]


def _slug(model_id: str) -> str:
    """A readable, filesystem-safe name: 'HuggingFaceTB/SmolLM2' -> 'HuggingFaceTB--SmolLM2'."""
    text = str(model_id).strip().replace("/", "--")
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return text[-64:] or "model"


def store_path(stats_dir: Path, key: dict) -> Path:
    """``<stats_dir>/<slug of model>-<key_hash>.zarr``."""
    return Path(stats_dir) / f"{_slug(key.get('model_id', 'model'))}-{key_hash(key)}.zarr"


def default_stats_dir() -> Path:
    """``COVEDIT_STATS_DIR``, else ``<cache root>/stats``."""
    env = os.environ.get("COVEDIT_STATS_DIR")
    if env:
        return Path(env)
    from covedit.pipeline.models import cache_root

    return cache_root() / "stats"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def default_provenance() -> dict:
    """Host, time and library versions, for the store's ``provenance`` attribute."""
    versions = {"python": platform.python_version()}
    for dist in ("covedit", "numpy", "zarr", "torch", "transformers", "datasets"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": utc_now(), "versions": versions}


def _describe_difference(path: Path, have: dict, want: dict) -> str:
    """'store at X was built with tokens=1, max_length=2; you asked for tokens=3, max_length=4'."""
    names = sorted(n for n in set(have) | set(want) if have.get(n, "<absent>") != want.get(n, "<absent>"))

    def show(d: dict, n: str) -> str:
        return f"{n}={canonical_json(d[n]) if n in d else '<absent>'}"

    built = ", ".join(show(have, n) for n in names)
    asked = ", ".join(show(want, n) for n in names)
    return (f"store at {path} was built with {built}; you asked for {asked} "
            f"(use another --stats-dir, or delete that store to rebuild it).")


# --------------------------------------------------------------------------------------------- file helpers


def ensure_writable_dir(directory: Path) -> None:
    """Create ``directory`` and prove a file can be written in it, or raise CannotWrite."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".covedit-probe-"):
            pass
    except OSError as exc:
        raise CannotWrite(
            f"cannot write statistics under {directory} ({exc.strerror or exc}); "
            f"choose a writable place with --stats-dir or COVEDIT_STATS_DIR."
        ) from exc


def array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def _sum_chunks(d: int) -> tuple[int, int]:
    """Whole matrix for small d, 1024×1024 tiles (8 MiB in float64) otherwise."""
    side = d if d <= WHOLE_CHUNK_MAX else CHUNK
    return (side, side)


def _write_array(group: zarr.Group, name: str, data: np.ndarray, *, compress: bool) -> None:
    """Write ``data`` as array ``name`` under ``group``, reusing an existing array of the same shape.

    Chunks are always written (also all-zero ones), so a missing chunk file means damage.
    """
    existing = None
    try:
        node = group[name]
        if isinstance(node, zarr.Array) and node.shape == data.shape and node.dtype == data.dtype:
            existing = node
    except KeyError:
        pass
    if existing is None:
        existing = group.create_array(
            name, shape=data.shape, dtype=data.dtype, chunks=_sum_chunks(data.shape[0]),
            fill_value=0, compressors="auto" if compress else None,
            config={"write_empty_chunks": True}, overwrite=True,
        )
    existing[...] = data


def brief_error(exc: BaseException) -> str:
    """First line of an exception, short enough for a one-sentence message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:120]}" if text else type(exc).__name__


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


# --------------------------------------------------------------------------------------------- the store


class StatsStore:
    """One statistics store on disk. Construct with ``open_or_create`` or ``open``."""

    def __init__(self, path: Path, attrs: dict) -> None:
        self.path = Path(path)
        self.key: dict = attrs["key"]
        self.layers: list[int] = [int(layer) for layer in attrs["layers"]]
        self.d: int = int(attrs["d"])
        self.dtype: np.dtype = np.dtype(attrs["dtype"])
        self.key_hash: str = attrs.get("key_hash") or key_hash(self.key)
        self._resumed_from: dict[tuple[int, int], str] = {}  # (shard, n_shards) -> slot last loaded/saved

    # -------------------------------------------------------------- opening

    @staticmethod
    def _root_attrs(path: Path) -> dict | None:
        """Root attributes, or None where there is no zarr group; DataError where it is unreadable."""
        meta_file = path / "zarr.json"
        if not meta_file.exists():
            return None
        meta = read_json(meta_file)
        if meta is None or meta.get("node_type") != "group":
            raise DataError(f"statistics store {path} has an unreadable zarr.json; delete it and rebuild.")
        return meta.get("attributes", {})

    @staticmethod
    def _check_schema(path: Path, attrs: dict) -> None:
        needed = ("key", "layers", "d", "dtype", "schema_version")
        if not all(name in attrs for name in needed):
            raise StoreConflict(f"{path} holds a zarr group that is not a covedit statistics store.")
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise DataError(
                f"statistics store {path} uses schema version {attrs['schema_version']}, this covedit reads "
                f"version {SCHEMA_VERSION}; delete it and rebuild."
            )

    @classmethod
    def open_or_create(cls, path: Path | str, key: dict, provenance: dict, layers: list[int], d: int,
                       dtype: Any) -> "StatsStore":
        """The store at ``path`` for ``key``: created if absent, refused (StoreConflict) if built for another.

        ``dtype`` is the accumulation dtype of the sums (float64 or float32), not the model's dtype.
        """
        path = Path(path)
        dtype_name = _dtype_name(dtype)
        if dtype_name not in SUM_DTYPES:
            raise UsageError(f"the sums' dtype must be float64 or float32, not {dtype_name!r}.")
        layers = sorted({int(layer) for layer in layers})
        key = canonical_key(**{"layers": layers, "accumulate": dtype_name, **key})
        if key["layers"] != layers:
            raise ValueError(f"key layers {key['layers']} differ from layers {layers}")
        if sum_dtype(key["accumulate"]) != dtype_name:
            raise ValueError(f"key accumulate={key['accumulate']} does not keep its sums in {dtype_name}")
        attrs = cls._root_attrs(path)
        if attrs is None:
            ensure_writable_dir(path.parent)
            if path.exists() and not path.is_dir():
                raise CannotWrite(f"cannot create statistics store {path}: a file of that name exists.")
            if path.is_dir():
                foreign = [p.name for p in path.iterdir()
                           if not p.name.endswith((".lock", ".partial")) and not p.name.startswith(".covedit-probe-")]
                if foreign:
                    raise StoreConflict(f"{path} exists and is not a covedit statistics store; "
                                        f"choose another --stats-dir or remove it.")
            ensure_writable_dir(path)
            attrs = {
                "key": key, "key_hash": key_hash(key), "schema_version": SCHEMA_VERSION,
                "provenance": _jsonable(provenance), "layers": layers, "d": int(d), "dtype": dtype_name,
                "plan": None, "tokens": None, "layer_stats": {}, "complete": False, "created_at": utc_now(),
            }
            try:
                zarr.create_group(str(path), zarr_format=3, attributes=attrs, overwrite=False)
            except zarr.errors.ContainsGroupError:
                log.info("store %s was created by another process meanwhile", path)
                return cls.open_or_create(path, key, provenance, layers, d, dtype)
            except OSError as exc:
                raise CannotWrite(f"cannot create statistics store {path} ({exc.strerror or exc}).") from exc
            log.info("created statistics store %s", path)
            return cls(path, attrs)
        cls._check_schema(path, attrs)
        if attrs["key"] != key:
            raise StoreConflict(_describe_difference(path, attrs["key"], key))
        if int(attrs["d"]) != int(d) or attrs["dtype"] != dtype_name:
            raise StoreConflict(
                f"store at {path} holds {attrs['d']}×{attrs['d']} {attrs['dtype']} sums; you asked for "
                f"{d}×{d} {dtype_name} (the model changed under the same id? delete that store to rebuild)."
            )
        if not attrs.get("complete"):
            ensure_writable_dir(path)
        return cls(path, attrs)

    @classmethod
    def open(cls, path: Path | str, *, verify: bool = True, full_check: bool = False) -> "StatsStore":
        """An existing store; MissingInput if none.

        A complete store gets the cheap checks (groups, shapes, counts, chunk files present), or with
        ``full_check`` every checksum too; ``verify=False`` skips them (shard workers of an unfinished store).
        """
        path = Path(path)
        attrs = cls._root_attrs(path)
        if attrs is None:
            raise MissingInput(f"no statistics store at {path}; run covedit build-stats first.")
        cls._check_schema(path, attrs)
        store = cls(path, attrs)
        if verify and attrs.get("complete"):
            store.verify(full=full_check)
        return store

    def _attrs(self) -> dict:
        """Fresh root attributes (another process may have changed them)."""
        attrs = self._root_attrs(self.path)
        if attrs is None:
            raise MissingInput(f"statistics store {self.path} has disappeared.")
        return attrs

    def _root(self) -> zarr.Group:
        return zarr.open_group(str(self.path), mode="r+", zarr_format=3)

    def is_complete(self) -> bool:
        return bool(self._attrs().get("complete"))

    def set_plan(self, plan: dict) -> None:
        """Record the coordinator's plan (n_shards, document ranges, ...)."""
        self._root().attrs.update({"plan": _jsonable(plan)})

    def get_plan(self) -> dict | None:
        return self._attrs().get("plan")

    # -------------------------------------------------------------- shard checkpoints

    @staticmethod
    def _shard_node(shard: int, n_shards: int) -> str:
        if not 0 <= shard < n_shards:
            raise ValueError(f"shard {shard} is not in 0..{n_shards - 1}")
        return f"shards/{shard}_of_{n_shards}"

    def _slot_records(self, shard: int, n_shards: int) -> list[tuple[str, dict]]:
        """(slot, record) of the slots whose record is complete, newest first."""
        node = self._shard_node(shard, n_shards)
        found = []
        for slot in SLOTS:
            meta = read_json(self.path / node / f"slot_{slot}" / "zarr.json")
            record = (meta or {}).get("attributes", {})
            if record.get("valid") is True and isinstance(record.get("seq"), int):
                found.append((slot, record))
        return sorted(found, key=lambda item: item[1]["seq"], reverse=True)

    def _read_slot_layer(self, shard: int, n_shards: int, slot: str, record: dict, layer: int) -> np.ndarray:
        """One layer's partial sum from a slot, checked against its sha256; DataError when it is not right."""
        array_path = self.path / self._shard_node(shard, n_shards) / f"slot_{slot}" / f"layer_{layer}" / "sum"
        where = f"shard {shard} of {n_shards}, slot {slot}, layer {layer}"
        try:
            data = zarr.open_array(str(array_path), mode="r", zarr_format=3)[...]
        except Exception as exc:  # any read/decode failure of a damaged chunk
            raise DataError(f"checkpoint of {where} in {self.path} cannot be read ({brief_error(exc)}).") from exc
        if data.shape != (self.d, self.d) or data.dtype != self.dtype:
            raise DataError(f"checkpoint of {where} in {self.path} has shape {data.shape} {data.dtype}.")
        if array_sha256(data) != record.get("sha256", {}).get(str(layer)):
            raise DataError(f"checkpoint of {where} in {self.path} fails its checksum.")
        return data

    def save_checkpoint(self, shard: int, n_shards: int, sums: dict[int, np.ndarray], counts: dict[int, int],
                        position: dict) -> None:
        """Write shard ``shard``'s partial sums and corpus position; a SIGKILL at any point keeps the last one."""
        if sorted(int(layer) for layer in sums) != self.layers or sorted(int(x) for x in counts) != self.layers:
            raise ValueError(f"checkpoint layers {sorted(sums)} / {sorted(counts)} differ from {self.layers}")
        arrays = {}
        for layer, value in sums.items():
            array = np.ascontiguousarray(np.asarray(value))
            if array.shape != (self.d, self.d) or array.dtype != self.dtype:
                raise ValueError(f"layer {layer} sum is {array.shape} {array.dtype}, "
                                 f"expected {(self.d, self.d)} {self.dtype}")
            arrays[int(layer)] = array
        records = self._slot_records(shard, n_shards)
        # Never overwrite the slot this process resumed from (it may be the only intact one).
        keep = self._resumed_from.get((shard, n_shards)) or (records[0][0] if records else "b")
        target = "b" if keep == "a" else "a"
        seq = records[0][1]["seq"] + 1 if records else 1
        node = self._shard_node(shard, n_shards)
        slot_group = self._root().require_group(f"{node}/slot_{target}")
        slot_group.attrs.put({"valid": False})
        checksums = {}
        for layer in self.layers:
            _write_array(slot_group, f"layer_{layer}/sum", arrays[layer], compress=False)
            checksums[str(layer)] = array_sha256(arrays[layer])
        record = {
            "valid": True, "seq": seq, "shard": shard, "n_shards": n_shards,
            "position": _jsonable({"done": False, **position}),
            "counts": {str(layer): int(counts[layer]) for layer in self.layers},
            "sha256": checksums, "dtype": self.dtype.name, "saved_at": utc_now(),
        }
        slot_group.attrs.put(record)
        self._resumed_from[(shard, n_shards)] = target
        log.debug("checkpoint %s slot %s seq %d: %s", node, target, seq, record["position"])

    def load_checkpoint(self, shard: int, n_shards: int) -> tuple[dict[int, np.ndarray], dict[int, int], dict] | None:
        """(sums, counts, position) of the newest intact checkpoint of a shard, or None if it has none."""
        for slot, record in self._slot_records(shard, n_shards):
            try:
                sums = {layer: self._read_slot_layer(shard, n_shards, slot, record, layer) for layer in self.layers}
            except DataError as exc:
                log.warning("skipping damaged checkpoint: %s", exc)
                continue
            counts = {int(layer): int(n) for layer, n in record["counts"].items()}
            self._resumed_from[(shard, n_shards)] = slot
            return sums, counts, dict(record["position"])
        return None

    def checkpoint_position(self, shard: int, n_shards: int) -> dict | None:
        """Position of a shard's newest checkpoint record, without reading (or checking) its arrays."""
        records = self._slot_records(shard, n_shards)
        return dict(records[0][1]["position"]) if records else None

    def finished_shards(self, n_shards: int) -> list[int]:
        """Shards whose newest checkpoint record says ``done``."""
        done = []
        for shard in range(n_shards):
            records = self._slot_records(shard, n_shards)
            if records and records[0][1]["position"].get("done"):
                done.append(shard)
        return done

    # -------------------------------------------------------------- reduction and final layers

    def _write_layer(self, layer: int, total: np.ndarray, count: int) -> str:
        group = self._root().require_group(f"layer_{layer}")
        _write_array(group, "sum", total, compress=True)
        count_array = group.create_array("count", shape=(), dtype="int64", fill_value=0, overwrite=True)
        count_array[...] = np.int64(count)
        return array_sha256(total)

    def _mark_complete(self, layer_stats: dict[str, dict], extra: dict) -> None:
        """One atomic attribute write: checksums, tokens and ``complete`` become visible together."""
        tokens = layer_stats[str(self.layers[0])]["count"]
        if len({s["count"] for s in layer_stats.values()}) > 1:
            log.warning("layers of %s saw different token counts: %s", self.path, layer_stats)
        self._root().attrs.update({"layer_stats": layer_stats, "tokens": tokens, "complete": True,
                                   "completed_at": utc_now(), **extra})

    def write_final_layers(self, layers: dict[int, tuple[np.ndarray, int]], extra: dict) -> None:
        """Write whole final layers, ``{layer: (sum, count)}``, then mark the store complete with ``extra``.

        How a store is filled from sums made elsewhere (``covedit.stats.interop.import_npz``); ``finalize``
        builds its layers from shard checkpoints instead, one layer in memory at a time.
        """
        layer_stats = {}
        for layer, (total, count) in layers.items():
            checksum = self._write_layer(int(layer), total, int(count))
            layer_stats[str(int(layer))] = {"count": int(count), "sha256": checksum}
        self._mark_complete(layer_stats, extra)

    def finalize(self, n_shards: int, *, keep_shards: bool = False) -> None:
        """Add the finished shards' sums (in shard order, float64) into the final layers and mark complete.

        Refuses while a shard is unfinished. Idempotent: a complete store is left as it is. The shard
        checkpoints are deleted afterwards unless ``keep_shards``.
        """
        if self.is_complete():
            return
        finished = set(self.finished_shards(n_shards))
        missing = [shard for shard in range(n_shards) if shard not in finished]
        if missing:
            raise DataError(
                f"cannot finish store {self.path}: shard{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(str, missing))} of {n_shards} not done; rerun build-stats to resume them."
            )
        newest = {shard: self._slot_records(shard, n_shards)[0] for shard in range(n_shards)}
        layer_stats = {}
        for layer in self.layers:
            total = np.zeros((self.d, self.d), dtype=np.float64)
            count = 0
            for shard in range(n_shards):
                slot, record = newest[shard]
                total += self._read_slot_layer(shard, n_shards, slot, record, layer)
                count += int(record["counts"][str(layer)])
            final = total.astype(self.dtype, copy=False)
            layer_stats[str(layer)] = {"count": count, "sha256": self._write_layer(layer, final, count)}
        self._mark_complete(layer_stats, {"n_shards": n_shards})
        log.info("statistics store %s complete (%d shards)", self.path, n_shards)
        if not keep_shards:
            shutil.rmtree(self.path / "shards", ignore_errors=True)

    # -------------------------------------------------------------- reading

    def layer_record(self, layer: int) -> dict:
        """``{"count", "sha256"}`` recorded for one layer of a complete store (MissingInput if not complete)."""
        attrs = self._attrs()
        if not attrs.get("complete"):
            raise MissingInput(f"statistics store {self.path} is not complete; rerun build-stats to finish it.")
        if int(layer) not in self.layers:
            raise MissingInput(f"statistics store {self.path} has layers {self.layers}, not layer {layer}.")
        stats = attrs.get("layer_stats", {}).get(str(int(layer)))
        if stats is None:
            raise DataError(f"statistics store {self.path} records no checksum for layer {layer}; rebuild it.")
        return stats

    def read_layer(self, layer: int) -> tuple[np.ndarray, int]:
        """(sum, count) of one layer of a complete store, checked against the recorded checksum."""
        stats = self.layer_record(layer)
        problems, data = self._check_layer(int(layer), stats, full=True)
        if problems or data is None:
            raise DataError(f"statistics store {self.path} is damaged: {'; '.join(problems)}; "
                            f"delete it and rebuild.")
        return data, int(stats["count"])

    def covariance(self, layer: int) -> np.ndarray:
        """E[k kᵀ] = sum / count, in float64."""
        total, count = self.read_layer(layer)
        if count <= 0:
            raise DataError(f"statistics store {self.path} counted no tokens for layer {layer}.")
        return total.astype(np.float64) / count

    def _check_layer(self, layer: int, stats: dict | None, *, full: bool) -> tuple[list[str], np.ndarray | None]:
        """(problems, data) for one final layer; ``full`` also reads the sum and checks its sha256."""
        group_dir = self.path / f"layer_{layer}"
        if not (group_dir / "zarr.json").exists():
            return [f"layer group layer_{layer} is missing"], None
        if stats is None:
            return [f"no checksum is recorded for layer {layer}"], None
        problems = []
        try:
            array = zarr.open_array(str(group_dir / "sum"), mode="r", zarr_format=3)
        except Exception:
            return [f"layer {layer} has no readable sum array"], None
        if array.shape != (self.d, self.d) or array.dtype != self.dtype:
            problems.append(f"layer {layer} sum is {array.shape} {array.dtype}, "
                            f"expected {(self.d, self.d)} {self.dtype}")
        elif array.nchunks_initialized != array.nchunks:
            problems.append(f"layer {layer} sum is missing {array.nchunks - array.nchunks_initialized} "
                            f"of {array.nchunks} chunk files")
        try:
            count = int(zarr.open_array(str(group_dir / "count"), mode="r", zarr_format=3)[...])
            if count != int(stats["count"]):
                problems.append(f"layer {layer} count is {count} but the store recorded {stats['count']}")
        except Exception:
            problems.append(f"layer {layer} count cannot be read")
        if not full or problems:
            return problems, None
        try:
            data = array[...]
        except Exception as exc:  # truncated or garbled chunk
            return [f"layer {layer} sum cannot be read ({brief_error(exc)})"], None
        if array_sha256(data) != stats.get("sha256"):
            return [f"layer {layer} sum fails its checksum"], None
        return [], data

    def verify(self, *, full: bool = True) -> None:
        """DataError naming every problem: missing groups or chunks, bad shape, count or checksum."""
        attrs = self._attrs()
        self._check_schema(self.path, attrs)
        if not attrs.get("complete"):
            return
        layer_stats = attrs.get("layer_stats", {})
        problems = []
        for layer in self.layers:
            problems += self._check_layer(layer, layer_stats.get(str(layer)), full=full)[0]
        if problems:
            raise DataError(f"statistics store {self.path} is damaged: {'; '.join(problems)}; "
                            f"delete it and rebuild.")

    def summary(self) -> dict:
        attrs = self._attrs()
        return {"path": str(self.path), "key": self.key, "key_hash": attrs.get("key_hash"),
                "complete": bool(attrs.get("complete")), "layers": self.layers, "d": self.d,
                "dtype": self.dtype.name, "tokens": attrs.get("tokens"), "plan": attrs.get("plan"),
                "provenance": attrs.get("provenance"), "size_bytes": _dir_size(self.path)}


# --------------------------------------------------------------------------------------------- finding stores


def _store_dirs(stats_dir: Path) -> list[Path]:
    stats_dir = Path(stats_dir)
    if not stats_dir.is_dir():
        return []
    return sorted(p for p in stats_dir.iterdir() if p.suffix == ".zarr" and p.is_dir())


def find_store(stats_dir: Path, match: dict, layers: list[int]) -> StatsStore | None:
    """The complete store under ``stats_dir`` to read the statistics of ``layers`` from, or None.

    ``match`` names the key fields that must agree (compared in canonical form; a ``layers`` entry is
    ignored): a whole key finds the statistics of that key, ``{"model_id": ..., "module": ...}``
    any statistics of that model's down-projections, which is what the edit stage asks for. A store
    qualifies when it is complete and its layers include ``layers``; of several, the one with the most
    tokens wins, then the one with the fewest other layers. Folders that are not readable covedit stores of
    this schema are passed over; the winner is opened with its checks, so a damaged one is a DataError
    (delete it and rebuild), never a silent fallback to other statistics.
    """
    named = [name for name in match if name != "layers"]
    wanted = {name: value for name, value in canonical_key(**{n: match[n] for n in named}).items() if name in named}
    need = {int(layer) for layer in layers}
    candidates = []
    for path in _store_dirs(stats_dir):
        try:
            attrs = StatsStore._root_attrs(path)
            if attrs is None:
                continue
            StatsStore._check_schema(path, attrs)
        except (DataError, StoreConflict):
            continue
        key = attrs["key"]
        have = set(key.get("layers") or [])
        if attrs.get("complete") and need <= have and all(key.get(n) == v for n, v in wanted.items()):
            candidates.append((-(attrs.get("tokens") or 0), len(have), str(path)))
    return StatsStore.open(min(candidates)[2]) if candidates else None


def list_stores(stats_dir: Path) -> list[dict]:
    """Summaries of every store under ``stats_dir`` (``error`` instead for ones that cannot be read)."""
    out = []
    for path in _store_dirs(stats_dir):
        try:
            attrs = StatsStore._root_attrs(path)
            if attrs is None:
                raise MissingInput(f"{path} has no zarr.json (creation was interrupted).")
            StatsStore._check_schema(path, attrs)
            out.append(StatsStore(path, attrs).summary())
        except (DataError, MissingInput, StoreConflict) as exc:
            out.append({"path": str(path), "error": str(exc)})
    return out
