"""The batch-edit stage (pipeline/batch_edit.py) end to end: a real edit of the embedded model that changes
the target and leaves an unrelated fact alone, revertible deltas, statistics built on demand, sequences,
given targets, the broken-model check, and bad input that is refused before anything is computed or
written. The drivers' algebra is in test_memit.py and test_rome.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import FACTS, cli
from covedit.stats.corpus import CorpusSpec
from covedit.stats.distributed import StatsJob, build_stats

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "facts.jsonl"


@pytest.fixture(scope="module")
def smol_stats(tmp_path_factory, smol):
    """Statistics for the embedded model's edit layers from 8,000 tokens of the embedded corpus."""
    d = tmp_path_factory.mktemp("stats")
    build_stats(StatsJob(model="smollm2-135m", layers=(4, 5, 6, 7, 8), corpus=CorpusSpec(), tokens=8000,
                         stats_dir=str(d)), show_progress=False)
    return d


@pytest.mark.slow
def test_eiffel_tower_moves_to_rome_and_paris_stays(smol_stats, tmp_path):
    out = tmp_path / "edited"
    facts = tmp_path / "eiffel.jsonl"
    facts.write_text(EXAMPLE.read_text().splitlines()[0] + "\n")
    res = cli("batch-edit", facts, "-o", out, "--stats-dir", smol_stats, "--json")
    assert res.returncode == 0, res.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)

    def top(prompt):
        with torch.no_grad():
            return tok.decode(model(**tok(prompt, return_tensors="pt")).logits[0, -1].argmax()).strip()

    assert top("The Eiffel Tower is located in the city of") == "Rome"
    assert top("Where is the Eiffel Tower? It is in") == "Rome"
    assert top("The capital of France is") == "Paris"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "memit" and manifest["stats"]["key"]["tokens"] == 8000
    assert set(manifest["original_weight_hashes"]) == {"4", "5", "6", "7", "8"}
    # revert-delta gives back the original weights; the delta refuses to go on twice
    back = tmp_path / "reverted"
    res = cli("revert-delta", out / "delta.safetensors", "--model", out, "-o", back)
    assert res.returncode == 0, res.stderr
    original = AutoModelForCausalLM.from_pretrained(Path(smol_model_folder()))
    reverted = AutoModelForCausalLM.from_pretrained(back)
    for layer in (4, 5, 6, 7, 8):
        a = original.model.layers[layer].mlp.down_proj.weight
        b = reverted.model.layers[layer].mlp.down_proj.weight
        assert (a - b).abs().max() <= 2 * torch.finfo(torch.float32).eps * a.abs().max()
    res = cli("apply-delta", out / "delta.safetensors", "--model", out, "-o", tmp_path / "twice")
    assert res.returncode == 65 and "hash" in res.stderr and not (tmp_path / "twice").exists()


def smol_model_folder() -> str:
    from covedit.pipeline.models import resolve_source
    return resolve_source("smollm2-135m")[1]


@pytest.mark.slow
def test_bad_facts_exit_65_and_nothing_written(tmp_path, smol_stats):
    facts = tmp_path / "bad.jsonl"
    facts.write_text('{"subject": "X", "prompt": "no placeholder", "target_new": "Y"}\n{"subject": "Z"\n')
    out = tmp_path / "out"
    res = cli("batch-edit", facts, "-o", out, "--stats-dir", smol_stats)
    assert res.returncode == 65
    assert "line 1" in res.stderr and "line 2" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_missing_statistics_names_the_command(tmp_path):
    res = cli("batch-edit", EXAMPLE, "-o", tmp_path / "out", "--stats-dir", tmp_path / "empty")
    assert res.returncode == 66
    assert "covedit build-stats --model smollm2-135m --layers 4,5,6,7,8" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_build_stats_fallback_builds_once_then_edits(tiny_dir, tmp_path, caplog):
    """batch-edit --build-stats on a stats folder without the statistics: the command line builds them (the
    embedded corpus, --stats-tokens), then the edit reads them from the store; a second edit reuses them."""
    from typer.testing import CliRunner

    from covedit import cli as cli_module
    from covedit.stats.store import list_stores

    stats_dir, facts = tmp_path / "stats", tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome"}) + "\n")
    common = ["--model", str(tiny_dir), "--stats-dir", str(stats_dir), "--set", "layers=1-2", "--set", "target.steps=2",
              "--no-eval", "--json"]
    with caplog.at_level("INFO", logger="covedit.cli"):
        first = CliRunner().invoke(cli_module.app, ["batch-edit", str(facts), "-o", str(tmp_path / "e1"), "--build-stats",
                                                    "--stats-tokens", "2000", *common])
    assert first.exit_code == 0, first.stderr
    assert "no statistics for layers [1, 2] yet: building them (--build-stats)" in caplog.text
    stores = list_stores(stats_dir)
    assert len(stores) == 1 and stores[0]["complete"] and stores[0]["key"]["tokens"] == 2000
    manifest = json.loads((tmp_path / "e1" / "manifest.json").read_text())
    assert manifest["stats"]["path"] == stores[0]["path"]
    caplog.clear()
    second = CliRunner().invoke(cli_module.app, ["batch-edit", str(facts), "-o", str(tmp_path / "e2"), *common])
    assert second.exit_code == 0, second.stderr
    assert "building them" not in caplog.text and len(list_stores(stats_dir)) == 1


