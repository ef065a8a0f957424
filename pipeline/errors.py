"""Errors a user can cause, each with the exit code the CLI returns for it (sysexits-style).

Internal errors are not here: they keep their traceback.
"""

from __future__ import annotations


class CoveditError(Exception):
    """One clear sentence for the user; ``exit_code`` is what ``covedit`` exits with."""

    exit_code = 1


class UsageError(CoveditError):
    """A bad option value (layer out of range, token budget 0, bad --shard)."""

    exit_code = 2


class DataError(CoveditError):
    """Input that exists but is wrong: a malformed facts line, a corpus with no text, a damaged store."""

    exit_code = 65


class MissingInput(CoveditError):
    """Something named on the command line does not exist (model, corpus path, facts file, statistics)."""

    exit_code = 66


class MissingStatistics(MissingInput):
    """No complete statistics store for the edit's model and layers (C is needed).

    Carries what building them takes, for the command line's ``--build-stats`` (BatchEditConfig.build_missing_stats).
    """

    def __init__(self, message: str, *, model: str, model_id: str, layers: list[int], stats_dir):
        super().__init__(message)
        self.model = model  # what to pass to build-stats --model (the original model of a --base sequence)
        self.model_id = model_id
        self.layers = list(layers)
        self.stats_dir = stats_dir


class CannotWrite(CoveditError):
    """An output place that cannot be written (unwritable stats dir, existing output folder)."""

    exit_code = 73


class StoreConflict(CoveditError):
    """A statistics store at that path was built with a different cache key, or is locked by another run."""

    exit_code = 78


class Interrupted(CoveditError):
    """Stopped by a signal after a checkpoint: rerunning the same command resumes."""

    exit_code = 75


EXIT_CODES = {
    0: "done, or already cached",
    1: "internal error (traceback printed)",
    2: "usage: bad option value",
    65: "bad data (facts, corpus without text, damaged store, NaN in an update)",
    66: "missing input (model, corpus, facts file, statistics)",
    73: "cannot write output (stats dir, output folder)",
    75: "interrupted after a checkpoint: rerun to resume",
    78: "conflict: store built with another key, or locked by a live run",
}
