"""What the benchmarks share: zsRE facts from the sample, writing them as our JSONL, and a per-fact cache of
target vectors so that studies which compare update rules on the same facts optimise each target once.

Why a per-fact cache is sound: a fact's δ does not depend on the other facts of its batch (the loss is a
sum over facts and Adam is element-wise; pipeline.targets proves it and tests it to 1e-4), except that
facts with one subject and one new target share a δ (merged). So a fact's entry is keyed by its whole
group within the facts asked for (subject, target and every prompt of the group), and the targets of the
first 10 facts are those of the first 100 wherever their groups are the same. The file's key holds
everything else that determines a target: the model's id, the layer, the target hyperparameters, the
context templates and the version of the optimisation's rules (``RULES``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from covedit.pipeline.edit import templates_for
from covedit.pipeline.facts import from_zsre
from covedit.pipeline.hparams import load_hparams
from covedit.pipeline.models import load_model
from covedit.pipeline.targets import TargetResult, compute_targets, fact_groups

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "zsre_eval_sample.jsonl"
DEFAULT_CACHE = Path.home() / ".cache" / "covedit" / "bench-targets"
# Bumped when compute_targets' loss or stopping rule changes (2: KL at the subject's last token, early stop on
# the whole loss, merged facts; 3: a merged fact's scale is the mean over its facts), so that no target of
# older rules is read back.
RULES = 3
# Target options added after caches were written, with the value that is the rule those caches hold: at that
# value they stay out of the cache key, so the old targets are read back.
ADDED_RULES = {"stop_when_top1": False, "first_step": 0.0}


def zsre_facts(path: Path, n: int | None, skip: int = 0) -> list:
    """zsRE records with distinct (subject, question), in file order: the n after the first ``skip`` (all of
    them if n is None)."""
    facts, seen = [], set()
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        fact = from_zsre(json.loads(line), line_no)
        key = (fact.subject, fact.prompt)
        if key in seen:
            continue
        seen.add(key)
        facts.append(fact)
        if n is not None and len(facts) == skip + n:
            return facts[skip:]
    if n is None:
        return facts[skip:]
    raise SystemExit(f"{path} has only {len(facts)} distinct facts, {skip + n} asked for")


def fact_slice(path: Path, n: int, heldout_after: int) -> list:
    """The first n facts (the tuning slice), or, held out, n facts after the first ``heldout_after`` whose
    subjects are none of theirs: defaults are chosen on the first kind and reported on the second."""
    if not heldout_after:
        return zsre_facts(path, n)
    tuning_subjects = {f.subject for f in zsre_facts(path, heldout_after)}
    out = [f for f in zsre_facts(path, None, skip=heldout_after) if f.subject not in tuning_subjects][:n]
    if len(out) < n:
        raise SystemExit(f"{path} has only {len(out)} facts after the first {heldout_after} with other subjects")
    return out


def target_summary(targets: TargetResult) -> dict:
    """How the targets went, as the sweeps record it: updates per fact, the NLL they end at, and how far δ
    went against the block output it is added to (‖z − h‖ / ‖h‖; the clamp is the factor times ‖h‖)."""
    ratio = targets.delta.norm(dim=1) / targets.h.norm(dim=1)
    return {"target_updates_mean": float(targets.steps_taken.float().mean()),
            "target_nll_after_mean": float(targets.nll_after.mean()),
            "target_nll_after_median": float(targets.nll_after.median()),
            "target_delta_over_h_mean": float(ratio.mean()), "target_delta_over_h_median": float(ratio.median())}


def add_slice_arguments(ap, facts: int) -> None:
    """The arguments every zsRE benchmark takes: --model, --data, --facts (default ``facts``), --heldout-after."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--facts", type=int, default=facts)
    ap.add_argument("--heldout-after", type=int, default=0,
                    help="take held-out facts after this many tuning facts (0: the tuning slice itself)")


def add_override_argument(ap) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: hyperparameter overrides for load_hparams."""
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="hyperparameter override, repeatable, e.g. lam=5000 or target.clamp_norm_factor=4 "
                         "(targets are cached per setting)")


def fluency_fields(evaluation) -> dict:
    """An evaluation's fluency as the sweeps record it: the GE and the generations it scored (None without)."""
    fluency = evaluation.fluency or {}
    return {"fluency_ge": fluency.get("ge"), "fluency_generations": fluency.get("generations")}


def write_facts(facts: list, path: Path) -> None:
    with open(path, "w") as f:
        for fact in facts:
            d = dataclasses.asdict(fact)
            d.pop("line")
            d["neighborhood"] = [dict(n) for n in d["neighborhood"]]
            f.write(json.dumps(d) + "\n")


