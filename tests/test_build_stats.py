"""build-stats end to end through the real command line: exact sums, bitwise resume after kill -9,
N workers equal to 1, retried shards counted once, and one clear sentence for every bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cli
from covedit.stats.collect import SecondMoment, accumulate_batches
from covedit.stats.corpus import CorpusSpec, iter_batches, make_plan, open_corpus
from covedit.stats.store import StatsStore

ROOT = Path(__file__).resolve().parents[1]


def common(tiny_dir, corpus_file, tokens=20000):
    return ["build-stats", "--model", tiny_dir, "--corpus", corpus_file, "--layers", "1-2", "--tokens", tokens,
            "--max-length", 64, "--batch-tokens", 256, "--window-docs", 8, "--quiet"]


def run_json(args, stats_dir, **kw) -> dict:
    out = cli(*args, "--json", stats_dir=stats_dir, **kw)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def read(path):
    st = StatsStore.open(path)
    return {L: st.read_layer(L) for L in st.layers}


@pytest.mark.slow
def test_store_equals_direct_accumulation(tiny_dir, corpus_file, tokenizer, tmp_path):
    res = run_json(common(tiny_dir, corpus_file, 5000), tmp_path)
    assert res["status"] == "built" and res["tokens"] == 5000
    from covedit.pipeline.models import load_model
    loaded = load_model(str(tiny_dir))
    corpus = open_corpus(CorpusSpec(str(corpus_file)))
    plan = make_plan(corpus, loaded.tokenizer, 5000, 64, "skip")
    assert StatsStore.open(res["path"]).key["accumulate"] == "mixed"  # the default
    moments = {L: SecondMoment(loaded.d_ff, "mixed") for L in (1, 2)}
    for _ in accumulate_batches(loaded, [1, 2], iter_batches(corpus, loaded.tokenizer, 0, plan.n_docs, plan, 64, 256,
                                                             "skip", 8), moments):
        pass
    for L, (total, count) in read(res["path"]).items():
        expected, n = moments[L].state()
        assert count == n == 5000
        np.testing.assert_allclose(total, expected, rtol=1e-12)
    again = run_json(common(tiny_dir, corpus_file, 5000), tmp_path)
    assert again["status"] == "cached" and again["wall_seconds"] < 30


def start_and_wait(args, stats_dir: Path, store: Path, min_tokens: int) -> subprocess.Popen:
    """Start build-stats and return once its first shard has checkpointed at least ``min_tokens``."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=ROOT,
                            env={**os.environ, "COVEDIT_STATS_DIR": str(stats_dir)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if store.exists():
            try:
                position = StatsStore.open(store, verify=False).checkpoint_position(0, 1)
            except Exception:  # noqa: BLE001 (store being created)
                position = None
            if position and position["tokens"] >= min_tokens:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted: make it longer"
    return proc


# Slow the tiny model's run down (small batches, frequent checkpoints) so it can be hit part way through.
LONG = ["--checkpoint-every", 1000, "--batch-tokens", 64]


@pytest.mark.slow
def test_kill_minus_9_then_resume_is_bitwise_identical(tiny_dir, corpus_file, tmp_path):
    args = common(tiny_dir, corpus_file, 30000) + LONG
    clean = run_json(args, tmp_path / "clean")
    store = Path(clean["path"].replace(str(tmp_path / "clean"), str(tmp_path / "killed")))
    proc = start_and_wait(args, tmp_path / "killed", store, 3000)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not StatsStore.open(store, verify=False).is_complete()
    resumed = run_json(args, tmp_path / "killed")
    assert resumed["status"] == "resumed" and resumed["tokens"] == 30000
    a, b = read(clean["path"]), read(resumed["path"])
    for L in a:
        assert a[L][1] == b[L][1] == 30000
        assert np.array_equal(a[L][0], b[L][0]), f"layer {L} differs after resume"


@pytest.mark.slow
def test_sigusr1_checkpoints_and_exits_75_then_resumes(tiny_dir, corpus_file, tmp_path):
    args = common(tiny_dir, corpus_file, 30000) + LONG
    fresh = run_json(args, tmp_path / "fresh")
    store = Path(fresh["path"].replace(str(tmp_path / "fresh"), str(tmp_path / "stopped")))
    proc = start_and_wait(args, tmp_path / "stopped", store, 2000)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "rerun" in err and "Traceback" not in err
    done = run_json(args, tmp_path / "stopped")
    assert done["status"] == "resumed"
    a, b = read(done["path"]), read(fresh["path"])
    for L in a:
        assert a[L][1] == b[L][1] and np.array_equal(a[L][0], b[L][0])


@pytest.mark.slow
def test_two_workers_equal_one_and_failed_shard_is_retried_once(tiny_dir, corpus_file, tmp_path):
    """A fault raised in shard 1 right after a checkpoint (passed to build_stats, it travels with the task to
    the dask worker): dask retries the task, which resumes from that checkpoint and counts nothing twice."""
    from covedit.stats.distributed import Fault, StatsJob, build_stats

    # Same thread count in both runs: BLAS results depend on it, and the claim is "equal to float64 rounding".
    args = common(tiny_dir, corpus_file, 12000) + ["--checkpoint-every", 1000, "--threads", 1]
    one = run_json(args, tmp_path / "one")
    marker = tmp_path / "fault-marker"
    job = StatsJob(model=str(tiny_dir), layers=(1, 2), corpus=CorpusSpec(str(corpus_file)), tokens=12000,
                   max_length=64, batch_tokens=256, window_docs=8, checkpoint_tokens=1000, checkpoint_seconds=None,
                   threads=1, stats_dir=str(tmp_path / "two"))
    two = build_stats(job, workers=2, show_progress=False, faults=(Fault(1, str(marker)),))
    assert two.status == "built"
    assert marker.exists(), "the injected fault never fired"
    a, b = read(one["path"]), read(two.path)
    for L in a:
        assert a[L][1] == b[L][1] == 12000  # nothing counted twice or lost
        np.testing.assert_allclose(b[L][0], a[L][0], rtol=1e-12, atol=1e-12 * np.abs(a[L][0]).max())


@pytest.mark.slow
def test_signal_handlers_are_the_builds_only(tiny_dir, corpus_file, tmp_path):
    """stop_on_signals installs its handlers for the duration of the block and puts the previous ones back,
    on a normal exit and on an exception; each block has its own stop event. So does a whole build_stats."""
    from covedit.stats.distributed import STOP_SIGNALS, StatsJob, build_stats, stop_on_signals

    def mine(signum, frame):
        raise AssertionError("not expected to run")

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        signal.signal(signal.SIGUSR1, mine)
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        with stop_on_signals() as stop:
            assert all(signal.getsignal(sig) not in (previous[sig], None) for sig in STOP_SIGNALS)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.wait(5), "the signal did not set the build's stop event"
        assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == previous
        with pytest.raises(RuntimeError, match="inside"):
            with stop_on_signals() as again:
                assert not again.is_set()  # a new build starts unstopped
                raise RuntimeError("inside")
        assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == previous
        job = StatsJob(model=str(tiny_dir), layers=(1,), corpus=CorpusSpec(str(corpus_file)), tokens=500,
                       max_length=64, batch_tokens=256, window_docs=8, stats_dir=str(tmp_path))
        assert build_stats(job, show_progress=False).status == "built"
        assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == previous
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.slow
@pytest.mark.parametrize("case,code,needle", [
    ("unknown-model", 66, "does not exist"),
    ("layer", 2, "out of range"),
    ("no-corpus", 66, "does not exist"),
    ("empty-corpus", 65, "no text"),
    ("zero-tokens", 2, "--tokens"),
    ("unwritable", 73, ""),
])
def test_bad_input_one_sentence_distinct_code(case, code, needle, tiny_dir, corpus_file, tmp_path):
    stats_dir = tmp_path / "stats"
    args = {"model": tiny_dir, "corpus": corpus_file, "layers": "1-2", "tokens": 1000}
    if case == "unknown-model":
        args["model"] = "./no-such-model"
    elif case == "layer":
        args["layers"] = "2,9"
    elif case == "no-corpus":
        args["corpus"] = tmp_path / "missing.jsonl"
    elif case == "empty-corpus":
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "a.txt").write_text("\n\n   \n")
        args["corpus"] = empty
    elif case == "zero-tokens":
        args["tokens"] = 0
    elif case == "unwritable":
        (tmp_path / "afile").write_text("x")
        stats_dir = tmp_path / "afile" / "stats"
    out = cli("build-stats", *[x for k, v in args.items() for x in (f"--{k}", v)], "--quiet", stats_dir=stats_dir)
    assert out.returncode == code, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith("covedit: error:") and "Traceback" not in out.stderr, out.stderr
    assert needle in lines[0]
    if stats_dir.exists():
        for store in stats_dir.glob("*.zarr"):
            assert not StatsStore.open(store, verify=False).is_complete()


