"""The statistics store: cache key, crash-safe checkpoints, exact reduction, damage detection, interop, lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from covedit.pipeline.errors import CannotWrite, DataError, MissingInput, StoreConflict
from covedit.stats import store as store_mod
from covedit.stats.interop import export_npz, import_npz
from covedit.stats.locks import LOCK_NAME, StoreLock
from covedit.stats.store import (
    SCHEMA_VERSION,
    StatsStore,
    canonical_key,
    default_stats_dir,
    find_store,
    key_hash,
    list_stores,
    store_path,
    sum_dtype,
)

D = 8
LAYERS = [3, 5]


def make_key(**over) -> dict:
    fields = dict(model_id="HuggingFaceTB/SmolLM2-135M-Instruct", dtype="float32", module="model.layers.{}.mlp.down_proj",
                  layers=LAYERS, corpus={"name": "wiki-vital", "revision": "0.0.7"}, tokens=100000,
                  max_length=512, bos="skip", accumulate="float64", seed=0)
    fields.update(over)
    return canonical_key(**fields)


def make_store(stats_dir: Path, **over) -> StatsStore:
    key = make_key(**over)
    return StatsStore.open_or_create(store_path(stats_dir, key), key, {"host": "test"}, key["layers"], D,
                                     sum_dtype(key["accumulate"]))


def moments(seed: int, layers=LAYERS, n: int = 20) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in layers:
        k = rng.standard_normal((n, D))
        out[layer] = k.T @ k
    return out


def finish_shards(store: StatsStore, n_shards: int, shards=None) -> dict[int, dict[int, np.ndarray]]:
    data = {}
    for shard in shards if shards is not None else range(n_shards):
        data[shard] = moments(100 + shard)
        store.save_checkpoint(shard, n_shards, data[shard], {layer: 20 for layer in LAYERS},
                              {"next_doc": 10 * (shard + 1), "tokens": 20, "done": True})
    return data


def complete_store(stats_dir: Path, **over) -> tuple[StatsStore, dict]:
    store = make_store(stats_dir, **over)
    data = finish_shards(store, 2)
    store.finalize(2)
    return store, data


# ------------------------------------------------------------------------------------------- key and paths


def test_canonical_key_normalises_and_hash_is_stable():
    a = canonical_key(model_id="m", layers=[5, 3, 3], corpus={"b": 1, "a": (1, 2)}, tokens="100", dtype="float32")
    b = canonical_key(tokens=100, corpus={"a": [1, 2], "b": 1}, dtype=np.float32, layers=(3, 5), model_id="m")
    assert a == b
    assert a["layers"] == [3, 5]
    assert a["schema_version"] == SCHEMA_VERSION and a["accumulate"] == "float64"
    assert key_hash(a) == key_hash(b) and len(key_hash(a)) == 16
    assert key_hash(a) != key_hash({**a, "tokens": 101})
    path = store_path(Path("/x"), a)
    assert path == Path("/x") / f"m-{key_hash(a)}.zarr"
    assert store_path(Path("/x"), make_key()).name.startswith("HuggingFaceTB--SmolLM2-135M-Instruct-")


def test_mixed_accumulation_keeps_float64_sums_and_its_own_key(tmp_path):
    """``mixed`` (the build default) is a key of its own, kept in float64; a store of one policy is not
    read as another's, and no policy may claim sums of another dtype."""
    mixed = make_key(accumulate="mixed")
    assert canonical_key(**mixed)["accumulate"] == "mixed"
    assert key_hash(canonical_key(**mixed)) != key_hash(canonical_key(**make_key(accumulate="float64")))
    store = StatsStore.open_or_create(store_path(tmp_path, mixed), mixed, {}, LAYERS, D, "float64")
    assert store.key["accumulate"] == "mixed" and store.dtype == np.float64
    with pytest.raises(ValueError, match="does not keep its sums in float32"):
        StatsStore.open_or_create(store_path(tmp_path / "b", mixed), mixed, {}, LAYERS, D, "float32")
    with pytest.raises(store_mod.UsageError, match="accumulation must be float64, mixed or float32"):
        canonical_key(**make_key(accumulate="bfloat16"))


