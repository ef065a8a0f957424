"""The edit history of a sequence of ``batch-edit --base`` runs, its guardrails, and taking any batch back off.

Every ``batch-edit`` output folder holds ``history/``:

    history/history.json             what happened, batch by batch (below)
    history/batch-0001.safetensors   that batch's delta (the delta.safetensors format of pipeline/delta.py)
    history/batch-0001.facts.jsonl   that batch's facts file, byte for byte
    ...

``batch-edit --base DIR`` checks DIR's history (every file against the sha256 history.json records, the
model's weights against the hashes it records), copies it forward and appends the new batch; ``revert``
takes batches off and marks them reverted; ``replay`` re-runs the applied batches on another model. Batch
N is the Nth batch applied in the sequence and keeps that number for good, reverted or not.

history.json::

    format_version
    origin         the model before the first batch: model, model_id, dtype, and for every layer the history
                   touches its weight hash and Frobenius norm (the reference of norm growth)
    weight_hashes  for every touched layer, the hash of the weights of the model in this folder
    batches        one record per batch: batch, status (applied | reverted), created, method, hparams, layers,
                   stats {path, key}, facts {file, sha256, source, format, n_facts}, delta {file, sha256, ranks},
                   weight_hashes {before, after}, update_norms, norm_growth (‖W_after‖/‖W_origin‖ per layer),
                   drift_from_origin (the unrelated prompts, this model against the origin), evaluation
                   (aggregates, drift against the model before the batch, fluency), reverted {time, output}

Updates add up, so taking batch N off is W − ΔW_N: exact in weight space up to float rounding, but the
batches after N were optimised on a model that contained N, so ``revert`` says so and re-evaluates.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from covedit.pipeline.delta import (Delta, LayerDelta, add_low_rank, layer_hashes, load_delta, save_delta,
                                    weight_hash, write_edited_model)
from covedit.pipeline.errors import CannotWrite, DataError, MissingInput, UsageError
from covedit.pipeline.evaluate import drift, next_token_logprobs
from covedit.pipeline.fileio import file_sha256

log = logging.getLogger(__name__)

HISTORY_DIR = "history"
HISTORY_FILE = "history.json"
FORMAT_VERSION = 1
# Every batch's keys so far, per edited layer ("layer.{L}.keys": (m, d_ff)), written beside an edited model so
# that the next batch-edit --base can keep them: AlphaEdit's C_prev, MEMIT's preserve_earlier.
CARRIED_KEYS = "carried_keys.safetensors"
OLD_CARRIED_KEYS = "alphaedit_keys.safetensors"  # the name before MEMIT carried keys too (AlphaEdit only)


def carried_keys_file(folder: Path) -> Path | None:
    """The carried keys beside the edited model in ``folder`` (under either name), or None."""
    for name in (CARRIED_KEYS, OLD_CARRIED_KEYS):
        if (folder / name).is_file():
            return folder / name
    return None


KEPT = "kept"  # the run label of --keep facts' keys: what the model knew, so no revert drops them


def read_carried_keys(path: Path, batch_numbers: bool = True) -> tuple[dict[int, torch.Tensor], dict[int, list[list]]]:
    """The carried keys per layer, and per layer where each run of its rows came from (``[[label, rows],
    ...]``, earliest first): a batch number (that batch's own keys), ``"kept"`` (a batch's --keep facts) or
    None (unknown: a file written before covedit recorded the runs). ``batch_numbers=False`` clears the batch
    numbers to None, for a --base without a history, whose numbers are not those of the history that starts."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        keys = {int(name.split(".")[1]): f.get_tensor(name) for name in f.keys()}
    try:
        runs = {int(k): [[b, int(n)] for b, n in v] for k, v in json.loads(meta.get("batches", "{}")).items()}
    except (ValueError, TypeError, AttributeError):  # damaged metadata: the rows stay, their origin unknown
        runs = {}
    for layer, k in keys.items():
        if sum(n for _, n in runs.get(layer, [])) != k.shape[0]:
            runs[layer] = [[None, k.shape[0]]]
    if not batch_numbers:
        runs = {layer: [[None if isinstance(label, int) else label, n] for label, n in r] for layer, r in runs.items()}
    return keys, runs


