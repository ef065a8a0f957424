"""The command line itself (cli.py): option values read or refused with one sentence and exit code 2, every
error mapped to its exit code (internal errors keep their traceback), the --json output's shape, and what
the commands print. What a command computes is tested with its module (test_batch_edit.py,
test_build_stats.py, test_evaluate.py, ...)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import cli
from covedit import cli as cli_module
from covedit.cli import _evaluation_brief, parse_checkpoint_every, parse_layers, parse_shard
from covedit.pipeline.errors import (EXIT_CODES, CannotWrite, DataError, Interrupted, MissingInput, StoreConflict,
                                     UsageError)

ONE_THREAD = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}  # tiny models: one thread is quicker


def invoke(argv: list) -> tuple[int, str, str]:
    """The command line in this process: (exit code, stdout, stderr); an internal error is raised."""
    result = CliRunner().invoke(cli_module.app, [str(a) for a in argv])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# -------------------------------------------------------------------------------------- option values

def test_layers_are_lists_and_ranges_and_anything_else_is_refused():
    assert parse_layers("2,4-6") == [2, 4, 5, 6]
    assert parse_layers(" 7 - 8 ,3,7") == [3, 7, 8]  # sorted, each once
    assert parse_layers(None) is None and parse_layers("") is None  # the command's default layers
    with pytest.raises(UsageError, match=r"^--layers: cannot read '4\.5'; use e\.g\. 3,4,5 or 3-7\.$"):
        parse_layers("3,4.5")
    with pytest.raises(UsageError, match=r"^--layers: range '7-3' runs backwards\.$"):
        parse_layers("7-3")


def test_checkpoint_every_is_a_token_count_or_a_time():
    assert parse_checkpoint_every("200000") == (200000, None)
    assert parse_checkpoint_every("300s") == (None, 300.0)
    assert parse_checkpoint_every("10m") == (None, 600.0)
    assert parse_checkpoint_every(" 1.5h ") == (None, 5400.0)
    with pytest.raises(UsageError, match="cannot read '10d'"):
        parse_checkpoint_every("10d")
    with pytest.raises(UsageError, match="must be positive"):
        parse_checkpoint_every("0m")


def test_shard_is_i_of_n():
    assert parse_shard("0/4") == (0, 4) and parse_shard(" 3/4 ") == (3, 4) and parse_shard(None) is None
    for bad in ("4/4", "1of4", "-1/4"):
        with pytest.raises(UsageError, match="--shard must be I/N with 0 <= I < N"):
            parse_shard(bad)


@pytest.mark.parametrize("argv,message", [
    (["batch-edit", "f.jsonl", "--method", "lora"], "--method must be memit, rome or alphaedit."),
    (["batch-edit", "f.jsonl", "--covariance", "diagonal"], "--covariance must be C or identity."),
    (["batch-edit", "f.jsonl", "--device-map", "everywhere"],
     "--device-map must be auto, balanced, balanced_low_0 or sequential."),
    (["batch-edit", "f.jsonl", "--no-eval", "--report", "r"], "--report needs the before/after evaluation: drop --no-eval."),
    (["build-stats", "--tokens", "0"], "--tokens must be a positive number of tokens."),
    (["build-stats", "--max-length", "1"], "--max-length must be at least 2."),
    (["build-stats", "--bos", "always"], "--bos must be 'skip' or 'keep', not 'always'."),
    (["build-stats", "--accumulate", "float16"], "--accumulate must be mixed, float64 or float32."),
    (["build-stats", "--checkpoint-every", "10d"],
     "--checkpoint-every: cannot read '10d'; use a token count (200000) or a time (300s, 10m)."),
    (["build-stats", "--layers", "7-3"], "--layers: range '7-3' runs backwards."),
])
def test_a_bad_option_value_is_one_sentence_and_exit_2_before_any_work(argv, message, tmp_path, monkeypatch):
    """Refused before a model is loaded or anything is written: one line on stderr, nothing on stdout."""
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke(argv)
    assert (code, out, err) == (2, "", f"covedit: error: {message}\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [UsageError, DataError, MissingInput, CannotWrite, Interrupted, StoreConflict])
def test_each_user_error_exits_with_its_own_code(error, monkeypatch, tmp_path):
    """Whatever the pipeline raises as a CoveditError becomes "covedit: error: <sentence>" and its exit code,
    which --help's table lists; anything else is an internal error and keeps its traceback."""
    from covedit.pipeline import batch_edit

    def fail(cfg):
        raise error("One sentence about it.")

    monkeypatch.setattr(batch_edit, "run_batch_edit", fail)
    code, out, err = invoke(["batch-edit", tmp_path / "f.jsonl", "-o", tmp_path / "out"])
    assert (code, out, err) == (error.exit_code, "", "covedit: error: One sentence about it.\n")
    assert code in EXIT_CODES and code not in (0, 1)


def test_an_internal_error_keeps_its_traceback(monkeypatch, tmp_path):
    from covedit.pipeline import batch_edit

    def fail(cfg):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(batch_edit, "run_batch_edit", fail)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        invoke(["batch-edit", tmp_path / "f.jsonl"])


# --------------------------------------------------------------------------------------------- --json