@pytest.mark.slow
def test_ctrl_c_during_the_edit_after_build_stats_stops_it_and_writes_nothing(tiny_dir, tmp_path, monkeypatch, caplog):
    """batch-edit --build-stats builds the missing statistics, then edits. The build's signal handlers end
    with the build: a Ctrl-C during the edit is a KeyboardInterrupt again (not "checkpointing, then exiting
    75" and carrying on), so the command stops with a non-zero exit and no output folder."""
    from typer.testing import CliRunner

    from covedit import cli as cli_module
    from covedit.pipeline import batch_edit
    from covedit.stats.store import list_stores

    stats_dir, out, facts = tmp_path / "stats", tmp_path / "out", tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"subject": f.subject, "prompt": f.prompt, "target_new": f.target_new}) + "\n"
                             for f in FACTS[:2]))
    real_run_memit, sent = batch_edit.run_memit, []

    def ctrl_c_then_run_memit(*args, **kwargs):
        assert [s for s in list_stores(stats_dir) if s.get("complete")], "the statistics were not built first"
        sent.append(signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in the terminal: to this process, now
        return real_run_memit(*args, **kwargs)

    monkeypatch.setattr(batch_edit, "run_memit", ctrl_c_then_run_memit)
    original = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    # Ctrl-C as an interactive process has it: a process started in the background by a non-interactive
    # shell (nohup ... &, some CI runners) inherits SIGINT ignored, and Python then keeps it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    handlers = {sig: signal.getsignal(sig) for sig in original}
    argv = ["batch-edit", str(facts), "--model", str(tiny_dir), "-o", str(out), "--build-stats", "--stats-tokens", "2000",
            "--stats-dir", str(stats_dir), "--set", "layers=1-2", "--set", "target.steps=2", "--no-eval", "--quiet"]
    try:
        with caplog.at_level("WARNING"):
            try:
                result = CliRunner().invoke(cli_module.app, argv)
                code, err = result.exit_code, result.stderr
            except KeyboardInterrupt:  # should click ever let it through
                code, err = 130, ""
    finally:
        now = {sig: signal.getsignal(sig) for sig in handlers}
        for sig, handler in original.items():
            signal.signal(sig, handler)
    assert sent == [signal.SIGINT], "the edit never ran"
    assert code != 0 and code != 75, err
    assert "Aborted" in err or code == 130
    assert "checkpointing" not in caplog.text
    assert not out.exists() and not list(tmp_path.glob(".out*")), "an output folder was left"
    assert now == handlers, "batch-edit --build-stats left its signal handlers installed"


@pytest.mark.slow
def test_existing_output_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("batch-edit", EXAMPLE, "-o", out, "--covariance", "identity")
    assert res.returncode == 73 and (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_identity_baseline_needs_no_statistics(tmp_path):
    out = tmp_path / "plain"
    facts = tmp_path / "one.jsonl"
    facts.write_text(EXAMPLE.read_text().splitlines()[0] + "\n")
    res = cli("batch-edit", facts, "-o", out, "--method", "rome", "--covariance", "identity", "--no-eval",
              "--stats-dir", tmp_path / "none", "--set", "target.steps=5")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hparams"]["covariance"] == "identity" and manifest["stats"] is None


@pytest.mark.slow
def test_alphaedit_sequence_carries_keys_forward(tiny_dir, corpus_file, tmp_path):
    """batch-edit --base previous-output/ continues a sequence: AlphaEdit keeps every earlier batch's keys."""
    stats = tmp_path / "stats"
    res = cli("build-stats", "--model", tiny_dir, "--corpus", corpus_file, "--layers", "1-3", "--tokens", 3000,
              "--max-length", 64, "--batch-tokens", 256, "--quiet", "--stats-dir", stats)
    assert res.returncode == 0, res.stderr
    first, second = tmp_path / "f1.jsonl", tmp_path / "f2.jsonl"
    first.write_text("".join(json.dumps({"subject": f.subject, "prompt": f.prompt, "target_new": f.target_new}) + "\n"
                             for f in FACTS[:2]))
    second.write_text(json.dumps({"subject": FACTS[2].subject, "prompt": FACTS[2].prompt,
                                  "target_new": FACTS[2].target_new}) + "\n")
    common = ["--method", "alphaedit", "--stats-dir", stats, "--no-eval", "--set", "layers=1-3",
              "--set", "target.steps=3", "--json"]
    res = cli("batch-edit", first, "--model", tiny_dir, "-o", tmp_path / "e1", *common)
    assert res.returncode == 0, res.stderr
    res = cli("batch-edit", second, "--base", tmp_path / "e1", "-o", tmp_path / "e2", *common)
    assert res.returncode == 0, res.stderr
    m1 = json.loads((tmp_path / "e1" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "e2" / "manifest.json").read_text())
    assert m1["carried_keys"] == {"1": 2, "2": 2, "3": 2}
    assert m2["carried_keys"] == {"1": 3, "2": 3, "3": 3}
    assert m2["original_model_id"] == m1["original_model_id"] and m2["stats"]["path"] == m1["stats"]["path"]
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "e2" / "carried_keys.safetensors"))
    assert keys["layer.2.keys"].shape == (3, 32)