@pytest.mark.slow
def test_stats_import_keys_the_store_like_a_loaded_model_and_refuses_other_models(tiny_dir, tmp_path):
    """`stats import` loads no weights, yet batch-edit (which loads the model) must find its store; a
    file of another width or a layer the model lacks is refused before anything is written."""
    from covedit.pipeline.models import load_model
    from covedit.stats.store import find_store

    loaded = load_model(str(tiny_dir))
    k = np.random.default_rng(0).standard_normal((40, loaded.d_ff))
    good, wide = tmp_path / "good.npz", tmp_path / "wide.npz"
    np.savez(good, **{"mom2.mom2": k.T @ k, "mom2.count": np.array(40)})
    np.savez(wide, **{"mom2.mom2": np.eye(loaded.d_ff + 1), "mom2.count": np.array(40)})
    stats_dir = tmp_path / "stats"

    refused = [cli("stats", "import", wide, "--layer", 1, "--model", tiny_dir, "--stats-dir", stats_dir),
               cli("stats", "import", good, "--layer", loaded.num_layers, "--model", tiny_dir, "--stats-dir", stats_dir)]
    assert [r.returncode for r in refused] == [65, 2], [r.stderr for r in refused]
    assert "another model" in refused[0].stderr and "out of range" in refused[1].stderr
    assert not stats_dir.exists() or not list(stats_dir.iterdir())

    out = cli("stats", "import", good, "--layer", 1, "--model", tiny_dir, "--stats-dir", stats_dir)
    assert out.returncode == 0, out.stderr
    store = find_store(stats_dir, {"model_id": loaded.model_id, "module": loaded.arch.template()}, [1])
    assert store is not None and np.array_equal(store.covariance(1), k.T @ k / 40)


