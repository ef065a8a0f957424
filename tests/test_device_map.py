"""Models spread over several devices (batch-edit --device-map): where each layer's update is computed.

No GPU is needed: device maps are plain dictionaries (module prefix -> device) as accelerate writes them, so
the placement rules are tested with fake ones; the whole path runs with accelerate on CPU and must give
exactly the edit of the unspread model.
"""

from __future__ import annotations

import json

import pytest

from conftest import cli
from covedit.pipeline.models import ModelError, layer_devices

TEMPLATE = "model.layers.{}.mlp.down_proj"


def test_layers_follow_the_longest_matching_prefix_over_fake_gpus():
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 3, "lm_head": 3}
    device_map |= {f"model.layers.{i}": i // 3 for i in range(12)}  # 3 blocks per GPU, GPUs 0-3
    placed = layer_devices(device_map, TEMPLATE, range(12))
    assert placed == {i: f"cuda:{i // 3}" for i in range(12)}
    # "model.layers.1" must not claim "model.layers.10"
    assert layer_devices({"model.layers.1": 0, "model.layers.10": 1}, TEMPLATE, [1, 10]) == {1: "cuda:0", 10: "cuda:1"}


def test_a_map_of_whole_parts_and_string_devices():
    assert layer_devices({"": "cuda:1"}, TEMPLATE, [4, 5]) == {4: "cuda:1", 5: "cuda:1"}
    device_map = {"model": 0, "model.layers.7": "cpu", "lm_head": 1}
    assert layer_devices(device_map, TEMPLATE, [6, 7]) == {6: "cuda:0", 7: "cpu"}
    # accelerate can also split inside a block: the down-projection's own entry decides
    assert layer_devices({"model.layers.5": 0, "model.layers.5.mlp.down_proj": 2}, TEMPLATE, [5]) == {5: "cuda:2"}


def test_a_layer_offloaded_to_disk_is_refused_by_name():
    with pytest.raises(ModelError, match=r"Layer 5 .*offloaded to disk"):
        layer_devices({"model.layers.4": 0, "model.layers.5": "disk"}, TEMPLATE, [4, 5])


def test_a_map_that_does_not_hold_the_layer_is_refused():
    with pytest.raises(ModelError, match="places no module"):
        layer_devices({"model.embed_tokens": 0}, TEMPLATE, [3])


@pytest.mark.slow
def test_batch_edit_with_device_map_gives_the_same_edit(tiny_dir, tmp_path):
    """--device-map auto loads through accelerate (here every block lands on the CPU); the delta must be
    bit for bit the one of a plain load, and the manifest says where each layer's update was computed."""
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "Eiffel Tower", "prompt": "The {} is located in",
                                 "target_new": "Rome"}) + "\n")
    common = ["--model", tiny_dir, "--method", "memit", "--covariance", "identity", "--no-eval",
              "--set", "layers=1-2", "--set", "target.steps=3", "--json"]
    plain = cli("batch-edit", facts, "-o", tmp_path / "plain", *common)
    spread = cli("batch-edit", facts, "-o", tmp_path / "spread", "--device-map", "auto", *common)
    assert plain.returncode == 0, plain.stderr
    assert spread.returncode == 0, spread.stderr
    m = json.loads((tmp_path / "spread" / "manifest.json").read_text())
    assert m["layer_devices"] == {"1": "cpu", "2": "cpu"}
    a = (tmp_path / "plain" / "delta.safetensors").read_bytes()
    b = (tmp_path / "spread" / "delta.safetensors").read_bytes()
    assert a == b
