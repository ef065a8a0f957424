"""Shards and faults of the statistics stage, through the real command line: ``--shard I/N`` computes one
shard and is never counted twice, ``--reduce`` refuses while a shard is missing and otherwise equals a
one-worker run, two runs on one store exclude each other, stale locks are broken, a SIGKILLed dask worker's
shard is redone, and a full disk stops the run with one sentence and an intact last checkpoint.

Runs that need their own process (a lock held by another pid) go through a subprocess; the rest call the typer
app in this process, which is quicker and lets a test make the disk fail, or build_stats itself where a test
injects a fault (dask workers are processes of their own either way)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr.storage._local
from typer.testing import CliRunner

from conftest import cli as subprocess_cli  # `cli` here is the typer app's module, called in this process
from covedit import cli
from covedit.stats.corpus import CorpusSpec
from covedit.stats.distributed import STOP_SIGNALS, Fault, StatsJob, assign_devices, build_stats
from covedit.stats.store import StatsStore

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 12000


def args(tiny_dir, corpus_file, stats_dir, *extra) -> list[str]:
    # One torch thread everywhere: BLAS sums depend on the thread count, and runs are compared exactly.
    return ["build-stats", "--model", str(tiny_dir), "--corpus", str(corpus_file), "--layers", "1-2",
            "--tokens", str(TOKENS), "--max-length", "64", "--batch-tokens", "256", "--window-docs", "8",
            "--threads", "1", "--checkpoint-every", "1000", "--stats-dir", str(stats_dir), "--quiet",
            *map(str, extra)]


def job(tiny_dir, corpus_file, stats_dir) -> StatsJob:
    """The job that ``args`` describes, for calling build_stats in this process."""
    return StatsJob(model=str(tiny_dir), layers=(1, 2), corpus=CorpusSpec(str(corpus_file)), tokens=TOKENS,
                    max_length=64, batch_tokens=256, window_docs=8, threads=1, checkpoint_tokens=1000,
                    checkpoint_seconds=None, stats_dir=str(stats_dir))


@contextlib.contextmanager
def process_state_kept():
    """build-stats sets torch's thread count: give the test process its own back. Its signal handlers are
    the build's only (stats.distributed.stop_on_signals): check that the test process has its own back."""
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == handlers, "build-stats left its signal handlers"