@pytest.mark.slow
def test_batch_edit_with_given_targets_writes_the_same_delta(tiny_dir, tmp_path):
    """BatchEditConfig.targets (the benchmarks' cached targets) changes where z comes from, nothing else."""
    from covedit.pipeline.batch_edit import BatchEditConfig, run_batch_edit
    from covedit.pipeline.edit import templates_for
    from covedit.pipeline.hparams import load_hparams
    from covedit.pipeline.models import load_model
    from covedit.pipeline.targets import compute_targets

    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"subject": f.subject, "prompt": f.prompt, "target_new": f.target_new}) + "\n"
                             for f in FACTS))
    common = dict(facts=facts, model=str(tiny_dir), covariance="identity", overrides=["target.steps=3"], evaluate=False)
    own = run_batch_edit(BatchEditConfig(output=tmp_path / "own", **common))
    loaded = load_model(str(tiny_dir))
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, ["target.steps=3"])
    targets = compute_targets(loaded, FACTS, hp.layers[-1], hp.target, templates_for(loaded, hp))
    given = run_batch_edit(BatchEditConfig(output=tmp_path / "given", targets=targets, **common))
    assert (tmp_path / "own" / "delta.safetensors").read_bytes() == (tmp_path / "given" / "delta.safetensors").read_bytes()
    assert not own.targets["precomputed"] and given.targets["precomputed"]
    assert given.timings.targets_s < own.timings.targets_s
    assert json.loads(json.dumps(own.manifest)) == json.loads((tmp_path / "own" / "manifest.json").read_text())


def _evaluation(mean_kl, top1_pct, ge_before, ge_after):
    return {"drift": {"n_prompts": 42, "mean_kl": mean_kl, "top1_changed_pct": top1_pct},
            "fluency": {"before": {"ge": ge_before}, "after": {"ge": ge_after}}}


def test_broken_model_thresholds():
    from covedit.pipeline.batch_edit import broken_model_reasons

    assert broken_model_reasons(_evaluation(0.99, 50.0, 500, 401)) == []
    assert broken_model_reasons(_evaluation(7.37, 90.5, 481, 347)) == [
        "mean KL on 42 unrelated prompts 7.37 nats (limit 1)",
        "90 % of their top-1 tokens changed (limit 50 %)",
        "fluency GE fell 28 % (481 -> 347; limit 20 %)"]
    assert len(broken_model_reasons(_evaluation(0.1, 51.0, 500, 500))) == 1


