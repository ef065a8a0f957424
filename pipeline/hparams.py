"""Hyperparameters of the edit methods: one dataclass per method, defaults per architecture, files and
``--set key=value`` overrides, and a plain dict for the manifest.

Defaults start from the published values (REFERENCE.md, "Reference hyperparameters"): MEMIT as on GPT-J,
ROME as on GPT-2 XL / GPT-J, AlphaEdit as on Llama-3-8B. A small table keyed by ``config.model_type``
then adjusts them per architecture. Layers always come from ``covedit.pipeline.models.default_layers``.

    hp = load_hparams("memit", "llama", 30, "my.yaml", ["target.lr=0.1", "layers=3-7", "lam=1500"])
    to_dict(hp)  # {"method": "memit", "layers": [3, 4, 5, 6, 7], "lam": 1500.0, ..., "target": {...}}

Quirks:

* ``target.steps`` counts forward passes, as the reference's ``v_num_grad_steps`` does: the last pass
  only measures, so at most ``steps - 1`` Adam updates are made.
* PyYAML reads ``2e-2`` (no dot) as a string; numeric fields accept numeric strings for that reason.
* Overrides name nested fields with a dot (``target.lr``); lists of layers are written ``3,4,5``,
  ``3-7`` or ``[3, 4, 5]``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Union

import yaml

from covedit.pipeline.errors import DataError, MissingInput, UsageError
from covedit.pipeline.models import default_layers

log = logging.getLogger(__name__)

COVARIANCES = ("C", "identity")
KEYS_FROM = ("templates", "prompt")


@dataclass
class TargetHParams:
    """The optimisation of target vectors z = h + δ (MEMIT's compute_z; see covedit.pipeline.targets)."""

    steps: int = 25  # forward passes; at most steps - 1 Adam updates (reference: v_num_grad_steps)
    lr: float = 0.5  # Adam learning rate for δ (v_lr)
    kl_factor: float = 0.0625  # weight of KL(p_edited ‖ p_initial) on the "{subject} is a" prompt
    weight_decay: float = 0.5  # weight of ‖δ‖ / ‖s‖² (v_weight_decay); s = h (MEMIT), W k (ROME, post-MLP norms)
    clamp_norm_factor: float = 0.75  # ‖δ‖ ≤ clamp_norm_factor · ‖s‖ after every step
    early_stop_loss: float = 0.05  # a fact stops once its whole loss (NLL + KL + decay) is below this
    # also stop a fact once every target token ranks first at every one of its rows (ENCORE's MPES); off:
    # the reference's rule
    stop_when_top1: bool = False
    # > 0: the first update puts δ at this fraction of the clamp radius along −∇loss at δ = 0, instead of
    # Adam's first step (which moves every coordinate by about lr, far inside the sphere where δ ends); Adam
    # takes over from there. 0: the reference's rule
    first_step: float = 0.0


@dataclass
class MemitHParams:
    """MEMIT: spread each fact's residual over ``layers``, Δ = R Kᵀ (λC + K Kᵀ)⁻¹."""

    method: ClassVar[str] = "memit"
    layers: list[int]
    lam: float = 15000.0  # mom2_update_weight: weight λ of the key covariance C = E[k kᵀ]
    covariance: str = "C"  # "C", or "identity" for λI + K Kᵀ (no statistics)
    n_templates: int = 5  # generated context prefixes per length, in addition to the bare "{}"
    template_lengths: list[int] = field(default_factory=lambda: [10])  # tokens per generated prefix
    # Keys K: averaged over the context templates ("templates", MEMIT), or the bare rewrite prompt's own
    # ("prompt"), where the residual is measured. Targets always use the templates.
    keys_from: str = "templates"
    # μ: weight of Σ k kᵀ over the other tokens of the edited prompts (and the target's teacher-forced
    # tokens) added to λC, so the update leaves their outputs alone (memit.py). 0 is the reference MEMIT.
    preserve_prompts: float = 0.0
    # ν: weight of the mean k kᵀ of each edited prompt with ``relation_subjects`` ordinary entity names in
    # its subject's place (pipeline/data/preserve_subjects.txt), added to λC so that the same relation
    # asked about other subjects keeps its answers (memit.py). 0 is the reference MEMIT.
    preserve_relation: float = 0.0
    relation_subjects: int = 16
    # Weight of Σ k kᵀ over the keys of every earlier batch of a sequence (``batch-edit --base``; kept in the
    # output's carried_keys.safetensors) added to λC, so each new solve also asks what earlier batches wrote
    # to stay: at 1 it is the least-squares edit of all batches' keys with the earlier residuals already
    # written. 0 is the reference MEMIT, each batch solved alone. A single batch is the same either way.
    # Why on: on 10 x 100 held-out zsRE facts in sequence it keeps the first batch at 71.0 % efficacy after
    # the tenth where 0 keeps 39.8 % (benchmarks/sequential.py, docs/edit-quality.md). No value was tuned
    # (1 is the weight a new key's own residual has) and the choice was measured on held-out facts only: a
    # tuning-slice sequence is still to run.
    preserve_earlier: float = 1.0
    target: TargetHParams = field(default_factory=TargetHParams)


@dataclass
class RomeHParams:
    """ROME: one rank-one update at ``layer``, ΔW = (v* − W k*) uᵀ / (uᵀ k*), u = C⁻¹ k*."""

    method: ClassVar[str] = "rome"
    layer: int
    covariance: str = "C"  # "C", or "identity" for the plain (v − W k) kᵀ / kᵀk
    n_templates: int = 10  # ROME's context_template_length_params [[5, 10], [10, 10]]
    template_lengths: list[int] = field(default_factory=lambda: [5, 10])
    target: TargetHParams = field(default_factory=lambda: TargetHParams(steps=20, clamp_norm_factor=4.0))


@dataclass
class AlphaEditHParams:
    """AlphaEdit: MEMIT's residuals, the update projected onto the null space of C (no λ: a ridge α)."""

    method: ClassVar[str] = "alphaedit"
    layers: list[int]
    null_space_threshold: float = 2e-2  # eigenvalues of C below this span the null space
    # > 0: instead, the smallest eigen-directions of C holding at most this fraction of its energy (memit.py)
    null_space_energy: float = 0.0
    alpha: float = 10.0  # ridge added to P (K Kᵀ + C_prev) before the solve (the reference's L2)
    lam: float = 0.0  # λ: λC kept inside the projected solve (0: the reference AlphaEdit)
    n_templates: int = 5
    template_lengths: list[int] = field(default_factory=lambda: [10])
    keys_from: str = "templates"  # as MEMIT's
    target: TargetHParams = field(default_factory=lambda: TargetHParams(lr=0.1))


HParams = Union[MemitHParams, RomeHParams, AlphaEditHParams]
METHODS: dict[str, type] = {cls.method: cls for cls in (MemitHParams, RomeHParams, AlphaEditHParams)}

_GEMMA3 = {"memit": {"lam": 6000.0, "target.clamp_norm_factor": 4.0}}  # why: the comment in ARCH_DEFAULTS

# Per-architecture adjustments of the published defaults, keyed by config.model_type, in override syntax.
# Architectures not listed get the published values unchanged.
ARCH_DEFAULTS: dict[str, dict[str, dict[str, object]]] = {
    # GPT-2 XL: MEMIT λ 20,000 and 20 steps; AlphaEdit 20 steps at lr 0.5; ROME 20 steps (the base).
    "gpt2": {
        "memit": {"lam": 20000.0, "target.steps": 20},
        "alphaedit": {"target.steps": 20, "target.lr": 0.5},
    },
    # GPT-J-6B: MEMIT as the base; AlphaEdit uses MEMIT's GPT-J recipe (lr 0.5).
    "gptj": {"alphaedit": {"target.lr": 0.5}},
    # The embedded default model, SmolLM2-135M, is a llama. Starting values only: they are to be tuned
    # by the zsRE benchmark. REFERENCE.md measured that the published λ 15,000 swamps this model's small
    # keys (zsRE efficacy 22 %), while λ 1,500 gives 76 % and λ 150 gives 94.5 % for a little locality;
    # lr 0.5 is what those runs used. ROME: the Llama-3-8B config of the AlphaEdit repository (25 steps,
    # weight decay 1e-3, clamp 4). For Llama-3-8B itself MEMIT/AlphaEdit publish lam=15000 and
    # target.lr=0.1 (pass them with --set).
    # MEMIT's targets: Adam at lr 2 for at most 15 passes instead of the reference's 0.5 and 25. At 0.5 most
    # SmolLM2 targets are still converging when the passes run out (δ must reach the clamp, ~0.75‖h‖ ≈ 110,
    # at about lr·√d per step); chosen on the first 100 zsRE facts, checked on 100 held-out ones
    # (benchmarks/step_rule.py, lambda_sweep.py --set, docs/target-speed.md): 1.7x fewer passes, efficacy
    # 87.0 -> 90.3 %, paraphrase 71.5 -> 75.5 %, drift KL 0.019 -> 0.025, same top-1 changed.
    # preserve_prompts μ 0.1: chosen at λ 1,500 on the 1,000-record tuning slice among μ 0 / 0.1 / 0.3 (the
    # same efficacy and paraphrase as μ 0, 71.3 / 56.8 against 71.5 / 56.5 %, with 41 % less drift, 0.161
    # against 0.274; results/preserve_prompts_tuning1000_cpu.json), then confirmed on the 1,000 held-out
    # facts: 70.2 / 56.9 against 68.9 / 54.0 %, drift 0.126 against 0.205, unrelated top-1s changed 16.7
    # against 26.2 % (results/preserve_prompts_heldout1000_cpu.json). μ weighs a sum over the batch's
    # prompts, so at 100 facts it does little (held out: 91.6 / 74.6 against 90.3 / 75.6 %, drift 0.022
    # against 0.025; results/preserve_prompts_heldout100_cpu.json). docs/edit-quality.md has the tables.
    "llama": {
        "memit": {"lam": 1500.0, "preserve_prompts": 0.1, "target.lr": 2.0, "target.steps": 15},
        "alphaedit": {"target.lr": 0.5},
        "rome": {"target.steps": 25, "target.weight_decay": 1e-3},
    },
    # The second embedded model, Gemma-3-270M (its blocks normalise the MLP output: postnorm.py). λ first chosen on
    # the first 50 distinct zsRE facts (benchmarks/lambda_sweep.py, results/gemma3_lambda_tuning_cpu.json):
    # the published 15,000 writes 43 % of the way (efficacy 37.5 %); 3,000 is the smallest λ that keeps the
    # drift on unrelated prompts below 0.02 nats with no top-1 token changed (efficacy 49.8 %, drift 0.015);
    # 1,000 gains 7 points for 7x the drift. Checked on 100 held-out facts with other subjects
    # (results/gemma3_heldout100_cpu.json, docs/gemma3.md): 15,000 / 3,000 / 1,000 edit 40.8 / 72.0 / 74.1 % at
    # drift 0.007 / 0.028 / 0.047 (those runs with the clamp below at 0.75).
    # Targets: the reference step rule (lr 0.5, 25 passes; lr 2 rescues none of the targets that stay far off,
    # results/gemma3_step_rule_lr_cpu.json), but the clamp at 4 ‖W k‖ instead of 0.75 (4 is EasyEdit's MEMIT
    # value for Qwen). Behind the scale-invariant post-MLP norm δ can only turn W k, and 0.75 ‖W k‖ caps the
    # turn at 49° (the argued mechanism; what was measured is the effect): on the first 40 tuning records
    # the 4 of 16 targets stuck above 0.5 nats all reach < 0.04 (results/gemma3_step_rule_clamp4_cpu.json).
    # Same λ, first 50 tuning facts: efficacy / paraphrase 67.1 / 59.9 -> 94.3 / 87.4 at drift 0.012 -> 0.016
    # (results/gemma3_lambda_tuning_clamp{075,4}_cpu.json).
    # λ with clamp 4 re-chosen on the first 100 tuning facts (the size it is reported at; drift grows with the
    # batch), after a held-out run had shown λ 3,000 drifting 0.052 with clamp 4 (docs/gemma3.md says so), by
    # a rule set before the tuning run: the smallest of 15,000 / 6,000 / 3,000 whose drift is at most
    # 0.025 nats, SmolLM2's default's on its 100 held-out facts. 6,000: 88.7 / 79.6 % at drift 0.022
    # (3,000: 90.6 / 81.2 at 0.030; results/gemma3_lambda_tuning100_clamp4_cpu.json). Held out: docs/gemma3.md.
    # AlphaEdit here, and Gemma-2 and OLMo-2 (also post-MLP norms), keep 0.75 until measured.
    "gemma3_text": _GEMMA3,
    "gemma3": _GEMMA3,  # the multimodal Gemma-3 wraps the same text model
    # Qwen2.5-7B, EasyEdit's configs: MEMIT clamp 4, weight decay 1e-3; AlphaEdit the same, lr 0.5, ridge 1.
    "qwen2": {
        "memit": {"target.clamp_norm_factor": 4.0, "target.weight_decay": 1e-3},
        "alphaedit": {"alpha": 1.0, "target.lr": 0.5, "target.clamp_norm_factor": 4.0,
                      "target.weight_decay": 1e-3},
        "rome": {"target.steps": 25, "target.weight_decay": 1e-3},
    },
}


def _method_class(method: str) -> type:
    cls = METHODS.get(method.lower())
    if cls is None:
        raise UsageError(f"Unknown edit method {method!r}: choose one of {', '.join(METHODS)}.")
    return cls


def defaults_for(method: str, model_type: str, num_layers: int) -> HParams:
    """The starting hyperparameters for ``method`` on a model of this architecture and depth."""
    cls = _method_class(method)
    layers = default_layers(num_layers)
    if not layers:
        raise UsageError(f"A model with {num_layers} layers has no layer to edit.")
    if cls is RomeHParams:
        # ROME's published layers (5 of GPT-J's 28, 5 of Llama-3-8B's 32) are the second of MEMIT's.
        hp = cls(layer=layers[min(1, len(layers) - 1)])
    else:
        hp = cls(layers=layers)
    for key, value in ARCH_DEFAULTS.get(model_type, {}).get(cls.method, {}).items():
        _set(hp, key, value, origin="the defaults table")
    return hp


# ------------------------------------------------------------------------------------ setting fields

def _field_types(obj: object) -> dict[str, object]:
    return dict(_class_field_types(type(obj)))


@functools.cache
def _class_field_types(cls: type) -> tuple[tuple[str, object], ...]:
    """A dataclass's fields and their resolved types; resolving the hints parses every annotation string of
    the class, so it is done once per class, not once per field of every ``--set``."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def _parse_int_list(value: object, key: str) -> list[int]:
    """Integers from a list, an int, or text: ``3,4,5``, ``3-7`` (inclusive), ``[3, 4]``, mixtures."""
    if isinstance(value, bool):
        raise UsageError(f"Hyperparameter {key} must be a list of integers, got {value!r}.")
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [_coerce(v, int, key) for v in value]
    if isinstance(value, str):
        text = value.strip().strip("[]")
        out: list[int] = []
        try:
            for part in filter(None, (p.strip() for p in text.split(","))):
                lo, sep, hi = part.partition("-")
                out.extend(range(int(lo), int(hi) + 1) if sep and lo else [int(part)])
        except ValueError:
            raise UsageError(f"Hyperparameter {key} must be integers like '3,4,5' or '3-7', got {value!r}.") from None
        return out
    raise UsageError(f"Hyperparameter {key} must be a list of integers, got {value!r}.")


def _coerce(value: object, typ: object, key: str) -> object:
    """``value`` (from JSON, YAML or a --set string) as ``typ``, or a UsageError naming ``key``."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(typ) is list:
        return _parse_int_list(value, key)
    else:
        raise TypeError(f"no coercion for {typ}")
    name = getattr(typ, "__name__", str(typ))
    raise UsageError(f"Hyperparameter {key} must be {'an' if name == 'int' else 'a'} {name}, got {value!r}.")


def _set(hp: object, key: str, value: object, origin: str = "--set") -> None:
    """Set a dotted field (``target.lr``) of ``hp`` from a raw value."""
    obj, parts = hp, key.split(".")
    for i, part in enumerate(parts):
        types = _field_types(obj)
        if part not in types:
            where = ".".join(parts[:i])
            known = ", ".join(types)
            raise UsageError(f"Unknown hyperparameter {key!r} in {origin} for {type(hp).method}"
                             f"{' (' + where + ')' if where else ''}: known keys are {known}.")
        typ = types[part]
        if dataclasses.is_dataclass(typ):
            if i == len(parts) - 1:  # a whole nested section, e.g. {"target": {"lr": 0.1}}
                if not isinstance(value, dict):
                    raise UsageError(f"Hyperparameter {key} must be a mapping of its fields, got {value!r}.")
                for sub, sub_value in value.items():
                    _set(hp, f"{key}.{sub}", sub_value, origin)
                return
            obj = getattr(obj, part)
            continue
        if i != len(parts) - 1:
            raise UsageError(f"Unknown hyperparameter {key!r} in {origin}: {part} has no fields.")
        setattr(obj, part, _coerce(value, typ, key))
        return


def validate(hp: HParams, num_layers: int | None = None) -> HParams:
    """Refuse values the methods cannot use, with one sentence naming the field; returns ``hp``."""
    layers = [hp.layer] if isinstance(hp, RomeHParams) else hp.layers
    if not layers:
        raise UsageError("Hyperparameter layers must name at least one layer.")
    if len(set(layers)) != len(layers):
        raise UsageError(f"Hyperparameter layers lists a layer twice: {layers}.")
    for layer in layers:
        if layer < 0 or (num_layers is not None and layer >= num_layers):
            top = f"0-{num_layers - 1}" if num_layers is not None else "0 and up"
            raise UsageError(f"Layer {layer} is out of range: this model has layers {top}.")
    if not isinstance(hp, RomeHParams):
        hp.layers = sorted(layers)
    if isinstance(hp, (MemitHParams, RomeHParams)):
        if hp.covariance.lower() == "c":
            hp.covariance = "C"
        if hp.covariance not in COVARIANCES:
            raise UsageError(f"Hyperparameter covariance must be 'C' or 'identity', got {hp.covariance!r}.")
    if isinstance(hp, (MemitHParams, AlphaEditHParams)) and hp.keys_from not in KEYS_FROM:
        raise UsageError(f"Hyperparameter keys_from must be 'templates' or 'prompt', got {hp.keys_from!r}.")
    if isinstance(hp, MemitHParams) and hp.lam < 0:
        raise UsageError(f"Hyperparameter lam must be >= 0, got {hp.lam}.")
    if isinstance(hp, MemitHParams) and hp.preserve_prompts < 0:
        raise UsageError(f"Hyperparameter preserve_prompts must be >= 0, got {hp.preserve_prompts}.")
    if isinstance(hp, MemitHParams) and not hp.preserve_earlier >= 0:  # also refuses NaN
        raise UsageError(f"Hyperparameter preserve_earlier must be >= 0, got {hp.preserve_earlier}.")
    if isinstance(hp, MemitHParams) and (hp.preserve_relation < 0 or hp.relation_subjects < 1):
        raise UsageError("Hyperparameter preserve_relation must be >= 0 and relation_subjects at least 1, got "
                         f"{hp.preserve_relation} and {hp.relation_subjects}.")
    if isinstance(hp, AlphaEditHParams) and min(hp.alpha, hp.null_space_threshold, hp.null_space_energy, hp.lam) < 0:
        raise UsageError("Hyperparameters alpha, null_space_threshold, null_space_energy and lam must be >= 0.")
    if hp.n_templates < 0 or any(n < 1 for n in hp.template_lengths):
        raise UsageError("Hyperparameter n_templates must be >= 0 and every template length >= 1.")
    t = hp.target
    if t.steps < 1:
        raise UsageError(f"Hyperparameter target.steps must be at least 1, got {t.steps}.")
    for name in ("lr", "clamp_norm_factor"):
        if getattr(t, name) <= 0:
            raise UsageError(f"Hyperparameter target.{name} must be > 0, got {getattr(t, name)}.")
    if not 0 <= t.first_step <= 1:
        raise UsageError(f"Hyperparameter target.first_step must be between 0 and 1 (of the clamp radius), got {t.first_step}.")
    for name in ("kl_factor", "weight_decay", "early_stop_loss"):
        if getattr(t, name) < 0:
            raise UsageError(f"Hyperparameter target.{name} must be >= 0, got {getattr(t, name)}.")
    return hp


# ------------------------------------------------------------------------------- files and overrides

def read_file(path: str | Path) -> dict:
    """A mapping of hyperparameters from a .json, .yaml or .yml file."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"Hyperparameter file {path} does not exist.")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix not in {".json", ".yaml", ".yml"}:
        raise UsageError(f"Hyperparameter file {path} must end in .json, .yaml or .yml.")
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        kind = "JSON" if suffix == ".json" else "YAML"
        raise DataError(f"Hyperparameter file {path} is not valid {kind}: {str(e).splitlines()[0]}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DataError(f"Hyperparameter file {path} must hold a mapping of names to values.")
    return data


def apply(hp: HParams, values: dict, origin: str) -> HParams:
    """Set every (possibly nested) entry of ``values`` on ``hp``; a ``method`` entry must match."""
    for key, value in values.items():
        if key == "method":
            if str(value).lower() != hp.method:
                raise UsageError(f"{origin} holds {value} hyperparameters, but the method is {hp.method}.")
            continue
        _set(hp, str(key), value, origin)
    return hp


def parse_override(text: str) -> tuple[str, str]:
    """``"target.lr=0.1"`` -> ``("target.lr", "0.1")``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set takes key=value (e.g. target.lr=0.1), got {text!r}.")
    return key.strip(), value.strip()


def load_hparams(method: str, model_type: str, num_layers: int, path: str | Path | None = None,
                 overrides: list[str] | None = None) -> HParams:
    """Defaults for this model, then the file at ``path``, then ``--set`` overrides, validated."""
    hp = defaults_for(method, model_type, num_layers)
    if path is not None:
        apply(hp, read_file(path), origin=str(path))
    for text in overrides or []:
        key, value = parse_override(text)
        _set(hp, key, value)
    validate(hp, num_layers)
    log.debug("hyperparameters for %s on %s: %s", hp.method, model_type, to_dict(hp))
    return hp


def to_dict(hp: HParams) -> dict:
    """Plain JSON-ready dict for the manifest, with the method name; ``apply`` reads it back."""
    return {"method": hp.method, **dataclasses.asdict(hp)}


def from_dict(data: dict, model_type: str = "", num_layers: int | None = None) -> HParams:
    """Rebuild hyperparameters from ``to_dict`` output (e.g. a manifest)."""
    if "method" not in data:
        raise DataError("Hyperparameters need a 'method' entry to be read back.")
    cls = _method_class(str(data["method"]))
    required = "layer" if cls is RomeHParams else "layers"
    if required not in data:
        raise DataError(f"{cls.method} hyperparameters need a {required!r} entry.")
    hp = apply(cls(**{required: data[required]}), data, origin="the hyperparameter record")
    return validate(hp, num_layers)
