"""Serving an edit without a full copy: a history's deltas as a PEFT LoRA adapter on the down-projections.

A batch's ΔW = up @ down per layer (pipeline/delta.py, the ``out = W @ k`` orientation) is a LoRA update as
it stands: ``lora_B`` = up (d_model × r), ``lora_A`` = down (r × d_ff), ``lora_alpha`` = r so PEFT's scale
alpha / r is 1. Several batches add up, so their factors are concatenated (rank = the sum). Layers with fewer
directions than the adapter's rank are padded with zero rows/columns, which changes nothing and keeps one
``r`` for loaders that do not read ``rank_pattern`` (vLLM). GPT-2's Conv1D stores W transposed: the factors
are the same and ``fan_in_fan_out`` tells PEFT so.

``max_rank`` truncates each layer's ΔW to its best rank-R approximation without forming it: QR of both
factors, an SVD of the small r × r core, and the relative Frobenius error sqrt(Σ_{i>R} σᵢ²) / ‖ΔW‖_F.
A small weight error can still lose facts (each fact is one direction of ΔW), so a truncated export also
scores the exported batches' facts on the origin model plus the full ΔW and plus the truncated one
(``efficacy``: teacher-forced top-1 accuracy of the new target on the rewrite prompts and paraphrases).

The adapter is made for the history's origin model (the weights before its first batch). Their hashes are in
the adapter file's safetensors metadata (key ``covedit_adapter``, which PEFT ignores); ``load_adapter``
checks a model against them before handing it to PEFT, and ``check_adapter_base`` does only the check.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from covedit.pipeline.atomic import replace_folder
from covedit.pipeline.delta import layer_hashes
from covedit.pipeline.errors import DataError, MissingInput, UsageError
from covedit.pipeline.history import check_output, read_history

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METADATA_KEY = "covedit_adapter"
FORMAT_VERSION = 1


@dataclass
class ExportResult:
    output: Path
    batches: list[int]
    layers: list[int]
    rank: int  # the adapter's r (the largest per-layer rank)
    ranks: dict[int, int]  # directions per layer, before zero padding
    relative_error: dict[int, float] = field(default_factory=dict)  # ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F (0: exact)
    adapter_bytes: int = 0
    model_bytes: int = 0  # the full model's weight files, for comparison
    efficacy: dict | None = None  # {"full": {...}, "truncated": {...}} when a truncated export was scored

    def to_dict(self) -> dict:
        return {"output": str(self.output), "batches": self.batches, "layers": self.layers, "rank": self.rank,
                "ranks": {str(k): v for k, v in self.ranks.items()},
                "relative_error": {str(k): v for k, v in self.relative_error.items()},
                "adapter_bytes": self.adapter_bytes, "model_bytes": self.model_bytes, "efficacy": self.efficacy}


def truncate(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` factors of up @ down (balanced: √σ on each side, float64) and the relative
    Frobenius error, from QR of the factors and the SVD of their r × r core (the dense product is never formed)."""
    q1, r1 = torch.linalg.qr(up.double())  # up = Q1 R1
    q2, r2 = torch.linalg.qr(down.double().T)  # downᵀ = Q2 R2, so up @ down = Q1 (R1 R2ᵀ) Q2ᵀ
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    k = min(rank, s.numel())
    total = float(s.square().sum())
    error = (float(s[k:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    root = s[:k].sqrt()
    return (q1 @ u[:, :k]) * root, root[:, None] * (vh[:k] @ q2.T), error


def _weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.name != "delta.safetensors") + \
        sum(p.stat().st_size for p in folder.glob("*.bin"))


def truncation_efficacy(folder: Path, hist, numbers: list[int], factors: dict[int, tuple], device: str = "cpu") -> dict:
    """Efficacy and paraphrase accuracy (%) of batches ``numbers``' facts on the origin model plus their full ΔW,
    and plus the truncated ``factors`` instead: what a user loses by serving the truncated adapter."""
    from covedit.pipeline.delta import add_low_rank  # noqa: PLC0415
    from covedit.pipeline.evaluate import aggregate, fact_metrics  # noqa: PLC0415
    from covedit.pipeline.facts import read_facts  # noqa: PLC0415
    from covedit.pipeline.history import check_weights, weights_without  # noqa: PLC0415
    from covedit.pipeline.models import load_model  # noqa: PLC0415

    loaded = load_model(str(folder), hist.dtype, device)
    check_weights(hist, loaded, folder)
    facts = [f for n in numbers
             for f in read_facts(hist.facts_file(n), hist.record(n)["facts"]["format"], loaded.tokenizer)]

    def brief(rows: list[dict]) -> dict:
        agg = aggregate(rows)
        return {"n_facts": agg["n_facts"], "efficacy_acc": agg["efficacy_acc"],
                "generalization_acc": agg["generalization_acc"]}

    others = [m for m in hist.active() if m not in numbers]
    exported = [hist.delta(n) for n in numbers]
    with weights_without(loaded, [hist.delta(m) for m in others]):  # origin + the exported batches, full rank
        full = brief(fact_metrics(loaded, facts, generation=False))  # token accuracy only: no generations
        with weights_without(loaded, exported):  # origin + the truncated adapter
            for layer, (up, down) in factors.items():
                add_low_rank(loaded.down_weight(layer), up, down)
            truncated = brief(fact_metrics(loaded, facts, generation=False))
    return {"full": full, "truncated": truncated}


def export_peft(folder: Path | str, output: Path | str, batches: list[int] | None = None, max_rank: int | None = None,
                overwrite: bool = False, module_template: str | None = None, evaluate: bool = True,
                device: str = "cpu") -> ExportResult:
    """Write ``folder``'s edit (``batches``, default every applied one) as a PEFT LoRA adapter at ``output``;
    with ``max_rank`` and ``evaluate``, also score what the truncation costs (``truncation_efficacy``)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    from covedit.pipeline.models import describe_model  # noqa: PLC0415

    folder, output = Path(folder), Path(output)
    if max_rank is not None and max_rank < 1:
        raise UsageError("--max-rank must be at least 1.")
    hist = read_history(folder)
    numbers = list(batches) if batches else hist.active()
    for n in numbers:
        hist.record(n)  # UsageError if there is no such batch
    if not numbers:
        raise UsageError(f"{folder} holds no applied batch to export (every batch is reverted).")
    check_output(output, overwrite, folder)
    skeleton = describe_model(str(folder), module_template=module_template)  # no weights: names and layout
    parts: dict[int, list] = {}
    for n in numbers:
        for ld in hist.delta(n).layers:
            module = skeleton.arch.template().format(ld.layer)
            if ld.module != module:
                raise DataError(f"Batch {n} edits module {ld.module!r}, but this model's layer {ld.layer} is "
                                f"{module!r}; pass --module-template.")
            parts.setdefault(ld.layer, []).append(ld)
    origin = hist.data["origin"]
    factors, errors, ranks = {}, {}, {}
    for layer, lds in sorted(parts.items()):
        up, down = torch.cat([ld.up for ld in lds], 1), torch.cat([ld.down for ld in lds], 0)
        error = 0.0
        if max_rank is not None and up.shape[1] > max_rank:
            up, down, error = truncate(up, down, max_rank)
        factors[layer] = (up.float(), down.float())
        errors[layer], ranks[layer] = error, up.shape[1]
    r = max(ranks.values())
    tensors, modules = {}, []
    for layer, (up, down) in factors.items():
        module = skeleton.arch.template().format(layer)
        modules.append(module)
        pad = r - up.shape[1]
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.cat(
            [down, down.new_zeros(pad, down.shape[1])]).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.cat(
            [up, up.new_zeros(up.shape[0], pad)], 1).contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
              "target_modules": modules, "fan_in_fan_out": skeleton.arch.transposed, "bias": "none",
              "base_model_name_or_path": origin["model"], "inference_mode": True, "init_lora_weights": True,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
              "alpha_pattern": {}, "use_rslora": False, "use_dora": False, "revision": None}
    meta = {"format_version": FORMAT_VERSION, "source": str(folder), "base_model": origin["model"],
            "base_model_id": origin["model_id"], "dtype": origin["dtype"], "module_template": skeleton.arch.template(),
            "transposed": skeleton.arch.transposed,
            "base_hashes": {str(layer): origin["weight_hashes"][str(layer)] for layer in factors},
            "batches": [{"batch": n, "facts_sha256": hist.record(n)["facts"]["sha256"],
                         "delta_sha256": hist.record(n)["delta"]["sha256"]} for n in numbers],
            "ranks": {str(k): v for k, v in ranks.items()}, "max_rank": max_rank,
            "relative_error": {str(k): v for k, v in errors.items()}}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    efficacy = (truncation_efficacy(folder, hist, numbers, factors, device)
                if evaluate and any(e > 0 for e in errors.values()) else None)
    replace_folder(output, fill, "the adapter")
    return ExportResult(output, numbers, sorted(factors), r, ranks, errors,
                        (output / ADAPTER_WEIGHTS).stat().st_size + (output / ADAPTER_CONFIG).stat().st_size,
                        _weights_size(folder), efficacy)


def read_adapter_meta(adapter_dir: Path | str) -> dict:
    """The covedit record inside an exported adapter; MissingInput / DataError if it is not one."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise MissingInput(f"{adapter_dir} holds no {ADAPTER_WEIGHTS}: it is not a PEFT adapter folder.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if METADATA_KEY not in metadata:
            raise DataError(f"{path} was not exported by covedit (no {METADATA_KEY!r} metadata), so its base "
                            "model cannot be checked.")
        return json.loads(metadata[METADATA_KEY])
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a readable adapter ({type(e).__name__}: {e}).") from e


def check_adapter_base(model, adapter_dir: Path | str) -> None:
    """DataError unless ``model`` (a transformers causal LM) holds exactly the weights the adapter was made
    for at every layer it edits (same model, same dtype, no other edit applied)."""
    from covedit.pipeline.models import LoadedModel, resolve_arch  # noqa: PLC0415

    meta = read_adapter_meta(adapter_dir)
    arch = resolve_arch(model.config.model_type, meta["module_template"], meta["transposed"])
    loaded = LoadedModel(model, None, arch, "adapter base check", "adapter base check")
    want = {int(k): v for k, v in meta["base_hashes"].items()}
    loaded.check_layers(sorted(want))
    now = layer_hashes(loaded, sorted(want))
    for layer, h in sorted(want.items()):
        if now[layer] != h:
            dtype = str(loaded.dtype).removeprefix("torch.")
            hint = f" (this model is {dtype}, the adapter's base was {meta['dtype']})" if dtype != meta["dtype"] else ""
            raise DataError(f"This adapter was made for {meta['base_model']} ({meta['dtype']}), whose layer {layer} "
                            f"hashes to {h[:12]}; this model's hashes to {now[layer][:12]}{hint}, so it is not the "
                            "adapter's base model.")


def load_adapter(model, adapter_dir: Path | str, **kwargs):
    """``peft.PeftModel.from_pretrained(model, adapter_dir)`` after ``check_adapter_base`` (needs the
    optional extra: ``pip install 'covedit[serve]'``)."""
    check_adapter_base(model, adapter_dir)
    try:
        from peft import PeftModel  # noqa: PLC0415
    except ImportError as e:
        raise MissingInput("Loading an adapter needs peft: pip install 'covedit[serve]'.") from e
    return PeftModel.from_pretrained(model, str(adapter_dir), **kwargs)
