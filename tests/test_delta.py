"""Edit deltas: the file round trip, hash-guarded apply and revert, and writing the edited model folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import covedit.pipeline.delta as delta_mod
from covedit.pipeline.delta import (
    Delta, LayerDelta, apply_delta, check_finite, load_delta, make_and_apply_delta, make_delta, revert_delta,
    save_delta,
    weight_hash, write_edited_model,
)
from covedit.pipeline.errors import CannotWrite, DataError, MissingInput

LAYERS = (1, 2)


def factors(loaded, rank=3, scale=1.0, seed=0):
    """Random low-rank factors for LAYERS, ΔW about as large as W times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in LAYERS:
        W = loaded.down_weight(layer)
        size = float(W.abs().mean()) * scale / rank ** 0.5
        out[layer] = (torch.randn(W.shape[0], rank, generator=g, dtype=torch.float64) * size,
                      torch.randn(rank, W.shape[1], generator=g, dtype=torch.float64))
    return out


def snapshot(loaded):
    return {name: p.detach().clone() for name, p in loaded.model.state_dict().items()}


def assert_unchanged(loaded, before):
    after = loaded.model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_weight_hash_is_the_bytes_of_the_d_model_by_d_ff_orientation():
    W = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert weight_hash(W) == weight_hash(W.T.contiguous().T)  # same values, other storage
    assert weight_hash(W) == hashlib.sha256(W.numpy().tobytes()).hexdigest()
    assert weight_hash(W) != weight_hash(W.to(torch.bfloat16))
    W2 = W.clone()
    W2[1, 2] = torch.nextafter(W2[1, 2], torch.tensor(10.0))
    assert weight_hash(W) != weight_hash(W2)


def test_save_load_round_trip_is_exact(tiny, tmp_path):
    meta = {"method": "memit", "facts_sha256": "ab" * 32, "lambda": 15000.0, "layers": list(LAYERS)}
    delta = make_and_apply_delta(tiny, factors(tiny), meta)
    path = tmp_path / "sub" / "edit.safetensors"
    save_delta(delta, path)
    assert [p.name for p in path.parent.iterdir()] == ["edit.safetensors"]  # no temporary file left
    loaded = load_delta(path)
    assert loaded.base_model_id == delta.base_model_id == tiny.model_id
    assert loaded.base_hashes == delta.base_hashes and loaded.edited_hashes == delta.edited_hashes
    assert set(loaded.base_hashes) == set(LAYERS) and loaded.base_hashes != loaded.edited_hashes
    assert loaded.meta == meta
    for a, b in zip(loaded.layers, delta.layers, strict=True):
        assert (a.layer, a.module) == (b.layer, b.module)
        assert a.module == tiny.arch.template().format(a.layer)
        assert a.up.dtype == torch.float32 and torch.equal(a.up, b.up) and torch.equal(a.down, b.down)


def test_apply_then_revert_returns_the_weights_within_float32_rounding(tiny):
    """One rounding when applying, one when reverting: |W_rev − W| ≤ u(|W'| + |W|)(1 + 4u) elementwise,
    and elements whose sign and exponent the edit did not change come back bit for bit."""
    before = snapshot(tiny)
    W0 = {layer: tiny.down_weight(layer).detach().clone() for layer in LAYERS}
    delta = make_and_apply_delta(tiny, factors(tiny, scale=2.0), {})
    edited = {layer: tiny.down_weight(layer).detach().clone() for layer in LAYERS}
    for ld in delta.layers:  # the edit really is W + up @ down
        expected = (W0[ld.layer].double() + ld.dense()).float()
        assert torch.equal(edited[ld.layer], expected)
    revert_delta(tiny, delta)
    u = torch.finfo(torch.float32).eps / 2
    inexact = 0
    for layer in LAYERS:
        W, W_edit, W_rev = W0[layer].double(), edited[layer].double(), tiny.down_weight(layer).detach().double()
        assert ((W_rev - W).abs() <= u * (W_edit.abs() + W.abs()) * (1 + 4 * u)).all()
        same_binade = (torch.sign(W) == torch.sign(W_edit)) & (torch.frexp(W).exponent == torch.frexp(W_edit).exponent)
        assert torch.equal(W_rev[same_binade], W[same_binade])
        inexact += int((W_rev != W).sum())
    assert inexact > 0  # an edit this large does move elements across powers of two: the bound is what holds
    untouched = [name for name in before if not any(f".{layer}." in name for layer in LAYERS)]
    assert all(torch.equal(tiny.model.state_dict()[name], before[name]) for name in untouched)


