"""Running the statistics stage: plan, shards, workers, checkpoints, reduce.

The corpus prefix that the token budget selects is cut into N contiguous shards. Each shard is one task:
it loads its own model copy, streams its documents, checkpoints its partial sums into its own node of the
store, and marks itself done. The coordinator then adds the finished shards up (``finalize``).

Shards are independent of workers: one process can run all of them in turn (``--workers 1``, no dask), a
dask ``LocalCluster`` can run them in parallel (``--workers N``), or an existing cluster can
(``--scheduler tcp://...``). A failed task is retried by dask and resumes from its own last checkpoint, so
nothing is counted twice. A store's shard count is fixed when it is created, so a partial run can be resumed
with any number of workers.

With ``--device cuda`` and a ``LocalCluster`` of N workers, worker i (dask names them 0..N-1) loads its model
on ``cuda:(i % GPUs)`` (``assign_devices``). Workers of an external cluster keep the device they are given:
start one worker per GPU there with ``CUDA_VISIBLE_DEVICES`` set (see examples/slurm).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

from covedit.pipeline.errors import CannotWrite, Interrupted, UsageError
from covedit.pipeline.models import describe_model, load_model, pick_device
from covedit.stats.collect import SecondMoment, accumulate_batches
from covedit.stats.corpus import CorpusSpec, Plan, iter_batches, make_plan, open_corpus, shard_ranges
from covedit.stats.locks import StoreLock
from covedit.stats.store import StatsStore, canonical_key, default_provenance, store_path, sum_dtype

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass(frozen=True)
class StatsJob:
    """Everything that determines the statistics, plus how to run (which does not)."""

    model: str
    layers: tuple[int, ...]
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    tokens: int | None = None
    max_length: int = 1024
    batch_tokens: int = 8192
    bos: str = "skip"
    accumulate: str = "mixed"  # float32 products, float64 sums: within 3.5e-8 of float64 at 1M tokens (docs/statistics.md)
    dtype: str = "float32"
    device: str = "cpu"
    module_template: str | None = None
    checkpoint_tokens: int | None = 200_000
    checkpoint_seconds: float | None = 600.0
    stats_dir: str = ""
    threads: int | None = None  # torch threads per worker (default: all cores / workers)
    window_docs: int = 512  # documents sorted by length together: less padding, coarser resume points


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[threading.Event]:
    """For the duration of a build: SIGTERM, SIGINT and SIGUSR1 ask for a checkpoint and a clean exit 75
    (Slurm sends USR1 before the end). Yields the build's own stop event, set by those signals.

    The previous handlers are put back on exit, and the event belongs to this build alone: after it,
    Ctrl-C and SIGTERM do again what they did before (a KeyboardInterrupt, the end of the process).
    """
    stop = threading.Event()

    def request_stop(signum, _frame):
        log.warning("signal %s: checkpointing, then exiting 75 (rerun the same command to resume)", signum)
        stop.set()

    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, request_stop)
        yield stop
    finally:
        for sig, handler in previous.items():
            # None: a handler not installed from Python, which cannot be put back from here; the default then.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def job_key(job: StatsJob, loaded, corpus) -> dict:
    return canonical_key(model_id=loaded.model_id, dtype=job.dtype, module=loaded.arch.template(),
                         layers=sorted(job.layers), corpus=corpus.identity(), tokens=job.tokens,
                         max_length=job.max_length, bos=job.bos, accumulate=job.accumulate,
                         seed=job.corpus.seed)


@dataclass(frozen=True)
class Fault:
    """A test aid: a fault right after a checkpoint of ``shard``, firing once per ``marker`` file.

    ``kind`` "raise" fails the task (dask retries it), "kill" SIGKILLs the process running the shard (a lost
    worker that dask's nanny restarts). The marker (created when it fires, holding that process's pid) makes
    it fire once across retries and worker restarts. Faults are passed to ``build_stats(faults=...)`` and
    travel with each shard's task, so they reach dask workers in other processes.
    """

    shard: int
    marker: str
    kind: str = "raise"

    def __post_init__(self) -> None:
        if self.kind not in ("raise", "kill"):
            raise ValueError(f"Fault.kind must be 'raise' or 'kill', not {self.kind!r}")


def _inject_faults(faults: tuple[Fault, ...], shard: int) -> None:
    for fault in faults:
        if fault.shard == shard and not Path(fault.marker).exists():
            Path(fault.marker).write_text(str(os.getpid()))
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault in shard {shard}")


def assign_devices(device: str, workers: int, n_visible: int) -> list[str]:
    """The device of each of ``workers`` local workers: bare ``cuda`` (or ``auto`` with a GPU) becomes
    ``cuda:(i % n_visible)`` for worker i; anything else (``cpu``, an explicit ``cuda:N``) is kept for all."""
    if device in ("cuda", "auto") and n_visible > 0:
        return [f"cuda:{i % n_visible}" for i in range(workers)]
    return [device] * workers


def run_shard(job: StatsJob, path: str, shard: int, n_shards: int, progress=None, threads: int | None = None,
              loaded=None, stop: threading.Event | None = None, faults: tuple[Fault, ...] = ()) -> dict:
    """Collect one shard into the store at ``path``, resuming from its last checkpoint. Returns its totals.

    ``loaded``: the job's model, already in memory (the in-process path); workers load their own copy.
    ``stop``: once set, the shard checkpoints at the next resumable batch and raises Interrupted.
    ``faults``: test aids (``Fault``).
    """
    stop = stop if stop is not None else threading.Event()
    if threads:
        torch.set_num_threads(threads)
    store = StatsStore.open(path, verify=False)
    plan_info = store.get_plan()
    plan = Plan.from_dict(plan_info["plan"])
    start, end = plan_info["ranges"][shard]
    if loaded is None:
        loaded = load_model(job.model, job.dtype, job.device, job.module_template)
    layers = sorted(job.layers)
    moments = {layer: SecondMoment(loaded.d_ff, job.accumulate, loaded.device) for layer in layers}

    saved = store.load_checkpoint(shard, n_shards)
    next_doc, tokens = start, 0
    if saved is not None:
        sums, counts, position = saved
        if position.get("done"):
            return {"shard": shard, "tokens": position["tokens"], "resumed": True}
        for layer in layers:
            moments[layer].load(sums[layer], counts[layer])
        next_doc, tokens = position["next_doc"], position["tokens"]
        log.info("shard %d/%d: resuming at document %d after %d tokens", shard, n_shards, next_doc, tokens)

    def checkpoint(done: bool) -> None:
        states = {layer: m.state() for layer, m in moments.items()}
        try:
            store.save_checkpoint(shard, n_shards, {k: v[0] for k, v in states.items()},
                                  {k: v[1] for k, v in states.items()},
                                  {"next_doc": next_doc, "tokens": tokens, "done": done})
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The slot being written stays marked invalid until it is whole: the previous checkpoint survives.
            raise CannotWrite(f"{os.strerror(exc.errno)} while checkpointing shard {shard} into {path}: "
                              "free some space and rerun the same command to resume from the last checkpoint."
                              ) from exc

    corpus = open_corpus(job.corpus)
    batches = iter_batches(corpus, loaded.tokenizer, next_doc, end, plan, job.max_length, job.batch_tokens, job.bos,
                           plan_info.get("window_docs", job.window_docs))
    last_tokens, last_time = tokens, time.monotonic()
    for batch in accumulate_batches(loaded, layers, batches, moments):
        tokens += batch.n_tokens
        if progress is not None:
            progress(batch.n_tokens)
        if batch.resume_doc is None:
            continue
        next_doc = batch.resume_doc
        due = ((job.checkpoint_tokens and tokens - last_tokens >= job.checkpoint_tokens)
               or (job.checkpoint_seconds and time.monotonic() - last_time >= job.checkpoint_seconds))
        if due or stop.is_set():
            checkpoint(done=False)
            last_tokens, last_time = tokens, time.monotonic()
            _inject_faults(faults, shard)
        if stop.is_set():
            raise Interrupted(f"Interrupted after a checkpoint at {tokens:,} tokens of shard {shard}: "
                              "rerun the same command to resume.")
    next_doc = end
    checkpoint(done=True)
    return {"shard": shard, "tokens": tokens, "resumed": saved is not None}


@dataclass
class BuildResult:
    path: str
    status: str  # "cached", "built", "resumed", "shard-done", "reduced"
    layers: list[int]
    tokens: int
    wall_seconds: float
    tokens_per_second: float
    exhausted: bool
    key: dict

    def to_dict(self) -> dict:
        return asdict(self)


def prepare(job: StatsJob, n_shards: int, check_device: bool = True):
    """Identify the job from the model's skeleton and tokenizer, open (or create) the store and its plan.

    No weights are loaded here: a cached store, a --reduce or a dask coordinator needs none (and on a GPU
    node the coordinator's copy would sit on cuda:0 beside worker 0's). ``check_device``: refuse a device
    this machine lacks before anything is written (not with an external scheduler, whose workers may differ).
    """
    skeleton = describe_model(job.model, module_template=job.module_template, tokenizer=True)
    skeleton.check_layers(list(job.layers))
    if check_device:
        pick_device(job.device)
    if job.batch_tokens < job.max_length:
        raise UsageError(f"--batch-tokens ({job.batch_tokens}) must be at least --max-length ({job.max_length}).")
    corpus = open_corpus(job.corpus)
    key = job_key(job, skeleton, corpus)
    path = store_path(Path(job.stats_dir), key)
    store = StatsStore.open_or_create(path, key, default_provenance(), sorted(job.layers), skeleton.d_ff,
                                      sum_dtype(job.accumulate))
    if store.get_plan() is None:
        plan = make_plan(corpus, skeleton.tokenizer, job.tokens, job.max_length, job.bos)
        store.set_plan({"plan": plan.to_dict(), "n_shards": n_shards, "window_docs": job.window_docs,
                        "ranges": aligned_ranges(shard_ranges(plan, n_shards), job.window_docs, plan.n_docs)})
    return store


def aligned_ranges(ranges: list[tuple[int, int]], window: int, n_docs: int) -> list[list[int]]:
    """Move shard boundaries onto multiples of the window size.

    Windows then start at the same documents whatever the number of shards, so every batch, and so every
    key, is the same in a 1-shard and an N-shard run: only the order of the float64 additions differs.
    """
    bounds = [0] + [min(n_docs, round(stop / window) * window) for _, stop in ranges[:-1]] + [n_docs]
    bounds = [max(b, bounds[i - 1] if i else 0) for i, b in enumerate(bounds)]
    return [[bounds[i], bounds[i + 1]] for i in range(len(ranges))]


def build_stats(job: StatsJob, workers: int = 1, scheduler: str | None = None, shard: tuple[int, int] | None = None,
                reduce_only: bool = False, show_progress: bool = True, faults: tuple[Fault, ...] = ()) -> BuildResult:
    """The whole statistics stage; returns at once if the store for this key is already complete.

    While it runs, SIGTERM, SIGINT and SIGUSR1 checkpoint and stop it (Interrupted, exit 75); the process's
    own handlers are back when it returns or raises (``stop_on_signals``). ``faults``: test aids (``Fault``).
    """
    with stop_on_signals() as stop:
        return _build_stats(job, workers, scheduler, shard, reduce_only, show_progress, faults, stop)


def _build_stats(job: StatsJob, workers: int, scheduler: str | None, shard: tuple[int, int] | None,
                 reduce_only: bool, show_progress: bool, faults: tuple[Fault, ...], stop: threading.Event
                 ) -> BuildResult:
    from tqdm.auto import tqdm  # noqa: PLC0415

    t0 = time.monotonic()
    n_shards = shard[1] if shard else max(1, workers)
    store = prepare(job, n_shards, check_device=not scheduler)
    plan_info = store.get_plan()
    plan = Plan.from_dict(plan_info["plan"])
    n_shards = plan_info["n_shards"]
    if shard and shard[1] != n_shards:
        raise UsageError(f"--shard {shard[0]}/{shard[1]}: this store was planned with {n_shards} shards.")

    processed = [0]  # tokens counted by this invocation, for an honest tokens/s

    def result(status: str) -> BuildResult:
        wall = time.monotonic() - t0
        return BuildResult(str(store.path), status, sorted(job.layers), plan.tokens, wall,
                           processed[0] / wall if wall > 0 else 0.0, plan.exhausted, store.key)

    if store.is_complete():
        return result("cached")
    with StoreLock(store.path, ranks=shard[0] if shard else None):
        if reduce_only:
            store.finalize(n_shards)
            return result("reduced")
        todo = [shard[0]] if shard else [i for i in range(n_shards) if i not in store.finished_shards(n_shards)]
        already = {i: _shard_tokens(store, i, n_shards) for i in range(n_shards)}
        resumed = any(already[i] for i in todo)
        bar = tqdm(total=plan.tokens, unit="tok", unit_scale=True, desc="build-stats", disable=not show_progress,
                   smoothing=0.1)
        bar.update(sum(already.values()))

        def progress(n: int) -> None:
            processed[0] += n
            bar.update(n)

        if scheduler or workers > 1:
            _run_dask(job, store, todo, n_shards, workers, scheduler, progress, stop, faults)
        else:
            loaded = load_model(job.model, job.dtype, job.device, job.module_template)  # once for all its shards
            for i in todo:
                run_shard(job, str(store.path), i, n_shards, progress=progress, threads=job.threads, loaded=loaded,
                          stop=stop, faults=faults)
        bar.close()
        if shard:
            return result("shard-done")
        store.finalize(n_shards)
    return result("resumed" if resumed else "built")


def _shard_tokens(store: StatsStore, shard: int, n_shards: int) -> int:
    """Tokens a shard has checkpointed (its record only; the arrays are not read)."""
    info = store.checkpoint_position(shard, n_shards)
    return info["tokens"] if info else 0


def _run_dask(job: StatsJob, store: StatsStore, todo: list[int], n_shards: int, workers: int,
              scheduler: str | None, progress, stop: threading.Event, faults: tuple[Fault, ...] = ()) -> None:
    """Run the shards as dask tasks; ``stop`` (a signal on the coordinator) cancels them after a checkpoint."""
    from distributed import Client, Event, LocalCluster, wait  # noqa: PLC0415

    if scheduler:
        client, cluster, devices = Client(scheduler), None, None
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        n_visible = torch.cuda.device_count() if job.device in ("cuda", "auto") else 0
        devices = assign_devices(job.device, workers, n_visible)
        if n_visible:
            log.info("workers' devices: %s", ", ".join(f"{i}: {d}" for i, d in enumerate(devices)))
    threads = job.threads or (max(1, (os.cpu_count() or 1) // max(1, workers)) if not scheduler else None)
    try:
        stop_event = Event(f"covedit-stop-{store.key_hash}", client=client)
        stop_event.clear()
        futures = [client.submit(_dask_shard, job, str(store.path), i, n_shards, threads, stop_event.name, devices,
                                 faults, key=f"covedit-shard-{store.key_hash}-{i}-of-{n_shards}", retries=3, pure=False)
                   for i in todo]
        seen = sum(_shard_tokens(store, i, n_shards) for i in todo)
        while not all(f.done() for f in futures):
            time.sleep(0.5)
            now = sum(_shard_tokens(store, i, n_shards) for i in todo)
            if now > seen:
                progress(now - seen)
                seen = now
            if stop.is_set():
                stop_event.set()
                wait(futures)
                raise Interrupted("Interrupted after the shards checkpointed: rerun the same command to resume.")
        for f in futures:
            f.result()  # re-raise the first failure after retries
        progress(sum(_shard_tokens(store, i, n_shards) for i in todo) - seen)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _dask_shard(job: StatsJob, path: str, shard: int, n_shards: int, threads: int | None, stop_name: str,
                devices: list[str] | None = None, faults: tuple[Fault, ...] = ()) -> dict:
    """A dask task: run one shard, polling the coordinator's stop event at each resumable batch.

    ``devices`` (LocalCluster only) maps the worker's name 0..N-1 to its device; a restarted worker keeps
    its name, so it keeps its GPU. The task's own stop flag mirrors the coordinator's event, so a stop
    never outlives the task on a worker that runs later ones.
    """
    from distributed import Event, get_client, get_worker  # noqa: PLC0415

    if devices:
        job = replace(job, device=devices[int(get_worker().name) % len(devices)])
    event = Event(stop_name, client=get_client())
    stop = threading.Event()
    watcher_done = threading.Event()

    def watch() -> None:
        while not watcher_done.is_set():
            if event.is_set():
                stop.set()
                return
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()
    try:
        return run_shard(job, path, shard, n_shards, threads=threads, stop=stop, faults=faults)
    except Interrupted:
        return {"shard": shard, "interrupted": True}
    finally:
        watcher_done.set()