def _fact_keys(facts: list) -> list[str]:
    """Each fact's cache key: its own prompt and the prompts of the facts it is merged with."""
    keys = [""] * len(facts)
    for group in fact_groups(facts):
        prompts = sorted(facts[i].prompt for i in group)
        for i in group:
            merged = [prompts] if len(group) > 1 else []
            keys[i] = json.dumps([facts[i].subject, facts[i].prompt, facts[i].target_new] + merged)
    return keys


class TargetCache:
    """Targets of single facts on disk for one (model, layer, hyperparameters, templates)."""

    def __init__(self, loaded, layer: int, target_hp, templates: list[str], folder: Path = DEFAULT_CACHE) -> None:
        self.loaded, self.layer, self.hp, self.templates = loaded, layer, target_hp, templates
        hp = dataclasses.asdict(target_hp)
        for name, off in ADDED_RULES.items():  # a rule added later enters the key only when it is on
            if hp.get(name) == off:
                del hp[name]
        key = json.dumps({"model": loaded.model_id, "layer": layer, "hp": hp,
                          "templates": templates, "rules": RULES}, sort_keys=True)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"targets-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        self.entries: dict[str, dict] = torch.load(self.path) if self.path.exists() else {}

    def put(self, facts: list, result: TargetResult, seconds: float | None = None) -> None:
        """Store the targets of ``facts``; ``seconds`` (the wall time of their batch) is kept per fact as a share."""
        for i, key in enumerate(_fact_keys(facts)):
            one = result.select([i])
            entry = {f: getattr(one, f).cpu() for f in ("z", "h", "nll_before", "nll_after", "steps_taken")}
            entry["seconds"] = None if seconds is None else seconds / len(facts)
            self.entries[key] = entry
        # Several benchmarks may fill one cache at once: under a lock, merge with what is on disk now, so
        # that no process's save drops the entries another one stored since it started.
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                self.entries = {**torch.load(self.path), **self.entries}
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            torch.save(self.entries, tmp)
            tmp.replace(self.path)

    def missing(self, facts: list) -> list:
        return [f for f, key in zip(facts, _fact_keys(facts)) if key not in self.entries]

    def fill(self, facts: list, save_every: int = 50, progress=None) -> None:
        """Optimise the missing targets about ``save_every`` facts at a time (whole merged groups), saving after
        each batch, so a killed run resumes where it stopped (batching does not change a target)."""
        keys = _fact_keys(facts)
        groups = [[facts[i] for i in g] for g in fact_groups(facts) if keys[g[0]] not in self.entries]
        done, total = 0, sum(map(len, groups))
        while groups:
            part: list = []
            while groups and (not part or len(part) + len(groups[0]) <= save_every):
                part += groups.pop(0)
            t = time.perf_counter()
            result = compute_targets(self.loaded, part, self.layer, self.hp, self.templates)
            self.put(part, result, time.perf_counter() - t)
            done += len(part)
            if progress:
                progress(done, total)

    def untimed(self, facts: list) -> list:
        """The facts (keyed within ``facts``, as ``get`` keys them) that are cached without a time."""
        return [f for f, key in zip(facts, _fact_keys(facts)) if key in self.entries
                and self.entries[key].get("seconds") is None]

    def seconds(self, facts: list) -> float | None:
        """Measured optimisation time of ``facts`` (None if any was stored without a time)."""
        times = [self.entries[key].get("seconds") for key in _fact_keys(facts)]
        return None if any(t is None for t in times) else float(sum(times))

    def get(self, facts: list) -> TargetResult:
        """Targets of ``facts`` in order; the missing ones are optimised first and stored."""
        self.fill(facts)
        fields = ("z", "h", "nll_before", "nll_after", "steps_taken")
        return TargetResult.concat([TargetResult(**{f: self.entries[key][f] for f in fields})
                                    for key in _fact_keys(facts)])


def covariances(loaded, layers: list[int]) -> dict[int, torch.Tensor]:
    """C of each layer from the largest complete statistics store of this model in the default folder."""
    from covedit.stats.store import default_stats_dir, find_store
    store = find_store(default_stats_dir(), {"model_id": loaded.model_id, "module": loaded.arch.template()}, layers)
    if store is None:
        raise SystemExit(f"no statistics for layers {layers}: run `covedit build-stats --model {loaded.model_id}`")
    return {layer: torch.from_numpy(store.covariance(layer)) for layer in layers}