def test_default_stats_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("COVEDIT_STATS_DIR", str(tmp_path / "s"))
    assert default_stats_dir() == tmp_path / "s"
    monkeypatch.delenv("COVEDIT_STATS_DIR")
    monkeypatch.setenv("COVEDIT_CACHE", str(tmp_path / "c"))
    assert default_stats_dir() == tmp_path / "c" / "stats"


# ------------------------------------------------------------------------------------------- create / reopen


def test_create_and_reopen_same_key(tmp_path):
    store = make_store(tmp_path)
    assert store.layers == LAYERS and store.d == D and store.dtype == np.float64
    assert not store.is_complete()
    store.set_plan({"n_shards": 2, "ranges": [[0, 5], [5, 10]]})
    again = make_store(tmp_path)
    assert again.path == store.path and again.key == store.key
    assert again.get_plan() == {"n_shards": 2, "ranges": [[0, 5], [5, 10]]}
    opened = StatsStore.open(store.path)
    assert opened.key == store.key and opened.summary()["complete"] is False


def test_different_key_is_refused_naming_the_fields(tmp_path):
    store = make_store(tmp_path)
    other = make_key(tokens=200000, max_length=1024)
    with pytest.raises(StoreConflict) as err:
        StatsStore.open_or_create(store.path, other, {}, LAYERS, D, "float64")
    message = str(err.value)
    assert "built with max_length=512, tokens=100000" in message
    assert "you asked for max_length=1024, tokens=200000" in message
    assert "seed" not in message


def test_open_missing_store(tmp_path):
    with pytest.raises(MissingInput):
        StatsStore.open(tmp_path / "nothing.zarr")