@pytest.mark.slow
def test_shard_then_reduce_and_cache_hits_load_no_weights(tiny_dir, corpus_file, tmp_path, monkeypatch):
    """Only the process that runs a shard loads the model: --reduce and a cached store (and so a dask
    coordinator) work from the weightless skeleton, and the reduced store equals a one-shard build."""
    from covedit.stats import distributed
    from covedit.stats.corpus import CorpusSpec
    from covedit.stats.distributed import StatsJob, build_stats

    job = StatsJob(model=str(tiny_dir), layers=(1, 2), corpus=CorpusSpec(str(corpus_file)), tokens=3000,
                   max_length=64, batch_tokens=256, window_docs=8, stats_dir=str(tmp_path / "split"))
    for i in range(2):
        assert build_stats(job, shard=(i, 2), show_progress=False).status == "shard-done"

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(distributed, "load_model", no_weights)
    reduced = build_stats(job, reduce_only=True, show_progress=False)
    assert reduced.status == "reduced"
    assert build_stats(job, workers=2, show_progress=False).status == "cached"
    monkeypatch.undo()
    whole = build_stats(StatsJob(**{**job.__dict__, "stats_dir": str(tmp_path / "whole")}), show_progress=False)
    for (L, (a, n)), (_, (b, m)) in zip(read(reduced.path).items(), read(whole.path).items()):
        assert n == m and np.allclose(a, b, rtol=1e-12, atol=0), L