def carried_keys_with(keys: dict[int, torch.Tensor], runs: dict[int, list[list]],
                      *additions: tuple[object, dict[int, torch.Tensor]]):
    """The carried keys and runs with each ``(label, {layer: rows})`` appended as a run of its own (empty
    ones left out); layers no addition touches are carried on as they are."""
    keys, runs = dict(keys), {layer: list(r) for layer, r in runs.items()}
    for label, added in additions:
        for layer, k in added.items():
            if k is not None and len(k):
                keys[layer] = k if layer not in keys else torch.cat([keys[layer], k])
                runs[layer] = runs.get(layer, []) + [[label, int(k.shape[0])]]
    return keys, runs


def write_carried_keys(path: Path, keys: dict[int, torch.Tensor], runs: dict[int, list[list]]) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    save_file({f"layer.{k}.keys": v.contiguous() for k, v in keys.items()}, str(path),
              metadata={"batches": json.dumps({str(k): runs[k] for k in keys})})


def carried_keys_without(keys: dict[int, torch.Tensor], runs: dict[int, list[list]], numbers: list[int]):
    """The carried keys with batches ``numbers``' own rows taken out (what a revert leaves to protect; kept
    facts' rows stay), their runs, and whether that is exact: False if a reverted batch has no recorded run
    while rows of unknown origin remain (its keys may be among them)."""
    kept_keys, kept_runs = {}, {}
    for layer, k in keys.items():
        rows, start = [], 0
        kept_runs[layer] = []
        for label, n in runs[layer]:
            if label not in numbers:
                rows.append(k[start:start + n])
                kept_runs[layer].append([label, n])
            start += n
        kept_keys[layer] = torch.cat(rows) if rows else k[:0]
    recorded = {label for layer_runs in runs.values() for label, _ in layer_runs}
    exact = None not in recorded or all(n in recorded for n in numbers)
    return kept_keys, kept_runs, exact


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _stem(n: int) -> str:
    return f"batch-{n:04d}"


def _brief_drift(d: dict | None) -> dict | None:
    return None if d is None else {k: v for k, v in d.items() if k != "per_prompt"}


@dataclass
class History:
    """A history read from (or about to be written to) an output folder's ``history/``."""

    folder: Path | None  # the history/ folder it was read from; None for one not written yet
    data: dict

    @property
    def batches(self) -> list[dict]:
        return self.data["batches"]

    @property
    def dtype(self) -> str:
        return self.data["origin"]["dtype"]

    def record(self, n: int) -> dict:
        if not 1 <= n <= len(self.batches):
            raise UsageError(f"There is no batch {n}: this history has batches 1-{len(self.batches)}."
                             if self.batches else f"There is no batch {n}: this history is empty.")
        return self.batches[n - 1]

    def active(self) -> list[int]:
        """The batches whose updates the model in this folder holds."""
        return [r["batch"] for r in self.batches if r["status"] == "applied"]

    def delta(self, n: int) -> Delta:
        return load_delta(self.folder / self.record(n)["delta"]["file"])

    def facts_file(self, n: int) -> Path:
        return self.folder / self.record(n)["facts"]["file"]

    def file_names(self) -> list[str]:
        return [r[kind]["file"] for r in self.batches for kind in ("delta", "facts")]

    def write(self, folder: Path, new_files: dict[str, Path | Delta] | None = None) -> None:
        """Write this history into ``folder``: earlier batches' files copied from where it was read, then
        ``new_files`` (a name to a Delta to save or a file to copy), their sha256 filled in, then history.json."""
        folder.mkdir(parents=True, exist_ok=True)
        new_files = new_files or {}
        for name in self.file_names():
            if name in new_files:
                item = new_files[name]
                if isinstance(item, Delta):
                    save_delta(item, folder / name)
                else:
                    shutil.copyfile(item, folder / name)
            else:
                shutil.copyfile(self.folder / name, folder / name)
        for r in self.batches:
            for kind in ("delta", "facts"):
                if r[kind]["file"] in new_files:
                    r[kind]["sha256"] = file_sha256(folder / r[kind]["file"])
        (folder / HISTORY_FILE).write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")


def has_history(out_dir: Path | str) -> bool:
    return (Path(out_dir) / HISTORY_DIR / HISTORY_FILE).is_file()