def test_unwritable_stats_dir(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    key = make_key()
    with pytest.raises(CannotWrite, match="cannot write statistics under"):
        StatsStore.open_or_create(store_path(tmp_path / "afile" / "stats", key), key, {}, LAYERS, D, "float64")


def test_foreign_directory_is_not_taken_over(tmp_path):
    key = make_key()
    path = store_path(tmp_path, key)
    path.mkdir()
    (path / "precious.txt").write_text("x")
    with pytest.raises(StoreConflict, match="not a covedit statistics store"):
        StatsStore.open_or_create(path, key, {}, LAYERS, D, "float64")


# ------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_is_bitwise(tmp_path):
    store = make_store(tmp_path)
    assert store.load_checkpoint(0, 1) is None
    sums = moments(1)
    store.save_checkpoint(0, 1, sums, {3: 20, 5: 20}, {"next_doc": 7, "tokens": 20})
    loaded, counts, position = store.load_checkpoint(0, 1)
    for layer in LAYERS:
        assert loaded[layer].dtype == np.float64
        assert loaded[layer].tobytes() == sums[layer].tobytes()
    assert counts == {3: 20, 5: 20}
    assert position == {"next_doc": 7, "tokens": 20, "done": False}
    # a later checkpoint wins, and alternates slots
    sums2 = moments(2)
    store.save_checkpoint(0, 1, sums2, {3: 40, 5: 40}, {"next_doc": 9, "tokens": 40})
    loaded, counts, position = store.load_checkpoint(0, 1)
    assert np.array_equal(loaded[3], sums2[3]) and counts[3] == 40 and position["next_doc"] == 9
    assert (store.path / "shards/0_of_1/slot_a").is_dir() and (store.path / "shards/0_of_1/slot_b").is_dir()


def test_float32_accumulation_round_trip(tmp_path):
    store = make_store(tmp_path, accumulate="float32")
    assert store.dtype == np.float32
    sums = {layer: m.astype(np.float32) for layer, m in moments(3).items()}
    store.save_checkpoint(0, 1, sums, {3: 20, 5: 20}, {"next_doc": 1, "tokens": 20, "done": True})
    loaded = store.load_checkpoint(0, 1)[0]
    assert loaded[5].dtype == np.float32 and np.array_equal(loaded[5], sums[5])
    with pytest.raises(ValueError):
        store.save_checkpoint(0, 1, moments(3), {3: 20, 5: 20}, {"next_doc": 1})
    store.finalize(1)
    total, count = store.read_layer(5)
    assert total.dtype == np.float32 and np.array_equal(total, sums[5]) and count == 20


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    good = moments(1)
    store.save_checkpoint(0, 1, good, {3: 20, 5: 20}, {"next_doc": 5, "tokens": 20})
    store.save_checkpoint(0, 1, moments(2), {3: 40, 5: 40}, {"next_doc": 9, "tokens": 40})
    newest = moments(3)

    real_write = store_mod._write_array
    calls = []

    def dies_after_first(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise KeyboardInterrupt("killed mid-checkpoint")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(store_mod, "_write_array", dies_after_first)
    with pytest.raises(KeyboardInterrupt):
        store.save_checkpoint(0, 1, newest, {3: 60, 5: 60}, {"next_doc": 12, "tokens": 60})
    monkeypatch.setattr(store_mod, "_write_array", real_write)
    loaded, counts, position = store.load_checkpoint(0, 1)
    assert position["next_doc"] == 9 and counts == {3: 40, 5: 40}
    assert np.array_equal(loaded[3], moments(2)[3]) and np.array_equal(loaded[5], moments(2)[5])
    # the next save goes to the slot that was being written, and everything is consistent again
    store.save_checkpoint(0, 1, newest, {3: 60, 5: 60}, {"next_doc": 12, "tokens": 60})
    loaded, counts, position = store.load_checkpoint(0, 1)
    assert position["next_doc"] == 12 and np.array_equal(loaded[5], newest[5])


def test_corrupt_newest_slot_falls_back(tmp_path, caplog):
    store = make_store(tmp_path)
    store.save_checkpoint(0, 1, moments(1), {3: 20, 5: 20}, {"next_doc": 5, "tokens": 20})
    store.save_checkpoint(0, 1, moments(2), {3: 40, 5: 40}, {"next_doc": 9, "tokens": 40})
    chunk = store.path / "shards/0_of_1/slot_b/layer_5/sum/c/0/0"
    raw = bytearray(chunk.read_bytes())
    raw[17] ^= 0x40  # one flipped bit in the newest checkpoint's data
    chunk.write_bytes(bytes(raw))
    loaded, counts, position = store.load_checkpoint(0, 1)
    assert position["next_doc"] == 5 and np.array_equal(loaded[5], moments(1)[5])
    assert "fails its checksum" in caplog.text
    # the next save replaces the damaged slot, not the only intact one
    store.save_checkpoint(0, 1, moments(3), {3: 60, 5: 60}, {"next_doc": 12, "tokens": 60})
    records = {s: json.loads((store.path / f"shards/0_of_1/slot_{s}/zarr.json").read_text())["attributes"]
               for s in "ab"}
    assert records["a"]["position"]["next_doc"] == 5 and records["b"]["position"]["next_doc"] == 12
    assert store.load_checkpoint(0, 1)[2]["next_doc"] == 12


SIGKILL_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from covedit.stats.store import StatsStore
    store = StatsStore.open(sys.argv[1])
    d = store.d
    seq = 0
    loaded = store.load_checkpoint(0, 1)
    if loaded is not None:
        seq = loaded[2]["next_doc"]
    print("ready", flush=True)
    while True:
        seq += 1
        sums = {L: np.full((d, d), float(seq * 1000 + L)) for L in store.layers}
        store.save_checkpoint(0, 1, sums, {L: seq for L in store.layers}, {"next_doc": seq, "tokens": seq})
""")


@pytest.mark.slow
def test_sigkill_during_checkpoints_always_leaves_a_loadable_one(tmp_path):
    """Real kill -9 at arbitrary moments of a loop of saves (big enough d that writes take a while). At least
    four kills, and more (up to 16) until one has landed inside a save: whether a given kill does depends on
    the machine's timing, and four alone missed every save once on a loaded 2-core machine."""
    key = make_key(model_id="sigkill")
    big_d = 300
    store = StatsStore.open_or_create(store_path(tmp_path, key), key, {}, LAYERS, big_d, "float64")
    script = tmp_path / "writer.py"
    script.write_text(SIGKILL_WRITER)
    last = 0
    caught_mid_write = False
    for kill, delay in enumerate([0.3, 0.4, 0.5, 0.6] + [0.25 + 0.07 * i for i in range(12)]):
        if kill >= 4 and caught_mid_write:
            break
        proc = subprocess.Popen([sys.executable, str(script), str(store.path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        records = [json.loads((store.path / f"shards/0_of_1/slot_{s}/zarr.json").read_text())["attributes"]
                   for s in "ab"]
        caught_mid_write |= any(r.get("valid") is False for r in records)
        sums, counts, position = store.load_checkpoint(0, 1)
        seq = position["next_doc"]
        assert seq > last  # progress was made and kept across kills
        for layer in LAYERS:
            assert counts[layer] == seq
            assert np.array_equal(sums[layer], np.full((big_d, big_d), float(seq * 1000 + layer)))
        last = seq
    assert caught_mid_write  # at least one kill landed inside a save (writing takes most of the loop)


# ------------------------------------------------------------------------------------------- finalize


def test_finalize_sums_shards_exactly(tmp_path):
    store = make_store(tmp_path)
    data = finish_shards(store, 3)
    assert store.finished_shards(3) == [0, 1, 2]
    store.finalize(3)
    assert store.is_complete()
    for layer in LAYERS:
        expected = np.zeros((D, D))
        for shard in range(3):
            expected += data[shard][layer]
        total, count = store.read_layer(layer)
        assert np.array_equal(total, expected) and count == 60
        assert np.array_equal(store.covariance(layer), expected / 60)
    summary = store.summary()
    assert summary["tokens"] == 60 and summary["complete"] and summary["size_bytes"] > 0
    assert not (store.path / "shards").exists()
    store.finalize(3)  # idempotent
    assert np.array_equal(store.read_layer(3)[0], data[0][3] + data[1][3] + data[2][3])


def test_finalize_refuses_with_unfinished_shards(tmp_path):
    store = make_store(tmp_path)
    finish_shards(store, 4, shards=[0, 2])
    store.save_checkpoint(1, 4, moments(7), {3: 1, 5: 1}, {"next_doc": 3, "tokens": 1, "done": False})
    assert store.finished_shards(4) == [0, 2]
    with pytest.raises(DataError, match=r"shards 1, 3 of 4 not done"):
        store.finalize(4)
    assert not store.is_complete()
    with pytest.raises(MissingInput, match="not complete"):
        store.read_layer(3)


def test_single_shard_store_equals_its_checkpoint(tmp_path):
    store = make_store(tmp_path)
    data = finish_shards(store, 1)
    store.finalize(1, keep_shards=True)
    assert np.array_equal(store.read_layer(5)[0], data[0][5])
    assert (store.path / "shards/0_of_1").is_dir()


# ------------------------------------------------------------------------------------------- damage


def test_intact_store_verifies(tmp_path):
    store, _ = complete_store(tmp_path)
    store.verify()
    StatsStore.open(store.path, full_check=True)


def test_deleted_chunk_is_detected(tmp_path):
    store, _ = complete_store(tmp_path)
    (store.path / "layer_5/sum/c/0/0").unlink()
    with pytest.raises(DataError, match="layer 5 sum is missing 1 of 1 chunk files"):
        store.verify()
    with pytest.raises(DataError, match="missing 1 of 1 chunk"):
        StatsStore.open(store.path)


def test_truncated_chunk_is_detected(tmp_path):
    store, _ = complete_store(tmp_path)
    chunk = store.path / "layer_3/sum/c/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-40])
    with pytest.raises(DataError, match="layer 3 sum"):
        store.verify()
    with pytest.raises(DataError, match="layer 3 sum"):
        store.read_layer(3)
    assert store.read_layer(5)[0].shape == (D, D)  # the undamaged layer still reads


def test_removed_layer_group_is_detected(tmp_path):
    import shutil

    store, _ = complete_store(tmp_path)
    shutil.rmtree(store.path / "layer_3")
    with pytest.raises(DataError, match="layer group layer_3 is missing"):
        StatsStore.open(store.path)


def test_edited_count_is_detected(tmp_path):
    import zarr

    store, _ = complete_store(tmp_path)
    zarr.open_array(str(store.path / "layer_5/count"), mode="r+")[...] = 41
    with pytest.raises(DataError, match="layer 5 count is 41 but the store recorded 40"):
        store.verify()
    with pytest.raises(DataError):
        StatsStore.open(store.path)


def test_interrupted_creation_does_not_look_complete(tmp_path):
    key = make_key()
    path = store_path(tmp_path, key)
    path.mkdir()
    (path / LOCK_NAME).write_text("{}")  # only a lock: creation died before zarr.json
    assert list_stores(tmp_path)[0]["error"].endswith("(creation was interrupted).")
    assert find_store(tmp_path, key, LAYERS) is None
    store = StatsStore.open_or_create(path, key, {}, LAYERS, D, "float64")
    assert not store.is_complete()


# ------------------------------------------------------------------------------------------- finding


def test_find_store_accepts_a_superset_of_layers(tmp_path):
    store = make_store(tmp_path, layers=[3, 4, 5, 6, 7, 8])
    store.save_checkpoint(0, 1, moments(9, layers=store.layers), {layer: 20 for layer in store.layers},
                          {"next_doc": 1, "tokens": 20, "done": True})
    store.finalize(1)
    incomplete = make_store(tmp_path, layers=[4, 5])  # exact match but not complete: not found
    base = make_key()
    found = find_store(tmp_path, base, [4, 5, 6, 7, 8])
    assert found is not None and found.path == store.path
    assert find_store(tmp_path, base, [2, 3]) is None
    assert find_store(tmp_path, {**base, "tokens": 5}, [4]) is None
    summaries = {s["path"]: s for s in list_stores(tmp_path)}
    assert summaries[str(store.path)]["complete"] and not summaries[str(incomplete.path)]["complete"]
    assert summaries[str(store.path)]["layers"] == [3, 4, 5, 6, 7, 8]


def test_find_store_prefers_the_tightest_store(tmp_path):
    wide = make_store(tmp_path, layers=[2, 3, 4, 5, 6])
    tight = make_store(tmp_path, layers=[4, 5])
    for store in (wide, tight):
        store.save_checkpoint(0, 1, moments(1, layers=store.layers), {layer: 20 for layer in store.layers},
                              {"next_doc": 1, "tokens": 20, "done": True})
        store.finalize(1)
    assert find_store(tmp_path, make_key(), [4]).path == tight.path
    assert find_store(tmp_path, make_key(), [3, 4]).path == wide.path


def finished_store(stats_dir: Path, count: int, **over) -> StatsStore:
    """A complete one-shard store that counted ``count`` tokens (``over``: fields of its key)."""
    store = make_store(stats_dir, **over)
    store.save_checkpoint(0, 1, moments(count, layers=store.layers), {layer: count for layer in store.layers},
                          {"next_doc": 1, "tokens": count, "done": True})
    store.finalize(1)
    return store


def test_find_store_by_model_and_module_takes_the_most_tokens(tmp_path):
    """The edit stage's question: any complete statistics of this model's down-projections (whatever corpus,
    budget or accumulation), the one with the most tokens first; never another model's or module's, never
    an incomplete store."""
    small = finished_store(tmp_path, 20)
    large = finished_store(tmp_path, 60, corpus={"name": "other"}, tokens=None, layers=[3, 4, 5, 6])
    finished_store(tmp_path, 90, model_id="another/model")
    finished_store(tmp_path, 90, module="model.layers.{}.mlp.up_proj")
    make_store(tmp_path, tokens=5000)  # incomplete
    edit = {"model_id": make_key()["model_id"], "module": make_key()["module"]}
    assert find_store(tmp_path, edit, [3, 5]).path == large.path
    assert find_store(tmp_path, {**edit, "layers": [1]}, [5]).path == large.path  # layers in ``match``: ignored
    assert find_store(tmp_path, edit, [5, 7]) is None
    assert find_store(tmp_path, make_key(), [5]).path == small.path  # a whole key: the statistics of that key
    assert find_store(tmp_path / "absent", edit, [5]) is None


def test_find_store_refuses_a_damaged_winner_and_passes_over_foreign_folders(tmp_path):
    """A damaged best store is a DataError (delete it and rebuild), not a silent fallback to other
    statistics; folders that are not covedit stores (or of another schema) are passed over."""
    finished_store(tmp_path, 20)
    best = finished_store(tmp_path, 60, tokens=None)
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "zarr.json").write_text('{"node_type": "group", "attributes": {}}')
    edit = {"model_id": make_key()["model_id"], "module": make_key()["module"]}
    assert find_store(tmp_path, edit, [5]).path == best.path
    (best.path / "layer_5/sum/c/0/0").unlink()
    with pytest.raises(DataError, match="missing 1 of 1 chunk"):
        find_store(tmp_path, edit, [5])


def test_the_edit_stage_reads_statistics_only_through_the_store():
    """One-way imports: nothing in covedit.pipeline imports covedit.stats except covedit.stats.store (the
    statistics stage itself, corpus and distributed, is run by the command line, never by the edit stage)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "pipeline"
    found = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [(path.name, n) for n in names if n.startswith(("covedit.stats", "stats"))]
    assert found and all(name == "covedit.stats.store" for _, name in found), found


# ------------------------------------------------------------------------------------------- npz interop


def test_export_import_npz_round_trip(tmp_path):
    store, data = complete_store(tmp_path)
    out = export_npz(store, 5, tmp_path / "out" / "model.layers.5.mlp.down_proj_float64_mom2_100000.npz")
    with np.load(out, allow_pickle=False) as npz:
        assert set(npz.keys()) >= {"mom2.mom2", "mom2.count", "mom2.constructor", "sample_size"}
        assert np.array_equal(npz["mom2.mom2"], data[0][5] + data[1][5])  # raw sum, not the mean
        assert int(npz["mom2.count"]) == 40
        assert str(npz["mom2.constructor"]) == "util.runningstats.SecondMoment()"
        assert int(npz["sample_size"]) == 100000
    imported = import_npz(out, tmp_path / "imported", make_key(model_id="other"), 5)
    assert imported.is_complete() and imported.layers == [5] and imported.key["accumulate"] == "float64"
    total, count = imported.read_layer(5)
    assert total.tobytes() == (data[0][5] + data[1][5]).tobytes() and count == 40
    assert imported.summary()["tokens"] == 40
    again = import_npz(out, tmp_path / "imported", make_key(model_id="other"), 5)  # same file: no conflict
    assert again.path == imported.path
    assert find_store(tmp_path / "imported", make_key(model_id="other"), [5]).path == imported.path


def test_a_mixed_store_keeps_its_policy_through_npz(tmp_path):
    """covedit's export records its key: a mixed store comes back keyed mixed (float64 sums), not float64."""
    store, _ = complete_store(tmp_path, accumulate="mixed")
    out = export_npz(store, 5, tmp_path / "out" / "mixed.npz")
    imported = import_npz(out, tmp_path / "imported", make_key(model_id="other"), 5)
    assert imported.key["accumulate"] == "mixed" and imported.dtype == np.float64


def test_import_rome_style_float32_file(tmp_path):
    """A file as ROME's tally writes it: float32 mom2, count, constructor, sample_size."""
    k = np.random.default_rng(4).standard_normal((50, D)).astype(np.float32)
    mom2 = k.T @ k
    path = tmp_path / "rome.npz"
    np.savez(path, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                      "mom2.count": np.array(50), "mom2.mom2": mom2, "sample_size": np.array(100000)})
    store = import_npz(path, tmp_path / "stats", make_key(), 17)
    assert store.key["accumulate"] == "float32" and store.dtype == np.float32
    total, count = store.read_layer(17)
    assert np.array_equal(total, mom2) and count == 50
    assert np.array_equal(store.covariance(17), mom2.astype(np.float64) / 50)
    assert store.summary()["provenance"]["npz_sample_size"] == 100000


def test_import_rejects_bad_files(tmp_path):
    with pytest.raises(MissingInput):
        import_npz(tmp_path / "none.npz", tmp_path, make_key(), 3)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(3))
    with pytest.raises(DataError, match="no mom2.mom2"):
        import_npz(bad, tmp_path, make_key(), 3)
    np.savez(bad, **{"mom2.mom2": np.arange(16.0).reshape(4, 4), "mom2.count": np.array(3)})
    with pytest.raises(DataError, match="not a raw second moment"):
        import_npz(bad, tmp_path, make_key(), 3)


# ------------------------------------------------------------------------------------------- lock


def test_second_lock_is_refused(tmp_path):
    store = make_store(tmp_path)
    with StoreLock(store) as lock:
        info = json.loads(lock.lock_path.read_text())
        assert info["pid"] == os.getpid()
        with pytest.raises(StoreConflict, match=rf"is being built by pid {os.getpid()} on host"):
            StoreLock(store.path).acquire()
    assert not (store.path / LOCK_NAME).exists()
    with StoreLock(store.path):  # free again
        pass


def test_stale_lock_is_broken(tmp_path, caplog):
    store = make_store(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path = store.path / LOCK_NAME
    lock_path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                     "time": "2020-01-01T00:00:00+00:00"}))
    with StoreLock(store) as lock:
        assert json.loads(lock.lock_path.read_text())["pid"] == os.getpid()
    assert f"breaking stale lock {lock_path} of dead pid {dead.pid}" in caplog.text