def test_evaluation_brief_drops_the_detail_manifest_json_keeps():
    """batch-edit --json prints the evaluation without per-fact rows, per-prompt drift and generated texts."""
    ev = {"before": {"efficacy_success": 0.0}, "after": {"efficacy_success": 100.0}, "reference_cached": False,
          "drift": {"n_prompts": 2, "mean_kl": 0.5, "per_prompt": [{"kl": 0.4}, {"kl": 0.6}]},
          "fluency": {"before": {"ge": 600.0, "n_prompts": 1, "generations": [{"prompt": "a"}]}, "after": None},
          "per_fact": [{"id": "a"}]}
    assert _evaluation_brief(ev) == {"before": {"efficacy_success": 0.0}, "after": {"efficacy_success": 100.0},
                                     "drift": {"n_prompts": 2, "mean_kl": 0.5},
                                     "fluency": {"before": {"ge": 600.0, "n_prompts": 1}}}
    assert _evaluation_brief(None) is None and _evaluation_brief({}) is None


@pytest.mark.slow
def test_batch_edit_json_is_the_manifest_with_the_brief_evaluation(tiny_dir, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome"}) + "\n")
    code, out, err = invoke(["batch-edit", facts, "--model", tiny_dir, "-o", tmp_path / "e", "--covariance", "identity",
                             "--set", "target.steps=2", "--force", "--json"])
    assert code == 0, err
    printed = json.loads(out)  # the whole of stdout is one JSON document
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert {k: v for k, v in printed.items() if k != "evaluation"} == {k: v for k, v in manifest.items() if k != "evaluation"}
    assert printed["evaluation"] == json.loads(json.dumps(_evaluation_brief(manifest["evaluation"])))
    assert set(printed["evaluation"]) == {"before", "after", "drift", "fluency"}
    assert "per_prompt" not in printed["evaluation"]["drift"] and printed["evaluation"]["drift"]["n_prompts"] == 42


# ------------------------------------------------------------------------------------- commands end to end

@pytest.mark.slow
def test_unknown_device_map_is_a_usage_error(tiny_dir, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "Eiffel Tower", "prompt": "The {} is located in",
                                 "target_new": "Rome"}) + "\n")
    res = cli("batch-edit", facts, "-o", tmp_path / "out", "--model", tiny_dir, "--device-map", "everywhere")
    assert res.returncode == 2 and "--device-map" in res.stderr and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_dir):
    """The shared tiny llama folder (conftest) and a facts file mixing our schema and a zsRE record."""
    facts = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "eiffel", "subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome",
         "target_true": "Paris", "paraphrases": ["The Eiffel Tower stands in"]},
        {"src": "What university did Watts Humphrey attend?", "subject": "Watts Humphrey",
         "answers": ["Illinois Institute of Technology"], "rephrase": "Where did Watts Humphrey study?",
         "loc": "nq question: who sings the song", "loc_ans": "Elvis"}]) + "\n")
    return tiny_dir, facts


@pytest.mark.slow
def test_cli_evaluate_and_probe_on_a_saved_tiny_model(tiny_folder, tmp_path):
    model, facts = tiny_folder
    r = cli("evaluate", "--model", model, "--base-model", model, "--facts", facts, "--report", tmp_path / "rep",
            "--fluency-tokens", 8, "-q", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "drift on 42 unrelated prompts: mean KL 0 nats, top-1 token changed on 0.0 %" in r.stdout
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["drift"]["mean_kl"] == 0.0 and data["after"]["aggregate"]["n_efficacy_success"] == 1
    r = cli("probe", facts, "--model", model, "--json", "-q", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["checked"] for x in rows] == ["target_true", "target_new"]
    r = cli("probe", facts, "--model", model, "-q", env=ONE_THREAD)
    assert r.returncode == 0 and "zsRE records target_new is the true answer" in r.stdout


@pytest.mark.slow
def test_cli_evaluate_missing_model_exits_66(tmp_path):
    r = cli("evaluate", "--model", tmp_path / "no-such-model", "-q", env=ONE_THREAD)
    assert r.returncode == 66 and "error" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------- what the command prints

@pytest.mark.slow
def test_no_eval_says_nothing_was_checked(tiny_dir, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome"}) + "\n")
    res = cli("batch-edit", facts, "--model", tiny_dir, "--covariance", "identity", "--set", "target.steps=2",
              "--no-eval", "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "nothing checked that the edited model still works" in res.stdout


@pytest.mark.slow
def test_batch_edit_prints_what_it_did_on_the_tiny_model(tiny_dir, tmp_path):
    """The human-readable output of batch-edit: the timings line, the before/after table, where it wrote."""
    from typer.testing import CliRunner

    from covedit import cli as cli_module

    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome"}) + "\n")
    res = CliRunner().invoke(cli_module.app, ["batch-edit", str(facts), "--model", str(tiny_dir), "-o", str(tmp_path / "e"),
                                              "--covariance", "identity", "--set", "target.steps=2", "--force"])
    assert res.exit_code == 0, res.stderr
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert f"edited 1 facts with memit at layers {manifest['layers']} in {manifest['timings']['edit_s']:.1f} s" in res.stdout
    assert "top-1 token accuracy   before" in res.stdout and "top-1 token accuracy   after" in res.stdout
    assert f"wrote {tmp_path / 'e'}/ (model, delta.safetensors, manifest.json)" in res.stdout