def invoke(argv: list[str]):
    """The covedit command line in this process: (exit code, stdout, stderr)."""
    with process_state_kept():
        result = CliRunner().invoke(cli.app, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def invoke_json(argv: list[str]) -> dict:
    code, out, err = invoke(argv + ["--json"])
    assert code == 0, err
    return json.loads(out)


def read(path) -> dict[int, tuple[np.ndarray, int]]:
    st = StatsStore.open(path, full_check=True)
    return {L: st.read_layer(L) for L in st.layers}


def assert_sums_equal(got: dict, want: dict, exact: bool = False) -> None:
    assert sorted(got) == sorted(want) == [1, 2]
    for L in want:
        assert got[L][1] == want[L][1] == TOKENS, f"layer {L}: a token was lost or counted twice"
        if exact:
            assert np.array_equal(got[L][0], want[L][0]), f"layer {L} differs"
        else:  # the same float64 terms added in another order
            np.testing.assert_allclose(got[L][0], want[L][0], rtol=1e-12, atol=1e-12 * np.abs(want[L][0]).max())


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith("covedit: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tiny_dir, corpus_file, tmp_path_factory) -> dict:
    """The sums of a plain one-worker run."""
    res = invoke_json(args(tiny_dir, corpus_file, tmp_path_factory.mktemp("reference")))
    assert res["status"] == "built" and res["tokens"] == TOKENS
    return read(res["path"])


# --------------------------------------------------------------------------------------------- devices


def test_assign_devices_gives_worker_i_gpu_i_mod_n():
    assert assign_devices("cuda", 4, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert assign_devices("cuda", 3, 8) == ["cuda:0", "cuda:1", "cuda:2"]
    assert assign_devices("auto", 2, 1) == ["cuda:0", "cuda:0"]
    assert assign_devices("auto", 2, 0) == ["auto", "auto"]  # no GPU: load_model picks the CPU
    assert assign_devices("cuda", 2, 0) == ["cuda", "cuda"]  # no GPU: load_model says so in one sentence
    assert assign_devices("cuda:3", 2, 4) == ["cuda:3", "cuda:3"]  # an explicit device is kept
    assert assign_devices("cpu", 3, 4) == ["cpu", "cpu", "cpu"]


# --------------------------------------------------------------------------------------------- shards


@pytest.mark.slow
def test_shards_then_reduce_equal_one_worker_and_count_each_token_once(tiny_dir, corpus_file, tmp_path, reference):
    base = args(tiny_dir, corpus_file, tmp_path)
    first = invoke_json(base + ["--shard", "0/2"])
    assert first["status"] == "shard-done"
    store = StatsStore.open(first["path"], verify=False)
    assert not store.is_complete() and store.finished_shards(2) == [0]
    assert store.checkpoint_position(1, 2) is None  # shard 1 untouched
    seq = store._slot_records(0, 2)[0][1]["seq"]

    again = invoke_json(base + ["--shard", "0/2"])  # a rerun of a finished shard computes nothing
    assert again["status"] == "shard-done" and store._slot_records(0, 2)[0][1]["seq"] == seq

    code, _, err = invoke(base + ["--reduce"])
    assert code == 65 and "shard 1 of 2 not done" in one_error_line(err)
    assert not store.is_complete()
    code, _, err = invoke(base + ["--shard", "1/3"])
    assert code == 2 and "planned with 2 shards" in one_error_line(err)

    assert invoke_json(base + ["--shard", "1/2"])["status"] == "shard-done"
    reduced = invoke_json(base + ["--reduce"])
    assert reduced["status"] == "reduced" and reduced["tokens"] == TOKENS
    assert_sums_equal(read(reduced["path"]), reference)
    assert invoke_json(base + ["--reduce"])["status"] == "cached"


# --------------------------------------------------------------------------------------------- locks


def lock_record(pid: int, host: str) -> str:
    return json.dumps({"pid": pid, "host": host, "time": "2026-01-01T00:00:00+00:00"})


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_stale_locks_are_broken_and_foreign_ones_respected(tiny_dir, corpus_file, tmp_path, reference, caplog):
    base = args(tiny_dir, corpus_file, tmp_path)
    store = Path(invoke_json(base + ["--shard", "0/2"])["path"])
    here = socket.gethostname()
    # A live-looking lock of another host is never broken: that run may be alive on its node.
    (store / "covedit.shard-1.lock").write_text(lock_record(os.getpid(), "node-elsewhere"))
    code, _, err = invoke(base)
    assert code == 78 and "node-elsewhere" in one_error_line(err)
    assert (store / "covedit.shard-1.lock").exists() and not (store / "covedit.lock").exists()

    # Locks of dead processes on this host (a run killed with -9) are broken, whole-store and shard ones.
    (store / "covedit.shard-1.lock").write_text(lock_record(dead_pid(), here))
    (store / "covedit.lock").write_text(lock_record(dead_pid(), here))
    with caplog.at_level("WARNING", logger="covedit.stats.locks"):
        done = invoke_json(base)
    assert done["status"] == "built"  # shard 0 was finished, shard 1 starts afresh
    assert sum("breaking stale lock" in r.getMessage() for r in caplog.records) == 2
    assert not list(store.glob("*.lock"))
    assert_sums_equal(read(store), reference)


@pytest.mark.slow
def test_two_runs_on_one_store_one_proceeds_the_other_refuses(tiny_dir, corpus_file, tmp_path, reference):
    argv = args(tiny_dir, corpus_file, tmp_path, "--json")
    first = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *argv], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lock = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and lock is None:
            lock = next(iter(tmp_path.glob("*.zarr/covedit.lock")), None)
            time.sleep(0.002)
        assert lock is not None, "the first run finished before its lock was seen"
        first.send_signal(signal.SIGSTOP)  # hold it while it owns the lock: a stopped process is alive
        second = subprocess_cli(*argv, timeout=300)
        assert second.returncode == 78
        assert f"is being built by pid {first.pid}" in one_error_line(second.stderr)
        assert json.loads(lock.read_text())["pid"] == first.pid  # the refused run left the lock alone
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    result = json.loads(out)
    assert result["status"] == "built" and not lock.exists()
    assert_sums_equal(read(result["path"]), reference)


# --------------------------------------------------------------------------------------------- faults


@pytest.mark.slow
def test_sigkilled_dask_worker_shard_is_redone(tiny_dir, corpus_file, tmp_path, reference):
    """A Fault of kind "kill" SIGKILLs the worker running shard 1 right after a checkpoint; the nanny restarts
    it, dask reruns the task, which resumes from that checkpoint."""
    marker = tmp_path / "killed-pid"
    with process_state_kept():
        result = build_stats(job(tiny_dir, corpus_file, tmp_path / "stats"), workers=2, show_progress=False,
                             faults=(Fault(1, str(marker), kind="kill"),))
    assert marker.exists(), "the injected kill never fired"
    killed = int(marker.read_text())
    assert killed != os.getpid()
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)
    assert result.status == "built"
    assert_sums_equal(read(result.path), reference)


@pytest.mark.slow
def test_full_disk_stops_with_one_sentence_and_the_last_checkpoint_survives(tiny_dir, corpus_file, tmp_path,
                                                                            reference, monkeypatch):
    """The disk fills up half way through the second checkpoint (one layer's partial sum written, the next
    one refused): exit 73 without a traceback; the first checkpoint is intact and a rerun ends exactly."""
    real_put = zarr.storage._local._put
    chunk_writes = []

    def put(path, value, *a, **kw):
        parts = Path(path).parts  # a chunk of a checkpoint: .../shards/<i>_of_<n>/slot_x/layer_L/sum/c/0/0
        if "shards" in parts and "sum" in parts and parts[parts.index("sum") + 1:][:1] == ("c",):
            chunk_writes.append(str(path))
            if len(chunk_writes) == 4:  # checkpoint 1 wrote layers 1 and 2; checkpoint 2 wrote layer 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_put(path, value, *a, **kw)

    base = args(tiny_dir, corpus_file, tmp_path)
    monkeypatch.setattr(zarr.storage._local, "_put", put)
    code, _, err = invoke(base)
    monkeypatch.undo()
    assert code == 73
    line = one_error_line(err)
    assert "No space left on device while checkpointing shard 0" in line and "rerun the same command" in line
    assert len(chunk_writes) == 4

    store = StatsStore.open(next(tmp_path.glob("*.zarr")), verify=False)
    assert not store.is_complete() and not list(store.path.glob("*.lock"))
    sums, counts, position = store.load_checkpoint(0, 1)
    assert 1000 <= position["tokens"] < TOKENS and not position["done"]
    assert counts == {1: position["tokens"], 2: position["tokens"]}

    resumed = invoke_json(base)
    assert resumed["status"] == "resumed"
    assert_sums_equal(read(resumed["path"]), reference, exact=True)
