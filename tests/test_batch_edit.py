"""The edit stage end to end: exact algebra of the driver on a tiny model, a real edit of the embedded
model that changes the target and leaves an unrelated fact alone, revertible deltas, and bad input that
is refused before anything is computed or written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from covedit.pipeline.memit import run_memit
from covedit.pipeline.rome import run_rome
from covedit.pipeline.facts import Fact
from covedit.pipeline.hparams import TargetHParams
from covedit.pipeline.targets import block_outputs
from covedit.stats.corpus import CorpusSpec
from covedit.stats.distributed import StatsJob, build_stats

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "facts.jsonl"
FACTS = [Fact("a", "Eiffel Tower", "The {} is located in", "Rome"),
         Fact("b", "Louvre", "The {} is a museum in", "Berlin"),
         Fact("c", "Danielle Darrieux", "The mother tongue of {} is", "English")]
FAST = TargetHParams(steps=8, lr=0.05, clamp_norm_factor=10.0)


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def test_memit_keys_weigh_the_bare_prompt_half_and_merged_facts_are_listed(tiny):
    """MEMIT's default key average is compute_ks' (bare 1/2, prefixes 1/2 together), and facts that share a
    subject and target (one δ) are named in target_info["merged"]."""
    from covedit.pipeline.keys import compute_keys
    templates = ["{}", "Hello there. {}", "Because of this, {}"]
    twin = Fact("a2", "Eiffel Tower", "Where is the {}? It is in", "Rome")
    facts = FACTS + [twin]
    out = run_memit(tiny, facts, [2], None, 1e-8, FAST, templates, lambda: 0.0)
    want = compute_keys(tiny, [2], [f.prompt for f in facts], [f.subject for f in facts], templates,
                        weights=[0.5, 0.25, 0.25])[2]
    torch.testing.assert_close(out.keys[2], want, rtol=0, atol=1e-6)
    assert out.target_info["merged"] == [["a", "a2"]]


def test_memit_single_layer_reaches_targets_exactly(tiny):
    """λ → 0, one layer, bare template: after the update the block output at every subject equals z."""
    layer = 2
    out = run_memit(tiny, FACTS, [layer], None, 1e-8, FAST, ["{}"], lambda: 0.0)
    after = block_outputs(tiny, FACTS, layer, 8)
    torch.testing.assert_close(after, out.z, rtol=1e-4, atol=1e-5)
    assert (out.z - block_outputs(tiny, FACTS, layer, 8)).abs().max() < 1e-4


def test_memit_spreads_over_layers_and_reaches_targets(tiny):
    """Two layers, λ → 0: bottom-up with recomputed residuals, the top layer still ends at z."""
    out = run_memit(tiny, FACTS, [1, 2], None, 1e-8, FAST, ["{}"], lambda: 0.0)
    torch.testing.assert_close(block_outputs(tiny, FACTS, 2, 8), out.z, rtol=1e-4, atol=1e-5)
    assert set(out.factors) == {1, 2} and all(u.shape[1] == 3 for u, _ in out.factors.values())
    assert out.target_info["realised"] == pytest.approx([1.0] * 3, abs=1e-3)


def test_realised_share_falls_with_lambda(tiny):
    """A large λ keeps the update near zero: the targets are barely written, and the share says so."""
    originals = tiny.down_weight(2).detach().clone()
    exact = run_memit(tiny, FACTS, [2], None, 1e-8, FAST, ["{}"], lambda: 0.0).target_info["realised"]
    with torch.no_grad():
        tiny.down_weight(2).copy_(originals)
    damped = run_memit(tiny, FACTS, [2], None, 1e6, FAST, ["{}"], lambda: 0.0).target_info["realised"]
    assert all(abs(r - 1) < 1e-3 for r in exact) and all(0 <= r < 0.5 for r in damped)


def test_rome_with_covariance_leaves_c_orthogonal_inputs_alone(tiny):
    torch.manual_seed(0)
    layer = 1
    W0 = tiny.down_weight(layer).detach().double().clone()
    A = torch.randn(tiny.d_ff, tiny.d_ff, dtype=torch.float64)
    C = A @ A.T / tiny.d_ff + torch.eye(tiny.d_ff, dtype=torch.float64)
    out = run_rome(tiny, FACTS[:1], layer, C, FAST, ["{}"], lambda: 0.0)
    W1 = tiny.down_weight(layer).detach().double()
    k = out.keys[layer][0].double()
    x = torch.randn(tiny.d_ff, dtype=torch.float64)
    u = torch.linalg.solve(C, k)
    x = x - (x @ u) / (k @ u) * k  # now xᵀ C⁻¹ k = 0
    assert abs(float(x @ torch.linalg.solve(C, k))) < 1e-10
    torch.testing.assert_close(W1 @ x, W0 @ x, rtol=1e-5, atol=1e-6)  # float32 weights


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


def test_bad_facts_exit_65_and_nothing_written(tmp_path, smol_stats):
    facts = tmp_path / "bad.jsonl"
    facts.write_text('{"subject": "X", "prompt": "no placeholder", "target_new": "Y"}\n{"subject": "Z"\n')
    out = tmp_path / "out"
    res = cli("batch-edit", facts, "-o", out, "--stats-dir", smol_stats)
    assert res.returncode == 65
    assert "line 1" in res.stderr and "line 2" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_missing_statistics_names_the_command(tmp_path):
    res = cli("batch-edit", EXAMPLE, "-o", tmp_path / "out", "--stats-dir", tmp_path / "empty")
    assert res.returncode == 66
    assert "covedit build-stats --model smollm2-135m --layers 4,5,6,7,8" in res.stderr
    assert not (tmp_path / "out").exists()


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


def test_existing_output_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("batch-edit", EXAMPLE, "-o", out, "--covariance", "identity")
    assert res.returncode == 73 and (out / "keep.txt").read_text() == "mine"


def test_identity_baseline_needs_no_statistics(tmp_path):
    out = tmp_path / "plain"
    facts = tmp_path / "one.jsonl"
    facts.write_text(EXAMPLE.read_text().splitlines()[0] + "\n")
    res = cli("batch-edit", facts, "-o", out, "--method", "rome", "--covariance", "identity", "--no-eval",
              "--stats-dir", tmp_path / "none", "--set", "target.steps=5")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hparams"]["covariance"] == "identity" and manifest["stats"] is None


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
    assert m1["alphaedit_carried_keys"] == {"1": 2, "2": 2, "3": 2}
    assert m2["alphaedit_carried_keys"] == {"1": 3, "2": 3, "3": 3}
    assert m2["original_model_id"] == m1["original_model_id"] and m2["stats"]["path"] == m1["stats"]["path"]
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "e2" / "alphaedit_keys.safetensors"))
    assert keys["layer.2.keys"].shape == (3, 32)


def test_memit_with_given_targets_equals_memit_computing_them(tiny):
    """The locality study hands every method the same targets: that must be exactly MEMIT's own run."""
    from covedit.pipeline.targets import compute_targets

    originals = {layer: tiny.down_weight(layer).detach().clone() for layer in (1, 2)}
    own = run_memit(tiny, FACTS, [1, 2], None, 0.5, FAST, ["{}"], lambda: 0.0)
    with torch.no_grad():
        for layer, W in originals.items():
            tiny.down_weight(layer).copy_(W)
    targets = compute_targets(tiny, FACTS, 2, FAST, ["{}"])
    given = run_memit(tiny, FACTS, [1, 2], None, 0.5, FAST, ["{}"], lambda: 0.0, targets=targets)
    for layer in (1, 2):
        for a, b in zip(own.factors[layer], given.factors[layer]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert given.timings["targets_s"] == 0.0


def test_rome_with_given_targets_reaches_each_target_in_sequence(tiny):
    """ROME fed precomputed z (bare template, no covariance): after all edits each fact's block output is at
    its z, because each rank-one update aims at z from wherever the earlier edits left h."""
    from covedit.pipeline.targets import compute_targets

    layer = 2
    targets = compute_targets(tiny, FACTS[:1], layer, FAST, ["{}"])
    run_rome(tiny, FACTS[:1], layer, None, FAST, ["{}"], lambda: 0.0, targets=targets)
    torch.testing.assert_close(block_outputs(tiny, FACTS[:1], layer, 8), targets.z, rtol=1e-4, atol=1e-5)


def test_target_results_select_and_concat_round_trip(tiny):
    from covedit.pipeline.targets import TargetResult, compute_targets

    t = compute_targets(tiny, FACTS, 2, FAST, ["{}"])
    back = TargetResult.concat([t.select([0]), t.select([1, 2])])
    for name in ("z", "h", "nll_before", "nll_after", "steps_taken"):
        assert torch.equal(getattr(back, name), getattr(t, name))


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


def test_keys_from_prompt_writes_the_target_exactly_at_the_bare_prompt(tiny):
    """λ → 0, one layer, context templates: with keys averaged over the templates the bare prompt's block
    output misses z (its key is not the average); with the bare prompt's own key it is z."""
    from covedit.pipeline.targets import compute_targets

    templates = ["{}", "Hello there. {}", "Because of this, {}"]
    targets = compute_targets(tiny, FACTS, 2, FAST, templates)
    originals = tiny.down_weight(2).detach().clone()
    averaged = run_memit(tiny, FACTS, [2], None, 1e-8, FAST, templates, lambda: 0.0, targets=targets)
    with torch.no_grad():
        tiny.down_weight(2).copy_(originals)
    own = run_memit(tiny, FACTS, [2], None, 1e-8, FAST, templates, lambda: 0.0, targets=targets, keys_from="prompt")
    torch.testing.assert_close(block_outputs(tiny, FACTS, 2, 8), targets.z, rtol=1e-4, atol=1e-5)
    assert own.target_info["realised"] == pytest.approx([1.0] * 3, abs=1e-3)
    assert max(averaged.target_info["realised"]) < 0.999


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


def test_no_eval_says_nothing_was_checked(tiny_dir, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome"}) + "\n")
    res = cli("batch-edit", facts, "--model", tiny_dir, "--covariance", "identity", "--set", "target.steps=2",
              "--no-eval", "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "nothing checked that the edited model still works" in res.stdout


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