def read_history(out_dir: Path | str) -> History:
    """The history of a batch-edit output folder, every file checked against its recorded sha256.

    MissingInput if the folder or its history is absent; DataError if history.json is unreadable or any
    file is missing or does not match its hash (nothing that reads a history then writes anything).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise MissingInput(f"{out_dir} does not exist or is not a folder.")
    folder = out_dir / HISTORY_DIR
    path = folder / HISTORY_FILE
    if not path.is_file():
        raise MissingInput(f"{out_dir} holds no {HISTORY_DIR}/{HISTORY_FILE}: it is not a batch-edit output folder, "
                           "or one written before covedit kept edit histories.")
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path} has history format version {data.get('format_version')!r}; this covedit "
                            f"reads version {FORMAT_VERSION}.")
        batches = data["batches"]
        data["origin"]["weight_hashes"], data["weight_hashes"]  # noqa: B018 (required keys)
        for i, r in enumerate(batches, 1):
            if r["batch"] != i or r["status"] not in ("applied", "reverted"):
                raise DataError(f"{path} is damaged: its batch {i} is numbered {r['batch']!r} with status "
                                f"{r['status']!r}.")
            names = [r["delta"]["file"], r["facts"]["file"]]
            if any(Path(n).name != n for n in names):
                raise DataError(f"{path} is damaged: batch {i} names files outside its folder.")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, OSError) as e:
        raise DataError(f"{path} is not a readable covedit history ({type(e).__name__}: {e}).") from e
    hist = History(folder, data)
    for r in hist.batches:
        for kind in ("delta", "facts"):
            file = folder / r[kind]["file"]
            if not file.is_file():
                raise DataError(f"{file} is missing, so the history of {out_dir} cannot be trusted.")
            if file_sha256(file) != r[kind]["sha256"]:
                raise DataError(f"{file} does not match the sha256 its history records (changed or damaged "
                                f"after it was written), so the history of {out_dir} cannot be trusted.")
    return hist


def check_weights(hist: History, loaded, where: Path | str) -> None:
    """DataError unless the model's weights are exactly those the history says the folder holds."""
    want = {int(k): v for k, v in hist.data["weight_hashes"].items()}
    if not want:
        return
    loaded.check_layers(sorted(want))
    now = layer_hashes(loaded, sorted(want))
    for layer, h in sorted(want.items()):
        if now[layer] != h:
            hint = (f"; load it with --dtype {hist.dtype}" if str(loaded.dtype).removeprefix("torch.") != hist.dtype
                    else "")
            raise DataError(f"The model in {where} does not hold the weights its history records (layer {layer} "
                            f"hashes to {now[layer][:12]}, not {h[:12]}{hint}).")



@contextlib.contextmanager
def weights_without(loaded, deltas: list[Delta]):
    """The model with ``deltas`` subtracted in memory (each sum in float64, as revert does), put back exactly
    afterwards: for measuring the origin model without a copy of it."""
    touched = sorted({ld.layer for d in deltas for ld in d.layers})
    saved = {layer: loaded.down_weight(layer).detach().clone() for layer in touched}
    try:
        for d in deltas:
            for ld in d.layers:
                add_low_rank(loaded.down_weight(ld.layer), ld.up, ld.down, -1.0)
        yield loaded
    finally:
        with torch.no_grad():
            for layer, W in saved.items():
                loaded.down_weight(layer).copy_(W)


def norm_growth(loaded, origin: dict, layers) -> dict[str, float]:
    """‖W‖_F / ‖W_origin‖_F for each layer, W the model's weight now."""
    return {str(layer): float(loaded.down_weight(layer).detach().double().norm()) / origin["weight_norms"][str(layer)]
            for layer in layers}


def limit_reasons(n: int, growth: dict[str, float], drift_origin: dict | None, max_drift: float | None,
                  max_norm_growth: float | None) -> list[str]:
    """One clause per sequence limit that batch ``n`` crosses (empty: none)."""
    reasons = []
    if max_norm_growth is not None and growth:
        worst = max(growth, key=growth.get)
        if growth[worst] > max_norm_growth:
            reasons.append(f"layer {worst}'s weight norm would be {growth[worst]:.4f} times the original model's "
                           f"(limit --max-norm-growth {max_norm_growth:g})")
    if max_drift is not None and drift_origin is not None and drift_origin["mean_kl"] > max_drift:
        reasons.append(f"the mean KL from the original model on {drift_origin['n_prompts']} unrelated prompts would "
                       f"be {drift_origin['mean_kl']:.4f} nats (limit --max-drift {max_drift:g})")
    return reasons


