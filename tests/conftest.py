"""Shared test fixtures: tiny models of every supported architecture built from their config classes,
real tokenizers (SmolLM2's BPE, once as is and once adding a BOS token), and ``cli``, the one way tests
run the command line as a separate process.

Tiny models are seeded, so every test sees the same weights.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers

from covedit.pipeline.facts import Fact, Neighbor
from covedit.pipeline.hparams import TargetHParams
from covedit.pipeline.models import LoadedModel, describe_model, load_model, wrap_model

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None, stats_dir=None, check=False, **kw) -> subprocess.CompletedProcess:
    """``python cli.py ARGS`` from the repository root, as a user runs it; output captured as text.

    ``env`` adds to this process's environment, ``stats_dir`` sets COVEDIT_STATS_DIR, ``check`` raises on a
    non-zero exit; other keywords (``timeout``) go to subprocess.run.
    """
    full_env = {**os.environ, **(env or {})}
    if stats_dir is not None:
        full_env["COVEDIT_STATS_DIR"] = str(stats_dir)
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          env=full_env, check=check, cwd=ROOT, **kw)

SMALL = dict(num_hidden_layers=4, max_position_embeddings=512)


def tiny_config(model_type: str, vocab_size: int):
    """A config for a 4-layer, width-16 model of this architecture (d_ff 32 or 64)."""
    common = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_attention_heads=2, **SMALL)
    if model_type in {"llama", "mistral", "qwen2", "phi3"}:
        return transformers.CONFIG_MAPPING[model_type](num_key_value_heads=1, **common)
    if model_type in {"qwen3", "gemma", "gemma2", "gemma3_text"}:
        return transformers.CONFIG_MAPPING[model_type](num_key_value_heads=1, head_dim=8, **common)
    if model_type in {"olmo", "olmo2"}:
        return transformers.CONFIG_MAPPING[model_type](pad_token_id=None, bos_token_id=None, eos_token_id=None, **common)
    if model_type == "gemma3":  # the multimodal Gemma-3: a text model inside, with a tiny vision tower
        return transformers.Gemma3Config(
            text_config=dict(num_key_value_heads=1, head_dim=8, **common),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14))
    if model_type == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=4, n_head=2, n_inner=64, n_positions=512,
                                       bos_token_id=None, eos_token_id=None)
    if model_type == "gptj":
        return transformers.GPTJConfig(vocab_size=vocab_size, n_embd=16, n_layer=4, n_head=2, n_inner=64, rotary_dim=4,
                                       n_positions=512, bos_token_id=None, eos_token_id=None)
    if model_type == "gpt_neox":
        return transformers.GPTNeoXConfig(**common)
    raise ValueError(model_type)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo", "olmo2", "gpt2", "gptj",
         "gpt_neox", "phi3"]
POST_NORM_ARCHS = ["gemma2", "gemma3", "gemma3_text", "olmo2"]  # a norm between the MLP and the residual stream


@contextmanager
def one_thread():
    """One torch thread inside, the previous count restored after: tiny models run many small operations,
    where a second thread only adds synchronisation (several times slower on a busy 2-core machine). Module
    and session fixtures that run tiny models use it too: they are set up before the per-test fixture below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_torch_thread(request):
    """Tests run with one torch thread (``one_thread``), except the slow ones, whose real-model forwards gain
    from every core."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    with one_thread():
        yield


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json")


@pytest.fixture(autouse=True, scope="session")
def tokenizers_parsed_once():
    """Every tiny model, edited copy and history folder carries the same 2 MB SmolLM2 tokenizer, and parsing it
    (transformers reads tokenizer.json with Python's json, then the Rust library parses it again) was a quarter
    of the fast lane. In this test process a folder whose tokenizer files are byte for byte ones already loaded
    gets that tokenizer object back; anything else (another tokenizer, a damaged file, a hub name) is loaded
    as before. covedit never changes a tokenizer after loading it, which is what makes sharing one safe; the
    product itself keeps no such process-wide cache."""
    import hashlib

    from covedit.pipeline import models

    original, loaded = models._load_tokenizer, {}

    def content_key(location: str, revision: str | None):
        folder = Path(location)
        if revision is not None or not (folder / "tokenizer.json").is_file():
            return None  # a hub name, a revision, or another kind of tokenizer: loaded as before
        h = hashlib.sha256()
        for name in _TOKENIZER_FILES:
            f = folder / name
            h.update(name.encode() + (b"\0" + f.read_bytes() if f.is_file() else b"\1"))
        return h.hexdigest()

    def load_once(name: str, location: str, revision: str | None):
        key = content_key(location, revision)
        if key is None:
            return original(name, location, revision)
        if key not in loaded:
            loaded[key] = original(name, location, revision)
        return loaded[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "_load_tokenizer", load_once)
        yield


@pytest.fixture(autouse=True, scope="session")
def cli_app_built_once():
    """typer's CliRunner rebuilds the click command from the app's signatures on every invoke (reading every
    parameter's annotations); the app does not change during the tests, so it is built once."""
    import typer.testing

    original, built = typer.testing._get_command, {}

    def get_command_once(app):
        if id(app) not in built:
            built[id(app)] = (app, original(app))
        return built[id(app)][1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(typer.testing, "_get_command", get_command_once)
        yield


def build_tiny(model_type: str, tokenizer, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    config = tiny_config(model_type, len(tokenizer))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return wrap_model(model, tokenizer, model_id=f"tiny-{model_type}-{seed}")


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct (real weights), loaded once per session."""
    return load_model()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer: byte-level BPE, adds no BOS. The one ``load_model()`` gives, loaded without the
    model's weights, so that tiny-model tests do not load the real model."""
    return describe_model("smollm2-135m", tokenizer=True).tokenizer


@pytest.fixture(scope="session")
def bos_tokenizer(tokenizer):
    """The same tokenizer, made to prepend a BOS token, as Llama-3 and Gemma tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    bos = "<|endoftext|>"
    tok.bos_token = bos
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    assert tok("x").input_ids[0] == tok.bos_token_id
    return tok


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request, tokenizer) -> LoadedModel:
    """A tiny Linear (llama) and a tiny Conv1D (gpt2) model."""
    return build_tiny(request.param, tokenizer)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny llama saved as a Hugging Face folder, so other processes (CLI runs, dask workers) can load it."""
    d = tmp_path_factory.mktemp("tiny-llama")
    m = build_tiny("llama", tokenizer)
    m.model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """600 documents of real text taken from the embedded Wikipedia corpus, as a local jsonl file."""
    from covedit.stats.corpus import CorpusSpec, open_corpus

    corpus = open_corpus(CorpusSpec())
    d = tmp_path_factory.mktemp("corpus")
    with open(d / "docs.jsonl", "w") as f:
        for _, text in corpus.documents(0, 600):
            f.write(json.dumps({"text": text}) + "\n")
    return d / "docs.jsonl"


# ------------------------------------------------------------------- data the edit tests share

# Three facts the drivers (run_memit, run_rome) and batch-edit write, and target settings quick enough for
# tiny models.
FACTS = [Fact("a", "Eiffel Tower", "The {} is located in", "Rome"),
         Fact("b", "Louvre", "The {} is a museum in", "Berlin"),
         Fact("c", "Danielle Darrieux", "The mother tongue of {} is", "English")]
FAST = TargetHParams(steps=8, lr=0.05, clamp_norm_factor=10.0)

# Random float64 data for the solves (MEMIT, AlphaEdit, ROME) of a (D_MODEL, D_FF) down-projection.
D_MODEL, D_FF = 12, 40
f64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=f64, generator=torch.Generator().manual_seed(seed))


def covariance(d=D_FF, tokens=400, seed=1):
    """An uncentred second moment of correlated keys, as build-stats produces: sum / count."""
    keys = rand(tokens, d, seed=seed) @ rand(d, d, seed=seed + 1) / d ** 0.5 + 0.3
    return keys.T @ keys / tokens


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# Facts for the evaluation and report tests: every metric present, no paraphrase or neighbour, a zsRE-like
# record without a true target; and a short fluency prompt set.
EVAL_FACTS = [
    Fact("eiffel", "Eiffel Tower", "The {} is located in the city of", "Rome", "Paris",
         ("Where is the Eiffel Tower? It is in",), (Neighbor("The Louvre is located in the city of", "Paris"),)),
    Fact("jobs", "Steve Jobs", "{} was the founder of", "Microsoft", "Apple"),  # no paraphrase, no neighbour
    Fact("zsre", "Watts Humphrey", "What university did {} attend?", "Illinois Institute of Technology",
         None, ("What university did Watts Humphrey go to?",)),  # zsRE-like: no true target
]
SHORT = ["The city is known for", "Music has always been"]


@pytest.fixture(scope="session")
def evaluations(tokenizer):
    """An unchanged and a perturbed tiny llama, evaluated on EVAL_FACTS with a short fluency set (one torch
    thread: many small forwards, where synchronisation would dominate)."""
    from covedit.pipeline.evaluate import evaluate_model

    with one_thread():
        base = build_tiny("llama", tokenizer)
        other = build_tiny("llama", tokenizer)
        with torch.no_grad():
            other.down_weight(2).add_(0.5 * torch.randn_like(other.down_weight(2)))
        opts = dict(fluency_prompts=SHORT, max_new_tokens=12)
        return evaluate_model(base, EVAL_FACTS, **opts), evaluate_model(other, EVAL_FACTS, **opts)