def test_apply_refuses_a_model_whose_weights_differ_and_changes_nothing(tiny):
    delta = make_delta(tiny, factors(tiny), {})
    with torch.no_grad():
        tiny.down_weight(LAYERS[-1])[0, 0] += 1e-3  # the last layer differs; the first must stay untouched too
    before = snapshot(tiny)
    with pytest.raises(DataError, match=f"Layer {LAYERS[-1]}'s weight .* hashes to"):
        apply_delta(tiny, delta)
    with pytest.raises(DataError, match="hashes to"):
        apply_delta(tiny, delta, check_model_id=False)  # skipping the id check never skips the hashes
    assert_unchanged(tiny, before)


def test_apply_refuses_another_model_id_unless_told(tiny):
    delta = make_delta(tiny, factors(tiny), {})
    other = dataclasses.replace(tiny, model_id="folder:other@123")
    before = snapshot(tiny)
    with pytest.raises(DataError, match="made for model"):
        apply_delta(other, delta)
    assert_unchanged(tiny, before)
    edited = apply_delta(other, delta, check_model_id=False)
    assert set(edited) == set(LAYERS) and all(edited[layer] != delta.base_hashes[layer] for layer in LAYERS)


def test_apply_twice_and_revert_without_apply_are_refused(tiny):
    before = snapshot(tiny)
    made = make_delta(tiny, factors(tiny), {})
    with pytest.raises(DataError, match="no edited weight hashes"):
        revert_delta(tiny, made)
    delta = make_and_apply_delta(tiny, factors(tiny), {})
    revert_delta(tiny, delta)
    reverted = snapshot(tiny)
    with pytest.raises(DataError, match="edited hash"):
        revert_delta(tiny, delta)  # already reverted
    assert_unchanged(tiny, reverted)
    tiny.model.load_state_dict(before)
    apply_delta(tiny, delta)
    with pytest.raises(DataError, match="base hash"):
        apply_delta(tiny, delta)  # already applied
    with pytest.raises(DataError, match="do not fit"):
        broken = Delta([dataclasses.replace(delta.layers[0], down=delta.layers[0].down[:, :-1])], delta.base_model_id,
                       delta.edited_hashes, delta.edited_hashes, {})
        apply_delta(tiny, broken)


def test_apply_refuses_a_delta_for_another_module(tiny):
    delta = make_delta(tiny, factors(tiny), {})
    delta.layers[0] = dataclasses.replace(delta.layers[0], module="model.layers.1.mlp.up_proj")
    with pytest.raises(DataError, match="edits module"):
        apply_delta(tiny, delta)


def test_load_delta_reports_missing_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(MissingInput):
        load_delta(tmp_path / "none.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(DataError, match="not a covedit delta"):
        load_delta(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(DataError, match="not a readable covedit delta"):
        load_delta(tmp_path / "junk.safetensors")


# ------------------------------------------------------------------------------------- the edited model

def test_write_edited_model_gives_a_folder_plain_transformers_loads(tiny, tmp_path):
    delta = make_and_apply_delta(tiny, factors(tiny), {"method": "memit"})
    out = tmp_path / "edited"
    manifest = {"facts_sha256": "0" * 64, "base_hashes": {str(k): v for k, v in delta.base_hashes.items()}}
    write_edited_model(tiny, out, delta, manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]  # no temporary folder left
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours, theirs = tiny.model.state_dict(), reloaded.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[name], theirs[name]) for name in ours)
    wrapped = dataclasses.replace(tiny, model=reloaded)
    assert all(weight_hash(wrapped.down_weight(layer)) == delta.edited_hashes[layer] for layer in LAYERS)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert load_delta(out / "delta.safetensors").edited_hashes == delta.edited_hashes
    assert (out / "tokenizer.json").exists()