class Sequence:
    """The history that ``batch-edit`` writes: started before the edit (from ``--base``'s history, checked,
    or a new one), one batch added after it, written into the output folder with the model."""

    def __init__(self, past: History | None, data: dict):
        self.past = past
        self.data = data
        self.new_files: dict[str, Path | Delta] = {}

    @classmethod
    def start(cls, base: Path | None, loaded, layers: list[int], model: str, model_id: str, dtype: str) -> Sequence:
        """Check ``base``'s history against its files and weights (DataError), and record the origin of
        every layer this batch edits that no earlier batch touched (it still holds the origin's weights)."""
        past = None
        if base is not None and has_history(base):
            past = read_history(base)
            check_weights(past, loaded, base)
        elif base is not None:
            log.warning("--base %s has no %s/ (written before covedit kept histories): the history starts at it",
                        base, HISTORY_DIR)
        data = copy.deepcopy(past.data) if past else {
            "format_version": FORMAT_VERSION,
            "origin": {"model": model, "model_id": model_id, "dtype": dtype, "weight_hashes": {}, "weight_norms": {},
                       **({"note": f"the history starts at --base {base}, which had none"} if base else {})},
            "weight_hashes": {}, "batches": []}
        origin = data["origin"]
        for layer in layers:
            if str(layer) not in origin["weight_hashes"]:
                W = loaded.down_weight(layer).detach()
                origin["weight_hashes"][str(layer)] = weight_hash(W)
                origin["weight_norms"][str(layer)] = float(W.double().norm())
        return cls(past, data)

    def origin_next_tokens(self, loaded, delta: Delta, prompts: list[str], before=None):
        """The origin model's next-token distributions on ``prompts``: those measured before this batch if
        no earlier batch is applied, else measured with every applied batch and this one taken off in memory."""
        earlier = self.past.active() if self.past else []
        if not earlier and before is not None:
            return before
        with weights_without(loaded, [self.past.delta(n) for n in earlier] + [delta]):
            return next_token_logprobs(loaded, prompts)

    def add_batch(self, loaded, delta: Delta, *, facts_file: Path, fmt: str, method: str, hparams: dict,
                  stats: dict | None, evaluation: dict | None, before=None, after=None,
                  max_drift: float | None = None, max_norm_growth: float | None = None) -> dict:
        """Record the batch whose delta ``loaded`` now holds; DataError (nothing written) if it crosses
        ``max_drift`` (mean KL from the origin model, nats) or ``max_norm_growth`` (‖W‖/‖W_origin‖, any layer)."""
        n = len(self.data["batches"]) + 1
        layers = [ld.layer for ld in delta.layers]
        growth = norm_growth(loaded, self.data["origin"], layers)
        drift_origin = None
        if after is not None and after.next_tokens is not None:
            ref = self.origin_next_tokens(loaded, delta, after.next_tokens.prompts,
                                          before.next_tokens if before is not None else None)
            drift_origin = _brief_drift(drift(ref, after.next_tokens))
        reasons = limit_reasons(n, growth, drift_origin, max_drift, max_norm_growth)
        if reasons:
            raise DataError(f"Batch {n} of this sequence would cross its limits ({'; '.join(reasons)}), so nothing "
                            "was written.")
        stem = _stem(n)
        record = {
            "batch": n, "status": "applied", "created": _now(), "method": method, "hparams": hparams,
            "layers": layers, "stats": stats,
            "facts": {"file": f"{stem}.facts.jsonl", "sha256": None, "source": str(facts_file), "format": fmt,
                      "n_facts": delta.meta.get("n_facts")},
            "delta": {"file": f"{stem}.safetensors", "sha256": None,
                      "ranks": {str(ld.layer): ld.rank for ld in delta.layers}},
            "weight_hashes": {"before": {str(k): v for k, v in delta.base_hashes.items()},
                              "after": {str(k): v for k, v in delta.edited_hashes.items()}},
            "update_norms": {str(ld.layer): ld.norm() for ld in delta.layers},
            "norm_growth": growth, "drift_from_origin": drift_origin,
            "evaluation": None if evaluation is None else {
                "before": evaluation["before"], "after": evaluation["after"],
                "drift": _brief_drift(evaluation["drift"]),
                "fluency_ge": {w: (f or {}).get("ge") for w, f in (evaluation.get("fluency") or {}).items()}},
        }
        self.data["batches"].append(record)
        self.data["weight_hashes"].update({str(k): v for k, v in delta.edited_hashes.items()})
        self.new_files = {record["delta"]["file"]: delta, record["facts"]["file"]: Path(facts_file)}
        return record

    def summary(self) -> dict:
        """What the manifest says about the sequence: this batch's number, norm growth, drift from origin."""
        r = self.data["batches"][-1]
        return {"batch": r["batch"], "applied": [b["batch"] for b in self.data["batches"] if b["status"] == "applied"],
                "norm_growth": r["norm_growth"], "drift_from_origin": r["drift_from_origin"]}

    def write(self, folder: Path) -> None:
        """The ``extra_files`` writer for write_edited_model: the history/ folder inside the new output."""
        History(self.past.folder if self.past else None, self.data).write(folder, self.new_files)


