"""File locks on a statistics store: one run builds a store (or one shard of it) at a time.

A lock is a small JSON file (pid, host, time) created with ``O_CREAT | O_EXCL``, so of runs that race for
it exactly one wins, and whoever is refused learns who holds it. It lives apart from
:mod:`covedit.stats.store` because only the builder (:mod:`covedit.stats.distributed`) takes locks;
reading, verifying and importing a store never do. Files, inside the store folder::

    covedit.lock              the whole store (a build that may touch every shard, or the reduction)
    covedit.shard-<i>.lock    shard i only, so that Slurm array jobs build different shards side by side

A whole-store lock and any shard lock exclude each other. A lock left by a dead process on this host is
broken with a warning; one from another host is never broken automatically (its pid means nothing here),
the message names the file to delete.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path

from covedit.pipeline.errors import StoreConflict
from covedit.stats.store import StatsStore, ensure_writable_dir, read_json, utc_now

log = logging.getLogger(__name__)

LOCK_NAME = "covedit.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Exclusive right to build a store: ``with StoreLock(path): ...``.

    The lock file (``covedit.lock`` in the store) holds pid, host and time. ``ranks`` locks only those
    shards instead (``covedit.shard-<i>.lock``), so that Slurm array jobs can build different shards of one
    store at once; a whole-store lock and any shard lock exclude each other. A lock left by a dead process on
    this host is broken with a warning; a lock from another host is never broken automatically.
    """

    def __init__(self, store: StatsStore | Path | str, ranks: int | Iterable[int] | None = None) -> None:
        self.store_dir = store.path if isinstance(store, StatsStore) else Path(store)
        if ranks is None:
            self.ranks: list[int] | None = None
            self.lock_paths = [self.store_dir / LOCK_NAME]
        else:
            self.ranks = sorted({int(r) for r in ([ranks] if isinstance(ranks, int) else ranks)})
            self.lock_paths = [self.store_dir / f"covedit.shard-{r}.lock" for r in self.ranks]
        self.lock_path = self.lock_paths[0]
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "time": utc_now()}
        self.held: list[Path] = []

    def _try_create(self, lock_path: Path) -> bool:
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self.info))
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _refuse_or_break(self, lock_path: Path) -> None:
        """StoreConflict if ``lock_path`` is held by a live run (or one on another host); else remove it."""
        holder = read_json(lock_path)
        what = f"store at {self.store_dir}" + (f" (shard lock {lock_path.name})" if lock_path.name != LOCK_NAME
                                              else "")
        if holder is None:
            if lock_path.exists():
                raise StoreConflict(f"{what} is locked by an unreadable {lock_path}; "
                                    f"delete it if no run is building that store.")
            return
        pid = holder.get("pid")
        if holder.get("host") == self.info["host"] and isinstance(pid, int) and not _pid_alive(pid):
            log.warning("breaking stale lock %s of dead pid %s (since %s)", lock_path, pid, holder.get("time"))
            lock_path.unlink(missing_ok=True)
            return
        raise StoreConflict(
            f"{what} is being built by pid {pid} on host {holder.get('host')} since {holder.get('time')}; "
            f"wait for it, or delete {lock_path} if that run is dead."
        )

    def _acquire_one(self, lock_path: Path) -> None:
        for _attempt in range(3):
            if self._try_create(lock_path):
                self.held.append(lock_path)
                return
            self._refuse_or_break(lock_path)
        raise StoreConflict(f"could not lock {self.store_dir}: another process keeps taking {lock_path}.")

    def acquire(self) -> None:
        ensure_writable_dir(self.store_dir)
        if self.ranks is None:
            others = sorted(self.store_dir.glob("covedit.shard-*.lock"))
        else:
            others = [self.store_dir / LOCK_NAME]
        for other in others:
            if other.exists():
                self._refuse_or_break(other)
        try:
            for lock_path in self.lock_paths:
                self._acquire_one(lock_path)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for lock_path in self.held:
            holder = read_json(lock_path)
            if holder is not None and holder.get("pid") == self.info["pid"] \
                    and holder.get("host") == self.info["host"]:
                lock_path.unlink(missing_ok=True)
        self.held = []

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