def keep_weights(loaded, layers: list[int]):
    """Copy the down-projections of ``layers`` as they are now; return a function that puts them back, for
    benchmarks that edit one model several times from the same start."""
    originals = {layer: loaded.down_weight(layer).detach().clone() for layer in layers}

    def restore() -> None:
        with torch.no_grad():
            for layer, W in originals.items():
                loaded.down_weight(layer).copy_(W)
    return restore


def memit_variants(loaded, hp, facts: list, targets: TargetResult, covs: dict, grid: list[tuple[float, float]],
                   before, with_fluency: bool):
    """For each (λ, μ) of ``grid``: MEMIT with ``preserve_prompts`` μ; see ``edit_variants``."""
    variants = [(f"{lam:g}" if mu == 0 else f"{lam:g} μ {mu:g}", {"lam": lam, "preserve_prompts": mu}) for lam, mu in grid]
    yield from edit_variants(loaded, hp, facts, targets, covs, variants, before, with_fluency)


def edit_variants(loaded, hp, facts: list, targets: TargetResult, covs: dict, variants: list[tuple[str, dict]],
                  before, with_fluency: bool, generation: bool = False):
    """For each (label, keyword arguments of ``run_memit``: ``lam``, ``preserve_prompts``, ``preserve_relation``,
    ``relation_subjects``, ``alphaedit``):
    the edit from the original weights with the same targets, then the evaluation against ``before`` (the
    unedited model's). Yields (label, row): the metrics, the realised share, drift, fluency (``fluency_fields``)
    and solve seconds; while a variant is yielded its weights are in place, and once the last one has been
    consumed the original weights are put back, so that a second call starts from the same weights (it once
    stacked its edits on the first call's last one). ``generation`` adds the generation
    family (off by default: sweeps compare teacher-forced scores, and generating costs more than the solve)."""
    from covedit.pipeline.memit import run_memit
    from covedit.pipeline.evaluate import drift, evaluate_model
    templates = templates_for(loaded, hp)
    restore = keep_weights(loaded, hp.layers)
    for label, kwargs in variants:
        restore()
        t0 = time.perf_counter()
        out = run_memit(loaded, facts, hp.layers, covs, kwargs.get("lam", 0.0), hp.target, templates, time.perf_counter,
                        targets=targets, preserve_prompts=kwargs.get("preserve_prompts", 0.0),
                        preserve_relation=kwargs.get("preserve_relation", 0.0),
                        relation_subjects=kwargs.get("relation_subjects", 16),
                        alphaedit=kwargs.get("alphaedit"))
        solve_s = time.perf_counter() - t0
        after = evaluate_model(loaded, facts, with_fluency=with_fluency, generation=generation)
        d = drift(before.next_tokens, after.next_tokens)
        yield (label,
               {**after.aggregate, "realised_mean": sum(out.target_info["realised"]) / len(facts),
                "drift_mean_kl": d["mean_kl"], "top1_changed_pct": d["top1_changed_pct"],
                **fluency_fields(after), "solve_s": solve_s})
    restore()


def memit_target_cache(model: str, overrides: list[str] | None = None) -> TargetCache:
    """The cache the benchmarks share: MEMIT's target settings (with ``overrides``) at its top layer."""
    loaded = load_model(model)
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, overrides or [])
    return TargetCache(loaded, hp.layers[-1], hp.target, templates_for(loaded, hp))


@contextlib.contextmanager
def delta_hooks(loaded, factors: dict, use):
    """While open, every edited down-projection's forward calls ``use(layer, delta, out)`` with ``delta`` =
    ΔW k in float64 (batch, T, d_model) for its input keys k and ``out`` its output W k; what ``use`` returns,
    if not None, replaces the output. ``factors`` maps a layer to the edit's (up, down), ΔW = up @ down; the
    model keeps its original weights."""
    handles = []

    def make(layer, up, down):
        up_t, down_t = up.double().T, down.double().T  # once per context, not once per forward

        def hook(_mod, args, out):
            return use(layer, (args[0].double() @ down_t) @ up_t, out)
        return hook

    try:
        for layer, (up, down) in factors.items():
            handles.append(loaded.down_proj(layer).register_forward_hook(make(layer, up, down)))
        yield
    finally:
        for h in handles:
            h.remove()


def delta_at(loaded, factors: dict, mask: torch.Tensor):
    """Add ΔW k_t to every edited down-projection's output only at the positions where ``mask`` (batch, T) is
    True, the model keeping its original weights: an edit applied at chosen tokens only. With every position
    True this is the edited model."""
    return delta_hooks(loaded, factors, lambda _layer, delta, out: out + (delta * mask[..., None]).to(out.dtype))
