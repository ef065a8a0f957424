"""``batch-edit``: facts file in, edited model + revertible delta + manifest out.

Order matters and is the point of this file: everything that can fail on the user's input (facts,
hyperparameters, output folder, statistics) is checked before anything is computed, the edit runs on an
in-memory copy, NaN/Inf abort before anything is written, and the output appears atomically.

Sequential editing: ``--base previous-output/`` loads the edited model of an earlier run, keeps using the
statistics of the original model, and (for AlphaEdit) carries the keys of all earlier batches forward.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from covedit.pipeline import hparams as hparams_mod
from covedit.pipeline.delta import make_and_apply_delta, write_edited_model
from covedit.pipeline.edit import key_weights_for, templates_for
from covedit.pipeline.memit import alphaedit_projectors, fact_keys, protected_rows, run_memit
from covedit.pipeline.rome import run_rome
from covedit.pipeline.errors import CannotWrite, DataError, MissingInput, MissingStatistics, UsageError
from covedit.pipeline.evaluate import drift, evaluate_model
from covedit.pipeline.facts import facts_sha256, read_facts
from covedit.pipeline.history import (CARRIED_KEYS, HISTORY_DIR, KEPT, Sequence, carried_keys_file,
                                      carried_keys_with, read_carried_keys, write_carried_keys)
from covedit.pipeline.models import load_model
from covedit.pipeline.targets import TargetResult
from covedit.stats.store import StatsStore, default_stats_dir, find_store

log = logging.getLogger(__name__)


@dataclass
class BatchEditConfig:
    facts: Path
    output: Path
    method: str = "memit"
    covariance: str | None = None  # None: the method's hyperparameter (C), or "identity"
    fmt: str = "auto"
    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None  # "auto" etc.: spread the model over GPUs (accelerate), instead of device
    module_template: str | None = None
    hparams_file: str | None = None
    overrides: list[str] = field(default_factory=list)
    stats_dir: Path | None = None
    stats: Path | None = None  # an explicit store
    base: Path | None = None
    # Facts whose outputs the edit must leave alone (e.g. `probe --write-known`): their keys join the earlier
    # batches' in the preservation term (MEMIT) or C_prev (AlphaEdit), and are carried to later batches.
    keep: Path | None = None
    overwrite: bool = False
    evaluate: bool = True
    generation: bool = True  # the generation family (greedy answers, chat) in the evaluation; off: teacher-forced only
    # Where the unedited model's fact-independent evaluation (unrelated prompts, fluency) is kept between
    # runs (evaluate.evaluate_model's reference_cache); None measures it every time.
    reference_cache: Path | None = None
    force: bool = False  # write the model even when the evaluation says the edit broke it
    # Sequence limits (pipeline/history.py): refuse a batch whose model is further than this from the
    # original model (mean KL on the unrelated prompts, nats) or whose edited weights' norm grows past this
    # multiple of the original's; --force does not override them.
    max_drift: float | None = None
    max_norm_growth: float | None = None
    targets: TargetResult | None = None  # precomputed targets of these facts (benchmarks share them); None: optimise
    # Called with the MissingStatistics about to be raised, to build them (the command line's --build-stats:
    # the edit stage itself only reads statistics); the store is then looked up once more.
    build_missing_stats: Callable[[MissingStatistics], None] | None = None


@dataclass(frozen=True)
class EditTimings:
    """Wall seconds of one batch-edit run. ``edit_s`` is the edit itself (``targets_s`` optimising target
    vectors, ``solve_s`` keys, residuals and solves); ``eval_s`` the before and after evaluations."""
    edit_s: float
    targets_s: float
    solve_s: float
    eval_s: float
    total_s: float


@dataclass(frozen=True)
class BatchEditResult:
    """What ``run_batch_edit`` did. The fields are what callers read; ``manifest`` is the same run as the
    JSON document written beside the model (manifest.json), which reports and later runs read back."""
    method: str
    n_facts: int
    layers: list[int]
    output: Path
    timings: EditTimings
    targets: dict  # per fact: nll_before, nll_after, steps (ROME: per edit); MEMIT: realised, merged
    evaluation: dict | None  # before/after aggregates, drift, fluency, per fact; None with --no-eval
    broken: list[str]  # the breakage thresholds the edit crossed (written anyway only with --force)
    manifest: dict

    @property
    def forced(self) -> bool:
        """Written although broken (only --force gets a broken edit this far)."""
        return bool(self.broken)

    @property
    def seconds_per_fact(self) -> float:
        return self.timings.edit_s / max(1, self.n_facts)


def _check_output(cfg: BatchEditConfig) -> None:
    out = cfg.output
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise CannotWrite(f"Output folder {out} exists and is not empty: choose another --output or pass --overwrite.")
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CannotWrite(f"Cannot create {out}: {probe} is not a folder.")


def _base_manifest(base: Path) -> dict:
    path = base / "manifest.json"
    if not path.exists():
        raise MissingInput(f"--base {base} holds no manifest.json: it is not a covedit output folder.")
    return json.loads(path.read_text())


def stats_command(model: str, layers: list[int]) -> str:
    return f"covedit build-stats --model {model} --layers {','.join(map(str, layers))}"


def load_covariances(cfg: BatchEditConfig, model_id: str, module: str, layers: list[int], model_arg: str
                     ) -> tuple[dict[int, torch.Tensor], dict]:
    """C = sum / count per layer from a complete store; MissingStatistics naming the command if none.

    The edit stage only reads statistics: building missing ones (``--build-stats``) is the command line's
    job, handed in as ``cfg.build_missing_stats``.
    """
    stats_dir = cfg.stats_dir or default_stats_dir()
    if cfg.stats is not None:
        store = StatsStore.open(cfg.stats)
        if store.key.get("model_id") != model_id:
            raise UsageError(f"--stats {cfg.stats} was built for {store.key.get('model_id')}, not {model_id}.")
    else:
        match = {"model_id": model_id, "module": module}
        store = find_store(stats_dir, match, layers)
        if store is None:
            missing = MissingStatistics(f"No statistics for {model_id} layers {layers} in {stats_dir}: run "
                                        f"`{stats_command(model_arg, layers)}` first, or pass --build-stats.",
                                        model=model_arg, model_id=model_id, layers=layers, stats_dir=stats_dir)
            if cfg.build_missing_stats is None:
                raise missing
            cfg.build_missing_stats(missing)
            store = find_store(stats_dir, match, layers)
            if store is None:
                raise missing
    missing = [layer for layer in layers if layer not in store.layers]
    if missing:
        raise UsageError(f"The statistics store {store.path} has no layers {missing}.")
    covs = {layer: torch.from_numpy(store.covariance(layer)) for layer in layers}
    return covs, {"path": str(store.path), "key": store.key}


def _evaluation_summary(before, after) -> dict:
    """Both metric families per fact and in aggregate, drift on the unrelated prompts, fluency (GE)."""
    return {"before": before.aggregate, "after": after.aggregate,
            "reference_cached": bool(before.extra.get("reference_cached")),
            "drift": drift(before.next_tokens, after.next_tokens),
            "fluency": {"before": before.fluency, "after": after.fluency},
            "per_fact": [{"id": b["id"], "before": b, "after": a} for b, a in zip(before.per_fact, after.per_fact)]}


# An edit that crosses any of these broke the model rather than edited it; batch-edit refuses to write it
# unless --force. MEMIT at 1,000 zsRE facts on SmolLM2 drifts 0.17 nats, changes 12 % of top-1 tokens and
# keeps GE; the Gemma-3 edit before post-MLP norms were handled drifted 7.4 nats, changed 90 %, GE −28 %.
BROKEN_MEAN_KL = 1.0  # nats, mean over the unrelated prompts
BROKEN_TOP1_CHANGED_PCT = 50.0  # unrelated prompts whose most likely next token changed
BROKEN_GE_DROP_PCT = 20.0  # fall of the fluency (GE) of greedy generations


def broken_model_reasons(evaluation: dict) -> list[str]:
    """What says the edited model is broken, one clause per threshold crossed (empty: it is not)."""
    d, flu = evaluation["drift"], evaluation["fluency"]
    reasons = []
    if d["mean_kl"] > BROKEN_MEAN_KL:
        reasons.append(f"mean KL on {d['n_prompts']} unrelated prompts {d['mean_kl']:.2f} nats (limit {BROKEN_MEAN_KL:g})")
    if d["top1_changed_pct"] > BROKEN_TOP1_CHANGED_PCT:
        reasons.append(f"{d['top1_changed_pct']:.0f} % of their top-1 tokens changed (limit {BROKEN_TOP1_CHANGED_PCT:g} %)")
    if flu.get("before") and flu.get("after"):
        drop = 100 * (1 - flu["after"]["ge"] / flu["before"]["ge"])
        if drop > BROKEN_GE_DROP_PCT:
            reasons.append(f"fluency GE fell {drop:.0f} % ({flu['before']['ge']:.0f} -> {flu['after']['ge']:.0f}; "
                           f"limit {BROKEN_GE_DROP_PCT:g} %)")
    return reasons


def run_batch_edit(cfg: BatchEditConfig) -> BatchEditResult:
    """The whole edit stage: checks, edit, evaluation, the written output folder."""
    clock = time.perf_counter
    t_start = clock()
    if not cfg.facts.exists():
        raise MissingInput(f"Facts file {cfg.facts} does not exist.")
    if cfg.keep is not None:
        if cfg.method == "rome":
            raise UsageError("--keep needs memit or alphaedit: ROME edits one fact at a time with no term for keys "
                             "to keep.")
        if not cfg.keep.is_file():
            raise MissingInput(f"Facts file to keep {cfg.keep} does not exist.")
    _check_output(cfg)
    base_manifest = _base_manifest(cfg.base) if cfg.base else None
    loaded = load_model(str(cfg.base) if cfg.base else cfg.model, cfg.dtype, cfg.device, cfg.module_template,
                        device_map=cfg.device_map)
    original_model_id = base_manifest["original_model_id"] if base_manifest else loaded.model_id
    model_arg = base_manifest["original_model"] if base_manifest else cfg.model
    facts = read_facts(cfg.facts, cfg.fmt, loaded.tokenizer)
    keep_facts = read_facts(cfg.keep, "auto", loaded.tokenizer) if cfg.keep else []
    hp = hparams_mod.load_hparams(cfg.method, loaded.model.config.model_type, loaded.num_layers,
                                  cfg.hparams_file, list(cfg.overrides))
    if cfg.covariance is not None:
        if cfg.method == "alphaedit":
            raise UsageError("--covariance does not apply to alphaedit, which needs C for its null space.")
        hp.covariance = cfg.covariance
    layers = [hp.layer] if cfg.method == "rome" else list(hp.layers)
    loaded.check_layers(layers)
    if cfg.max_drift is not None and not cfg.evaluate:
        raise UsageError("--max-drift needs the evaluation (drift is measured there): drop --no-eval.")
    sequence = Sequence.start(cfg.base, loaded, layers, model_arg, original_model_id, cfg.dtype)
    use_c = cfg.method == "alphaedit" or hp.covariance == "C"
    covs, stats_info = (load_covariances(cfg, original_model_id, loaded.arch.template(), layers, model_arg)
                        if use_c else (None, None))
    # Keys of the sequence's earlier batches: AlphaEdit's C_prev, MEMIT's preserve_earlier term.
    carries = cfg.method == "alphaedit" or (cfg.method == "memit" and hp.preserve_earlier > 0) or bool(keep_facts)
    keys_file = carried_keys_file(cfg.base) if cfg.base and carries else None
    prev_keys, prev_runs = (read_carried_keys(keys_file, batch_numbers=sequence.past is not None) if keys_file
                            else ({}, {}))

    t_before = clock()
    before = (evaluate_model(loaded, facts, reference_cache=cfg.reference_cache, generation=cfg.generation)
              if cfg.evaluate else None)
    t_eval = clock() - t_before
    originals = {layer: loaded.down_weight(layer).detach().clone() for layer in layers}
    templates = templates_for(loaded, hp)
    # --keep: the kept facts' keys on the model as it is before this batch (taken as the edit's own keys are),
    # weight 1, a new key's own. With the earlier batches' keys (MEMIT: weight preserve_earlier) they make
    # the term of keys whose outputs this solve must leave alone.
    keep_keys: dict[int, torch.Tensor] = {}
    if keep_facts:  # (never with ROME: refused above)
        keep_keys = {layer: fact_keys(loaded, layer, keep_facts, templates, hp.keys_from,
                                      key_weights_for(loaded, hp)).float().cpu() for layer in layers}
    earlier = hp.preserve_earlier if cfg.method == "memit" else 1.0  # AlphaEdit's C_prev has no weight
    protect = protected_rows((prev_keys, earlier), (keep_keys, 1.0))
    t0 = clock()
    if cfg.method == "rome":
        outcome = run_rome(loaded, facts, hp.layer, covs[hp.layer] if covs else None, hp.target, templates, clock,
                           targets=cfg.targets)
    elif cfg.method == "memit":
        outcome = run_memit(loaded, facts, layers, covs, hp.lam, hp.target, templates, clock, targets=cfg.targets,
                            keys_from=hp.keys_from, key_weights=key_weights_for(loaded, hp),
                            preserve_prompts=hp.preserve_prompts, preserve_relation=hp.preserve_relation,
                            relation_subjects=hp.relation_subjects, protected_keys=protect)
    else:
        projectors = alphaedit_projectors(covs, hp.null_space_threshold, hp.null_space_energy)
        outcome = run_memit(loaded, facts, layers, covs, 0.0, hp.target, templates, clock,
                            alphaedit={"P": projectors, "prev_keys": protect, "alpha": hp.alpha, "lam": hp.lam},
                            targets=cfg.targets,
                            keys_from=hp.keys_from, key_weights=key_weights_for(loaded, hp))
    edit_seconds = clock() - t0
    # Put the weights back and apply the delta exactly as `apply-delta` would, so the written model, the
    # delta and its hashes agree bit for bit (the in-loop sums differ from it only in rounding).
    with torch.no_grad():
        for layer, W in originals.items():
            loaded.down_weight(layer).copy_(W)
    meta = {"method": cfg.method, "facts_sha256": facts_sha256(cfg.facts), "n_facts": len(facts)}
    delta = make_and_apply_delta(loaded, outcome.factors, meta)
    t1 = clock()
    after = evaluate_model(loaded, facts, generation=cfg.generation) if cfg.evaluate else None
    eval_seconds = t_eval + (clock() - t1)
    evaluation = _evaluation_summary(before, after) if cfg.evaluate else None
    broken = broken_model_reasons(evaluation) if evaluation else []
    if broken and not cfg.force:
        raise DataError(f"The edit broke the model ({'; '.join(broken)}), so nothing was written; pass --force to "
                        "write it anyway, or try fewer facts, a larger λ or other layers.")
    if broken:
        log.warning("writing a model the evaluation says is broken (--force): %s", "; ".join(broken))
    sequence.add_batch(loaded, delta, facts_file=cfg.facts, fmt=cfg.fmt, method=cfg.method,
                       hparams=hparams_mod.to_dict(hp), stats=stats_info, evaluation=evaluation, before=before,
                       after=after, max_drift=cfg.max_drift, max_norm_growth=cfg.max_norm_growth)
    if not cfg.evaluate:
        log.warning("--no-eval: nothing checked that the edited model still works (drift, fluency)")

    timings = EditTimings(edit_s=edit_seconds, targets_s=outcome.timings.get("targets_s", 0.0),
                          solve_s=outcome.timings.get("solve_s", 0.0), eval_s=eval_seconds, total_s=clock() - t_start)
    targets_info = {**outcome.target_info, "precomputed": cfg.targets is not None}
    summary = {
        "method": cfg.method, "facts_file": str(cfg.facts), "facts_sha256": meta["facts_sha256"], "n_facts": len(facts),
        "model": loaded.model_id, "original_model": model_arg, "original_model_id": original_model_id,
        "base": str(cfg.base) if cfg.base else None, "hparams": hparams_mod.to_dict(hp), "stats": stats_info,
        "layers": layers, "layer_devices": {str(layer): str(loaded.layer_device(layer)) for layer in layers},
        "original_weight_hashes": delta.base_hashes, "edited_weight_hashes": delta.edited_hashes,
        "timings": {**dataclasses.asdict(timings), "seconds_per_fact": edit_seconds / max(1, len(facts))},
        "targets": targets_info,
        "evaluation": evaluation,
        "checked": {"broken": broken, "forced": bool(broken and cfg.force)} if cfg.evaluate else None,
        "update_norms": {str(ld.layer): ld.norm() for ld in delta.layers},
        "history": sequence.summary(),
    }
    extra = {}
    if carries:  # after every earlier batch's runs: this batch's kept facts' keys, then its own keys
        carried, runs = carried_keys_with(prev_keys, prev_runs, (KEPT, keep_keys),
                                          (sequence.summary()["batch"], outcome.keys))
        extra[CARRIED_KEYS] = lambda path: write_carried_keys(path, carried, runs)
        summary["carried_keys"] = {str(k): int(v.shape[0]) for k, v in carried.items()}
    if keep_facts:
        summary["kept_facts"] = {"file": str(cfg.keep), "n_facts": len(keep_facts), "sha256": facts_sha256(cfg.keep)}
    write_edited_model(loaded, cfg.output, delta, summary, overwrite=cfg.overwrite,
                       extra_files=extra | {HISTORY_DIR: sequence.write})
    return BatchEditResult(method=cfg.method, n_facts=len(facts), layers=layers, output=cfg.output, timings=timings,
                           targets=targets_info, evaluation=evaluation, broken=broken, manifest=summary)
