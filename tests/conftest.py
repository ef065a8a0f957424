"""Shared test fixtures: tiny models of every supported architecture built from their config classes,
and real tokenizers (SmolLM2's BPE, once as is and once adding a BOS token).

Tiny models are seeded, so every test sees the same weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from covedit.pipeline.models import LoadedModel, load_model, wrap_model

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
def tokenizer(smol):
    """SmolLM2's tokenizer: byte-level BPE, adds no BOS."""
    return smol.tokenizer


@pytest.fixture(scope="session")
def bos_tokenizer(smol):
    """The same tokenizer, made to prepend a BOS token, as Llama-3 and Gemma tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(smol.tokenizer)
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
