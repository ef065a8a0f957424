"""Hyperparameters: published defaults per architecture, JSON/YAML files, --set overrides, clear refusals,
and a dict for the manifest that reads back to the same object."""

import json

import pytest

from covedit.pipeline.errors import DataError, MissingInput, UsageError
from covedit.pipeline.hparams import (AlphaEditHParams, MemitHParams, RomeHParams, TargetHParams, defaults_for,
                                      from_dict, load_hparams, to_dict)


def test_memit_defaults_for_the_embedded_llama():
    hp = defaults_for("memit", "llama", 30)
    assert isinstance(hp, MemitHParams)
    assert hp.layers == [4, 5, 6, 7, 8]
    assert hp.lam == 1500.0  # published 15,000 swamps SmolLM2's small keys
    assert hp.covariance == "C" and hp.keys_from == "templates"
    # μ 0.1: the edited prompts' other tokens kept (chosen at 1,000 tuning facts, confirmed held out)
    assert hp.preserve_prompts == 0.1 and hp.preserve_relation == 0.0 and hp.preserve_earlier == 1.0
    # lr 2 for 15 passes: the step rule chosen on SmolLM2 (hparams.ARCH_DEFAULTS), else the published values
    assert hp.target == TargetHParams(steps=15, lr=2.0, kl_factor=0.0625, weight_decay=0.5,
                                      clamp_norm_factor=0.75, early_stop_loss=0.05)


def test_unlisted_architecture_gets_the_published_values():
    hp = defaults_for("memit", "phi3", 32)
    assert hp.lam == 15000.0 and hp.target.steps == 25 and hp.target.clamp_norm_factor == 0.75


def test_per_architecture_adjustments():
    gpt2 = defaults_for("memit", "gpt2", 48)
    assert gpt2.lam == 20000.0 and gpt2.target.steps == 20
    qwen = defaults_for("memit", "qwen2", 28)
    assert qwen.target.clamp_norm_factor == 4.0 and qwen.target.weight_decay == 1e-3 and qwen.lam == 15000.0
    assert defaults_for("alphaedit", "qwen2", 28).alpha == 1.0
    gemma3 = defaults_for("memit", "gemma3_text", 18)  # behind a post-MLP norm: docs/gemma3.md
    assert gemma3.lam == 6000.0 and gemma3.target.clamp_norm_factor == 4.0 and gemma3.target.lr == 0.5
    assert gemma3.preserve_prompts == 0.0  # μ not measured on Gemma-3: the reference MEMIT's term alone
    assert defaults_for("memit", "phi3", 32).preserve_prompts == 0.0
    # the table for one architecture leaves the others alone
    assert defaults_for("memit", "mistral", 32).target.clamp_norm_factor == 0.75
    assert defaults_for("memit", "gemma2", 26).target.clamp_norm_factor == 0.75


def test_rome_and_alphaedit_defaults():
    rome = defaults_for("rome", "gptj", 28)
    assert isinstance(rome, RomeHParams)
    assert rome.layer == 5  # ROME's published layer on GPT-J
    assert rome.target.clamp_norm_factor == 4.0 and rome.target.steps == 20 and rome.target.weight_decay == 0.5
    assert rome.template_lengths == [5, 10]
    ae = defaults_for("alphaedit", "phi3", 32)
    assert isinstance(ae, AlphaEditHParams)
    assert (ae.layers, ae.null_space_threshold, ae.alpha, ae.target.lr) == ([4, 5, 6, 7, 8], 2e-2, 10.0, 0.1)


def test_unknown_method_is_usage_error():
    with pytest.raises(UsageError, match="'nope'"):
        defaults_for("nope", "llama", 30)


def test_json_file_with_nested_target(tmp_path):
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"layers": [2, 3], "lam": 200, "target": {"lr": 0.2, "steps": 10}}))
    hp = load_hparams("memit", "llama", 30, path, [])
    assert hp.layers == [2, 3] and hp.lam == 200.0 and isinstance(hp.lam, float)
    assert hp.target.lr == 0.2 and hp.target.steps == 10
    assert hp.target.kl_factor == 0.0625  # untouched fields keep the defaults