# ------------------------------------------------------------------------------------------- revert

def parse_batches(text: str) -> list[int]:
    """'2', '1,3' or '1-3' -> sorted unique batch numbers."""
    out: set[int] = set()
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UsageError(f"--batch: cannot read {part!r}; use e.g. 2, 1,3 or 1-3.")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo or lo < 1:
            raise UsageError(f"--batch: {part!r} is not a range of batch numbers (they start at 1).")
        out.update(range(lo, hi + 1))
    return sorted(out)


def check_output(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """CannotWrite before anything is loaded: a non-empty output without --overwrite, or the input itself."""
    out = Path(out)
    if source is not None and out.resolve() == Path(source).resolve():
        raise CannotWrite(f"Output {out} is the input folder; choose another folder.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CannotWrite(f"Output folder {out} exists and is not empty: choose another --output or pass --overwrite.")


@dataclass
class RevertResult:
    reverted: list[int]
    later: list[int]  # applied batches after the first reverted one: optimised on a model that held it
    output: Path
    per_batch: list[dict] = field(default_factory=list)  # facts of every batch, evaluated on the new model
    drift_from_origin: dict | None = None
    evaluated: bool = False


def revert_batches(folder: Path | str, numbers: list[int], output: Path | str, *, device: str = "cpu",
                   evaluate: bool = True, overwrite: bool = False) -> RevertResult:
    """Write ``folder``'s model without batches ``numbers`` (W − Σ ΔW_N) and its history with them marked
    reverted; with ``evaluate`` score every batch's facts on the result.

    Refuses (nothing written) a history whose files do not match their hashes, a model that does not hold
    the weights its history records, a batch that does not exist or is already reverted.
    """
    from covedit.pipeline.models import load_model  # noqa: PLC0415

    folder, output = Path(folder), Path(output)
    hist = read_history(folder)
    if not numbers:
        raise UsageError("--batch names no batch to revert.")
    for n in numbers:
        if hist.record(n)["status"] == "reverted":
            raise UsageError(f"Batch {n} of {folder} is already reverted.")
    check_output(output, overwrite, folder)
    deltas = {n: hist.delta(n) for n in numbers}
    loaded = load_model(str(folder), hist.dtype, device)
    check_weights(hist, loaded, folder)
    touched = sorted({ld.layer for d in deltas.values() for ld in d.layers})
    before_hashes = layer_hashes(loaded, touched)
    for d in deltas.values():
        for ld in d.layers:
            add_low_rank(loaded.down_weight(ld.layer), ld.up, ld.down, -1.0)
    after_hashes = layer_hashes(loaded, touched)
    # The written delta is this revert itself: −ΔW of every reverted batch per layer, from the folder's
    # weights to the new ones, so apply-delta / revert-delta work on it like on any other.
    parts: dict[int, list[LayerDelta]] = {}
    for d in deltas.values():
        for ld in d.layers:
            parts.setdefault(ld.layer, []).append(ld)
    layers = [LayerDelta(layer, ps[0].module, torch.cat([-p.up for p in ps], 1), torch.cat([p.down for p in ps], 0))
              for layer, ps in sorted(parts.items())]
    meta = {"method": "revert", "reverted_batches": numbers, "from": str(folder)}
    delta = Delta(layers, loaded.model_id, before_hashes, after_hashes, meta)

    data = copy.deepcopy(hist.data)
    for n in numbers:
        data["batches"][n - 1]["status"] = "reverted"
        data["batches"][n - 1]["reverted"] = {"time": _now(), "output": str(output)}
    data["weight_hashes"].update({str(k): v for k, v in after_hashes.items()})
    new = History(hist.folder, data)
    still = new.active()
    result = RevertResult(numbers, [m for m in still if m > min(numbers)], output)

    if evaluate:
        from covedit.pipeline.evaluate import aggregate, evaluate_model  # noqa: PLC0415
        from covedit.pipeline.facts import read_facts  # noqa: PLC0415

        per = [(r, read_facts(new.facts_file(r["batch"]), r["facts"]["format"], loaded.tokenizer))
               for r in new.batches]
        ev = evaluate_model(loaded, [f for _, facts in per for f in facts])
        start = 0
        for r, facts in per:
            rows = ev.per_fact[start:start + len(facts)]
            start += len(facts)
            result.per_batch.append({"batch": r["batch"], "status": r["status"], "n_facts": len(facts),
                                     "when_edited": (r.get("evaluation") or {}).get("after"), "now": aggregate(rows)})
        with weights_without(loaded, [new.delta(m) for m in still]):
            origin = next_token_logprobs(loaded, ev.next_tokens.prompts)
        result.drift_from_origin = _brief_drift(drift(origin, ev.next_tokens))
        result.evaluated = True

    manifest = {"command": "revert", "from": str(folder), "reverted_batches": numbers, "later_batches": result.later,
                "applied_batches": still, "original_model": data["origin"]["model"],
                "original_model_id": data["origin"]["model_id"], "model": loaded.model_id,
                "original_weight_hashes": before_hashes, "edited_weight_hashes": after_hashes,
                "evaluation": {"per_batch": result.per_batch, "drift_from_origin": result.drift_from_origin}
                if evaluate else None}
    extra = {HISTORY_DIR: lambda path: new.write(path)}
    keys_file = carried_keys_file(folder)
    if keys_file is not None:  # later batches protect what is still applied, not what was reverted
        keys, runs, exact = carried_keys_without(*read_carried_keys(keys_file), numbers)
        if not exact:
            log.warning("%s holds keys of unknown origin (written before covedit recorded which batch each key "
                        "came from): the reverted batches' keys may still be in it, and later batches keep "
                        "protecting them", keys_file.name)
        extra[CARRIED_KEYS] = lambda path: write_carried_keys(path, keys, runs)
    write_edited_model(loaded, output, delta, manifest, overwrite=overwrite, extra_files=extra)
    return result


# ------------------------------------------------------------------------------------------- replay

def replay(folder: Path | str, model: str, output: Path | str, *, overwrite: bool = False, **config) -> list:
    """Re-run ``folder``'s applied batches, in order, with their recorded facts, method and hyperparameters,
    on ``model`` (its own statistics) and write the result, with a new history, at ``output``.

    Each batch is one ``run_batch_edit`` with ``--base`` the batch before; those intermediate outputs live
    in a temporary folder next to ``output`` and are removed, so ``output`` appears only if every batch
    worked. ``config`` is passed to every BatchEditConfig (dtype, device, stats_dir, evaluate, limits, ...).
    Returns the BatchEditResult of each batch.
    """
    from covedit.pipeline.batch_edit import BatchEditConfig, run_batch_edit  # noqa: PLC0415 (it imports this module)

    folder, output = Path(folder), Path(output)
    hist = read_history(folder)
    numbers = hist.active()
    if not numbers:
        raise UsageError(f"{folder} holds no applied batch to replay (every batch is reverted).")
    check_output(output, overwrite, folder)
    try:
        output.resolve().parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=output.resolve().parent, prefix=f".{output.name}.replay-"))
    except OSError as e:
        raise CannotWrite(f"Cannot write the replay next to {output}: {e.strerror or e}.") from e
    results, base = [], None
    try:
        for i, n in enumerate(numbers):
            r = hist.record(n)
            hp_file = work / f"hparams-{n}.json"
            hp_file.write_text(json.dumps(r["hparams"]))
            last = i == len(numbers) - 1
            out = output if last else work / _stem(n)
            log.info("replaying batch %d of %s (%d facts, %s) on %s", n, folder, r["facts"]["n_facts"] or 0,
                     r["method"], model)
            results.append(run_batch_edit(BatchEditConfig(
                facts=hist.facts_file(n), output=out, method=r["method"], fmt=r["facts"]["format"], model=model,
                base=base, hparams_file=str(hp_file), overwrite=overwrite and last, **config)))
            base = out
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results