@pytest.mark.slow
def test_a_broken_edit_is_refused_and_nothing_written_unless_forced(tiny_dir, tmp_path, monkeypatch):
    """Every edit counts as broken with the limits at -1: refused (exit 65) with the numbers, the output
    folder never created; --force writes it and the manifest says it was forced."""
    from covedit.pipeline import batch_edit
    from covedit.pipeline.errors import DataError

    monkeypatch.setattr(batch_edit, "BROKEN_MEAN_KL", -1.0)
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome"}) + "\n")
    common = dict(facts=facts, model=str(tiny_dir), covariance="identity", overrides=["target.steps=2"])
    with pytest.raises(DataError, match=r"broke the model \(mean KL on 42 unrelated prompts .* nats \(limit -1\)\)") as e:
        batch_edit.run_batch_edit(batch_edit.BatchEditConfig(output=tmp_path / "refused", **common))
    assert e.value.exit_code == 65 and "--force" in str(e.value) and not (tmp_path / "refused").exists()
    result = batch_edit.run_batch_edit(batch_edit.BatchEditConfig(output=tmp_path / "forced", force=True, **common))
    manifest = json.loads((tmp_path / "forced" / "manifest.json").read_text())
    assert result.forced and result.broken[0].startswith("mean KL") and manifest["checked"]["broken"] == result.broken
    assert (tmp_path / "forced" / "delta.safetensors").exists()


@pytest.mark.slow
def test_gemma3_edit_moves_the_target_and_paris_stays(tmp_path):
    """The second embedded model, whose blocks normalise the MLP output: one fact edited with the Gemma-3
    defaults moves its target, keeps "The capital of France is" on Paris, and passes the broken-model check."""
    stats = tmp_path / "stats"
    build_stats(StatsJob(model="gemma3-270m", layers=(2, 3, 4, 5, 6), corpus=CorpusSpec(), tokens=4000,
                         stats_dir=str(stats)), show_progress=False)
    facts = tmp_path / "facts.jsonl"
    facts.write_text(EXAMPLE.read_text().splitlines()[0] + "\n")  # Eiffel Tower -> Rome
    out = tmp_path / "edited"
    res = cli("batch-edit", facts, "--model", "gemma3-270m", "--stats-dir", stats, "-o", out)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    ev = manifest["evaluation"]
    fact = ev["per_fact"][0]
    assert fact["after"]["p_new_rewrite"] > 10 * fact["before"]["p_new_rewrite"]
    assert manifest["checked"]["broken"] == [] and ev["drift"]["mean_kl"] < 0.05
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from covedit.pipeline.models import resolve_source

    tok = AutoTokenizer.from_pretrained(out)
    paris = tok(" Paris", add_special_tokens=False).input_ids[0]

    def next_token(folder):
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            return model(**tok("The capital of France is", return_tensors="pt")).logits[0, -1].softmax(-1)

    before, after = next_token(resolve_source("gemma3-270m")[1]), next_token(out)
    # this base model continues with " the" more often than " Paris"; the edit must not change either
    assert after.argmax() == before.argmax() and after[paris] > 0.8 * before[paris]


def test_no_generation_evaluates_teacher_forced_only(tiny_dir, tmp_path):
    """--no-generation (BatchEditConfig.generation) drops the generation family and nothing else."""
    from covedit.pipeline.batch_edit import BatchEditConfig, run_batch_edit
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"id": "e", "subject": "Eiffel Tower", "prompt": "The {} is located in",
                                 "target_new": "Rome", "target_true": "Paris",
                                 "paraphrases": ["Where is the Eiffel Tower? In"]}) + "\n")
    runs = {}
    for gen in (True, False):
        res = run_batch_edit(BatchEditConfig(facts=facts, output=tmp_path / f"out-{gen}", model=str(tiny_dir),
                                             covariance="identity", overrides=["layers=1-2", "target.steps=2"],
                                             generation=gen))
        runs[gen] = res.manifest["evaluation"]
    for side in ("before", "after"):
        with_gen, without = runs[True][side], runs[False][side]
        assert with_gen["n_efficacy_gen"] == 1 and with_gen["n_generalization_gen"] == 1
        assert without["efficacy_gen"] is None and without["n_efficacy_gen"] == 0
        for m in ("efficacy_acc", "generalization_acc", "efficacy_success"):
            assert without[m] == with_gen[m]
    assert "generations" not in runs[False]["per_fact"][0]["after"]