def test_yaml_file_with_range_and_exponent_without_dot(tmp_path):
    path = tmp_path / "hp.yml"
    # PyYAML reads 2e-2 (no dot) as the string "2e-2"; it must still become a float
    path.write_text("layers: 6-8\nnull_space_threshold: 2e-2\nalpha: 1\ntarget:\n  clamp_norm_factor: 4\n")
    hp = load_hparams("alphaedit", "llama", 30, str(path), [])
    assert hp.layers == [6, 7, 8]
    assert hp.null_space_threshold == 0.02 and hp.alpha == 1.0 and hp.target.clamp_norm_factor == 4.0


def test_overrides_after_file(tmp_path):
    path = tmp_path / "hp.yaml"
    path.write_text("lam: 100\n")
    hp = load_hparams("memit", "llama", 30, path, ["target.lr=0.1", "lam=1500", "layers=3,4,5", "covariance=identity"])
    assert hp.target.lr == 0.1 and hp.lam == 1500.0 and hp.layers == [3, 4, 5] and hp.covariance == "identity"


@pytest.mark.parametrize("text,layers", [("3-7", [3, 4, 5, 6, 7]), ("[2, 9]", [2, 9]), ("1,3-4", [1, 3, 4]),
                                         ("7,5", [5, 7])])
def test_layer_override_forms(text, layers):
    assert load_hparams("memit", "llama", 30, None, [f"layers={text}"]).layers == layers


def test_rome_layer_override():
    assert load_hparams("rome", "llama", 30, None, ["layer=12", "target.steps=5"]).layer == 12


@pytest.mark.parametrize("override,named", [("target.lrr=1", "target.lrr"), ("foo=1", "foo"), ("lam.x=1", "lam.x"),
                                            ("layer=3", "layer")])
def test_unknown_key_names_it(override, named):
    with pytest.raises(UsageError, match=f"'{named}'"):
        load_hparams("memit", "llama", 30, None, [override])


def test_unknown_key_in_file_names_it(tmp_path):
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"target": {"v_lr": 0.5}}))
    with pytest.raises(UsageError, match="'target.v_lr'"):
        load_hparams("memit", "llama", 30, path, [])


@pytest.mark.parametrize("override,match", [("lam=abc", "lam must be a float"), ("target.steps=2.5", "target.steps must be an int"),
                                            ("layers=3-x", "layers must be integers"), ("target=3", "mapping"),
                                            ("covariance=diag", "covariance"), ("target.steps=0", "at least 1"),
                                            ("layers=4,4", "twice"), ("lam", "key=value"),
                                            ("keys_from=subject", "keys_from must be 'templates' or 'prompt'")])
def test_bad_values_are_usage_errors(override, match):
    with pytest.raises(UsageError, match=match):
        load_hparams("memit", "llama", 30, None, [override])


def test_layer_out_of_range():
    with pytest.raises(UsageError, match="Layer 30 is out of range"):
        load_hparams("memit", "llama", 30, None, ["layers=28-30"])


def test_file_problems(tmp_path):
    with pytest.raises(MissingInput):
        load_hparams("memit", "llama", 30, tmp_path / "absent.json", [])
    (tmp_path / "hp.toml").write_text("lam = 1\n")
    with pytest.raises(UsageError, match=r"\.json, \.yaml or \.yml"):
        load_hparams("memit", "llama", 30, tmp_path / "hp.toml", [])
    (tmp_path / "bad.json").write_text("{lam: 1")
    with pytest.raises(DataError, match="not valid JSON"):
        load_hparams("memit", "llama", 30, tmp_path / "bad.json", [])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(DataError, match="mapping"):
        load_hparams("memit", "llama", 30, tmp_path / "list.yaml", [])
    (tmp_path / "rome.json").write_text(json.dumps({"method": "rome", "layer": 3}))
    with pytest.raises(UsageError, match="rome"):
        load_hparams("memit", "llama", 30, tmp_path / "rome.json", [])


@pytest.mark.parametrize("method", ["memit", "rome", "alphaedit"])
def test_to_dict_round_trip(method, tmp_path):
    hp = load_hparams(method, "qwen2", 28, None, ["target.lr=0.25", "target.early_stop_loss=0.01"])
    data = to_dict(hp)
    assert data["method"] == method and data["target"]["lr"] == 0.25
    path = tmp_path / "hp.json"
    path.write_text(json.dumps(data))  # JSON-ready: plain types only
    assert from_dict(json.loads(path.read_text()), num_layers=28) == hp
    # a manifest's record also works as a hyperparameter file, on top of other defaults
    assert load_hparams(method, "gpt2", 28, path, []) == hp