def test_write_edited_model_refuses_a_non_empty_folder_unless_overwrite(tiny, tmp_path):
    delta = make_and_apply_delta(tiny, factors(tiny), {})
    out = tmp_path / "edited"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CannotWrite, match="not empty"):
        write_edited_model(tiny, out, delta, {})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    write_edited_model(tiny, out, delta, {"run": 2}, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_edited_model(tiny, empty, delta, {})  # an existing empty folder is fine
    assert (empty / "delta.safetensors").exists()


@pytest.mark.parametrize("where", ["model", "delta"])
def test_a_crash_while_writing_leaves_no_output_and_no_temporary_folder(tiny, tmp_path, monkeypatch, where):
    delta = make_and_apply_delta(tiny, factors(tiny), {})

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    if where == "model":
        monkeypatch.setattr(tiny.model, "save_pretrained", crash)
    else:  # late: the model and tokenizer are already written
        monkeypatch.setattr(delta_mod, "save_delta", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_edited_model(tiny, tmp_path / "edited", delta, {})
    assert list(tmp_path.iterdir()) == []
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "keep.txt").write_text("old run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_edited_model(tiny, previous, delta, {}, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["previous"]
    assert (previous / "keep.txt").read_text() == "old run"


def test_write_edited_model_refuses_nan_and_a_model_without_the_edit(tiny, tmp_path):
    delta = make_and_apply_delta(tiny, factors(tiny), {})
    bad = dataclasses.replace(delta, layers=[dataclasses.replace(delta.layers[0], up=delta.layers[0].up.clone())])
    bad.layers[0].up[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        write_edited_model(tiny, tmp_path / "edited", bad, {})
    revert_delta(tiny, delta)
    with pytest.raises(DataError, match="does not hold"):
        write_edited_model(tiny, tmp_path / "edited", delta, {})
    assert list(tmp_path.iterdir()) == []


def test_write_edited_model_never_overwrites_the_input_folder(tiny, tmp_path):
    delta = make_and_apply_delta(tiny, factors(tiny), {})
    source = tmp_path / "base"
    write_edited_model(tiny, source, delta, {})
    from_folder = dataclasses.replace(tiny, source=str(source))
    for target in (source, tmp_path):
        with pytest.raises(CannotWrite, match="input model"):
            write_edited_model(from_folder, target, delta, {}, overwrite=True)
    assert (source / "config.json").exists()


def test_layer_delta_dense_is_the_float64_product_of_the_stored_factors():
    up, down = torch.tensor([[1.0], [3.0]]), torch.tensor([[1 / 3, 0.1]])  # float32 values
    ld = LayerDelta(0, "m", up, down)
    assert ld.rank == 1 and ld.dense().dtype == torch.float64
    assert torch.equal(ld.dense(), up.double() @ down.double())
    assert not torch.equal(ld.dense(), (up @ down).double())  # a float32 product would round 3 × fl(1/3)


def test_layer_delta_norm_is_the_dense_frobenius_norm():
    """LayerDelta.norm() (what manifests and histories record) without forming up @ down."""
    from covedit.pipeline.delta import LayerDelta

    g = torch.Generator().manual_seed(0)
    ld = LayerDelta(3, "m", torch.randn(6, 2, generator=g), torch.randn(2, 9, generator=g))
    assert abs(ld.norm() - float(ld.dense().norm())) <= 1e-12 * float(ld.dense().norm())


def test_nan_in_a_factor_is_refused(tiny):
    """A NaN or Inf in any factor is refused before any weight changes."""
    W = tiny.down_weight(0)
    g = torch.Generator().manual_seed(0)
    up = torch.randn(W.shape[0], 1, generator=g, dtype=torch.float64)
    down = torch.randn(1, W.shape[1], generator=g, dtype=torch.float64)
    bad = down.clone()
    bad[0, 3] = float("nan")
    before = W.detach().clone()
    with pytest.raises(DataError, match="layer 0"):
        make_delta(tiny, {0: (up, bad)}, {})
    delta = Delta([LayerDelta(0, "m", up.float(), bad.float())], tiny.model_id, {}, {}, {})
    with pytest.raises(DataError, match="NaN or Inf"):
        check_finite(delta)
    overflow = Delta([LayerDelta(0, "m", up.float() * float("inf"), down.float())], tiny.model_id, {}, {}, {})
    with pytest.raises(DataError):
        check_finite(overflow)
    assert torch.equal(W, before)