def test_lock_from_another_host_is_not_broken(tmp_path):
    store = make_store(tmp_path)
    (store.path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": "T"}))
    with pytest.raises(StoreConflict, match="pid 1 on host elsewhere since T"):
        StoreLock(store).acquire()


def test_shard_locks_exclude_the_same_shard_and_the_whole_store(tmp_path):
    store = make_store(tmp_path)
    with StoreLock(store, ranks=0), StoreLock(store.path, ranks=1):  # different shards run side by side
        with pytest.raises(StoreConflict, match=r"shard lock covedit.shard-1.lock\) is being built by pid"):
            StoreLock(store, ranks=[1, 2]).acquire()
        assert not (store.path / "covedit.shard-2.lock").exists()  # a refused acquire leaves nothing behind
        with pytest.raises(StoreConflict, match="is being built by pid"):
            StoreLock(store).acquire()
    with StoreLock(store):
        with pytest.raises(StoreConflict, match="is being built by pid"):
            StoreLock(store, ranks=3).acquire()
    assert sorted(p.name for p in store.path.glob("*.lock")) == []


# ------------------------------------------------------------------------------------------- worker helpers


def test_worker_helpers(tmp_path):
    store, _ = complete_store(tmp_path, model_id="w")
    assert store.key_hash == key_hash(store.key) and store.path.name.endswith(f"-{store.key_hash}.zarr")
    fresh = make_store(tmp_path)
    assert fresh.checkpoint_position(0, 2) is None
    fresh.save_checkpoint(0, 2, moments(1), {3: 20, 5: 20}, {"next_doc": 4, "tokens": 20})
    assert fresh.checkpoint_position(0, 2) == {"next_doc": 4, "tokens": 20, "done": False}
    (store.path / "layer_5/sum/c/0/0").unlink()
    assert StatsStore.open(store.path, verify=False).layers == LAYERS  # no checks asked for
    with pytest.raises(DataError):
        StatsStore.open(store.path)
