"""Edit histories on the tiny llama: three sequential batch-edit --base runs, their history, reverting any
batch (the middle one, all of them), refusing a tampered history, the sequence limits, and the edit exported
as a PEFT LoRA adapter that gives the edited model's logits on the base model and refuses any other."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_thread
from covedit.cli import app
from covedit.pipeline.batch_edit import BatchEditConfig, run_batch_edit
from covedit.pipeline.delta import layer_hashes, load_delta
from covedit.pipeline.errors import DataError, UsageError
from covedit.pipeline.evaluate import drift, next_token_logprobs
from covedit.pipeline.history import check_weights, read_carried_keys, read_history, revert_batches
from covedit.pipeline.models import load_model

LAYERS = [1, 2]
BATCHES = [
    [{"id": "eiffel", "subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome"},
     {"id": "louvre", "subject": "Louvre", "prompt": "The {} is a museum in", "target_new": "Berlin"}],
    [{"id": "darrieux", "subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English"}],
    [{"id": "jordan", "subject": "Michael Jordan", "prompt": "{} plays the sport of", "target_new": "soccer"}],
]
# identity covariance: no statistics needed; a small λ so the updates are far from rounding noise
COMMON = ["layers=1-2", "target.steps=3", "lam=0.05"]


def edit(facts: list[dict], out: Path, model: Path | None = None, base: Path | None = None, **kw):
    f = out.parent / f"{out.name}.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in facts))
    return run_batch_edit(BatchEditConfig(facts=f, output=out, model=str(model), base=base, covariance="identity",
                                          overrides=kw.pop("overrides", COMMON), evaluate=kw.pop("evaluate", False),
                                          **kw))


def weights(folder: Path) -> dict[int, torch.Tensor]:
    loaded = load_model(str(folder))
    return {layer: loaded.down_weight(layer).detach().double().clone() for layer in LAYERS}


@pytest.fixture(scope="module")
def origin(tmp_path_factory, tokenizer):
    """The tiny llama with its output head scaled up: a random tiny model's next-token distributions are so
    flat that an edit moves them less than float32 rounding, and drift would measure nothing."""
    from conftest import build_tiny

    d = tmp_path_factory.mktemp("origin")
    m = build_tiny("llama", tokenizer).model
    with torch.no_grad():
        m.lm_head.weight.mul_(100.0)
    m.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def seq(tmp_path_factory, origin):
    """e1, e2, e3: three batches in sequence (batch 2 evaluated), and the origin weights W0."""
    d = tmp_path_factory.mktemp("seq")
    with one_thread():  # set up before the per-test one_torch_thread
        edit(BATCHES[0], d / "e1", model=origin)
        edit(BATCHES[1], d / "e2", base=d / "e1", evaluate=True)
        edit(BATCHES[2], d / "e3", base=d / "e2")
    return {"dir": d, "W0": weights(origin), "origin": origin, **{f"e{i}": d / f"e{i}" for i in (1, 2, 3)}}


def dense(delta) -> dict[int, torch.Tensor]:
    return {ld.layer: ld.dense() for ld in delta.layers}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float32 rounding: a few units in the last place of the weights' scale."""
    torch.testing.assert_close(a, b, rtol=0, atol=4 * 2.0 ** -24 * float(b.abs().max()))


def test_history_records_every_batch(seq):
    hist = read_history(seq["e3"])
    assert [r["batch"] for r in hist.batches] == [1, 2, 3] and hist.active() == [1, 2, 3]
    assert [r["facts"]["n_facts"] for r in hist.batches] == [2, 1, 1]
    for r in hist.batches:
        assert r["method"] == "memit" and r["hparams"]["lam"] == 0.05 and r["stats"] is None and r["layers"] == LAYERS
        assert set(r["norm_growth"]) == {"1", "2"} and all(v > 0 for v in r["update_norms"].values())
        assert hist.facts_file(r["batch"]).read_text().count("\n") == r["facts"]["n_facts"]
    for prev, nxt in zip(hist.batches, hist.batches[1:]):  # each batch starts where the one before ended
        assert nxt["weight_hashes"]["before"] == prev["weight_hashes"]["after"]
    loaded = load_model(str(seq["e3"]))
    assert hist.data["weight_hashes"] == {str(k): v for k, v in layer_hashes(loaded, LAYERS).items()}
    assert hist.data["origin"]["weight_hashes"] == {str(k): v for k, v in
                                                    layer_hashes(load_model(str(seq["origin"])), LAYERS).items()}
    # norm growth is against the original weights, not the previous batch's
    for layer in LAYERS:
        want = float(loaded.down_weight(layer).double().norm() / seq["W0"][layer].norm())
        assert hist.batches[2]["norm_growth"][str(layer)] == pytest.approx(want, rel=1e-12)
    assert hist.batches[0]["evaluation"] is None and hist.batches[1]["evaluation"]["after"]["n_facts"] == 1
    # the batches' deltas add up to the edited model's weights
    total = {layer: seq["W0"][layer].clone() for layer in LAYERS}
    for n in (1, 2, 3):
        for layer, dw in dense(hist.delta(n)).items():
            total[layer] += dw
    for layer, W in weights(seq["e3"]).items():
        close(W, total[layer])
    res = CliRunner().invoke(app, ["history", str(seq["e3"])])
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[:3] for r in rows] == [["1", "applied", "memit"], ["2", "applied", "memit"], ["3", "applied", "memit"]]
    res = CliRunner().invoke(app, ["history", str(seq["e3"]), "--json"])
    assert json.loads(res.stdout)["batches"][2]["facts"]["sha256"] == hist.batches[2]["facts"]["sha256"]


def test_memit_sequence_carries_every_batchs_keys(seq, tmp_path):
    """Each MEMIT output holds every batch's keys so far (the earlier ones first, unchanged); a --base batch
    with the carried keys weighed in moves the earlier batch's keys' outputs far less than the reference MEMIT
    (preserve_earlier=0) does from the same base (the tiny model's keys are small against λ here, so the
    weight is raised to show it); a base written before the file's rename (alphaedit_keys.safetensors) is
    read the same as the new name."""
    from safetensors.torch import load_file

    keys = {name: load_file(str(seq[name] / "carried_keys.safetensors")) for name in ("e1", "e2", "e3")}
    assert [keys[name]["layer.2.keys"].shape[0] for name in ("e1", "e2", "e3")] == [2, 3, 4]
    assert torch.equal(keys["e2"]["layer.1.keys"][:2], keys["e1"]["layer.1.keys"])
    assert json.loads((seq["e2"] / "manifest.json").read_text())["carried_keys"] == {"1": 3, "2": 3}

    def moved(out: Path) -> float:  # how far batch 2's update moves batch 1's keys' outputs
        delta = dense(read_history(out).delta(2))
        return sum(float((delta[layer] @ keys["e1"][f"layer.{layer}.keys"].double().T).norm()) for layer in LAYERS)

    with one_thread():
        reference = edit(BATCHES[1], tmp_path / "ref", base=seq["e1"], overrides=COMMON + ["preserve_earlier=0"])
        edit(BATCHES[1], tmp_path / "kept", base=seq["e1"], overrides=COMMON + ["preserve_earlier=1e4"])
        old = tmp_path / "old-e1"
        shutil.copytree(seq["e1"], old)
        (old / "carried_keys.safetensors").rename(old / "alphaedit_keys.safetensors")
        renamed = edit(BATCHES[1], tmp_path / "renamed", base=old)
    assert "carried_keys" not in reference.manifest
    assert moved(tmp_path / "kept") < 0.1 * moved(tmp_path / "ref")
    assert moved(seq["e2"]) < moved(tmp_path / "ref")
    assert renamed.manifest["carried_keys"] == {"1": 3, "2": 3}
    for layer, dw in dense(read_history(tmp_path / "renamed").delta(2)).items():
        close(dw, dense(read_history(seq["e2"]).delta(2))[layer])


def test_keep_leaves_the_kept_facts_outputs_alone_and_carries_their_keys(seq, tmp_path):
    """batch-edit --keep FILE: the kept facts' keys join the preservation term, so the update moves their
    outputs far less (a small λ here, so that the kept keys weigh as much as the edited ones), they are carried to
    later batches with the batch's own keys, and the manifest names the file. A missing file or --method rome
    exits with one sentence and writes nothing."""
    from safetensors.torch import load_file

    keep = tmp_path / "keep.jsonl"
    keep.write_text("".join(json.dumps(f) + "\n" for f in BATCHES[2]))
    overrides = ["layers=1-2", "target.steps=3", "lam=1e-4"]
    with one_thread():
        plain = edit(BATCHES[0], tmp_path / "plain", model=seq["origin"], overrides=overrides)
        kept = edit(BATCHES[0], tmp_path / "kept", model=seq["origin"], overrides=overrides, keep=keep)
    keys = load_file(str(tmp_path / "kept" / "carried_keys.safetensors"))
    assert kept.manifest["kept_facts"]["n_facts"] == 1 and kept.manifest["carried_keys"] == {"1": 3, "2": 3}
    assert "kept_facts" not in plain.manifest

    def moved(out: Path) -> float:  # how far the update moves the kept fact's keys' outputs
        delta = dense(read_history(out).delta(1))
        return sum(float((delta[layer] @ keys[f"layer.{layer}.keys"][:1].double().T).norm()) for layer in LAYERS)

    assert moved(tmp_path / "kept") < 0.4 * moved(tmp_path / "plain")  # 0.28 measured: weight 1 is a compromise
    facts = tmp_path / "plain.jsonl"  # written by edit()
    for extra, code, message in (
            (["--keep", str(tmp_path / "missing.jsonl")], 66, "Facts file to keep .*missing.jsonl does not exist."),
            (["--keep", str(keep), "--method", "rome"], 2, "--keep needs memit or alphaedit: ROME edits one fact at a "
                                                          "time with no term for keys to keep.")):
        out = tmp_path / "refused"
        res = CliRunner().invoke(app, ["batch-edit", str(facts), "--model", str(seq["origin"]), "-o", str(out),
                                       "--covariance", "identity", "--no-eval", "-q", *extra])
        assert res.exit_code == code and re.fullmatch(f"covedit: error: {message}\n", res.stderr), res.stderr
        assert not out.exists()


def test_reverting_a_batch_keeps_its_kept_facts_and_a_base_without_history_keeps_its_keys(seq, tmp_path, caplog):
    """--keep facts' keys are carried as their own run ("kept"), which a revert of the batch that brought them
    does not drop (they are what the model knew, not what the batch wrote). A --base without a history
    restarts the batch numbers, so its carried runs lose theirs (None) and no revert of the new history can
    drop them; reverting a batch whose own run is recorded then says nothing about unknown keys."""
    from safetensors.torch import load_file

    keep = tmp_path / "keep.jsonl"
    keep.write_text("".join(json.dumps(f) + "\n" for f in BATCHES[2]))
    with one_thread():
        edit(BATCHES[0], tmp_path / "kept", model=seq["origin"], keep=keep)
    keys, runs = read_carried_keys(tmp_path / "kept" / "carried_keys.safetensors")
    assert runs == {layer: [["kept", 1], [1, 2]] for layer in LAYERS}
    revert_batches(tmp_path / "kept", [1], tmp_path / "kept-r", evaluate=False)
    left, left_runs = read_carried_keys(tmp_path / "kept-r" / "carried_keys.safetensors")
    assert left_runs == {layer: [["kept", 1]] for layer in LAYERS}
    assert all(torch.equal(left[layer], keys[layer][:1]) for layer in LAYERS)

    bare = tmp_path / "bare-e2"
    shutil.copytree(seq["e2"], bare)
    shutil.rmtree(bare / "history")
    with one_thread():
        edit(BATCHES[2], tmp_path / "after-bare", base=bare)
    keys, runs = read_carried_keys(tmp_path / "after-bare" / "carried_keys.safetensors")
    assert read_history(tmp_path / "after-bare").active() == [1]
    assert runs == {layer: [[None, 2], [None, 1], [1, 1]] for layer in LAYERS}
    old = load_file(str(seq["e2"] / "carried_keys.safetensors"))
    assert all(torch.equal(keys[layer][:3], old[f"layer.{layer}.keys"]) for layer in LAYERS)
    with caplog.at_level("WARNING", logger="covedit"):
        revert_batches(tmp_path / "after-bare", [1], tmp_path / "after-bare-r", evaluate=False)
    assert "unknown origin" not in caplog.text
    left, left_runs = read_carried_keys(tmp_path / "after-bare-r" / "carried_keys.safetensors")
    assert left_runs == {layer: [[None, 2], [None, 1]] for layer in LAYERS}
    assert all(torch.equal(left[layer], old[f"layer.{layer}.keys"]) for layer in LAYERS)
    with pytest.raises(UsageError, match="preserve_earlier must be >= 0"):
        edit(BATCHES[2], tmp_path / "negative", base=seq["e2"], overrides=COMMON + ["preserve_earlier=-1"])
    assert not (tmp_path / "negative").exists()


def test_drift_from_origin_of_a_later_batch_is_against_the_original_model(seq):
    """Batch 2's drift is measured against the origin (its earlier batch taken off in memory), and equals the
    drift between the original model and e2 measured directly."""
    record = read_history(seq["e2"]).batches[1]
    direct = drift(next_token_logprobs(load_model(str(seq["origin"]))), next_token_logprobs(load_model(str(seq["e2"]))))
    assert record["drift_from_origin"]["mean_kl"] == pytest.approx(direct["mean_kl"], rel=1e-3, abs=1e-9)
    assert record["drift_from_origin"]["mean_kl"] > record["evaluation"]["drift"]["mean_kl"] > 0  # two batches vs one


def test_revert_the_middle_batch(seq, tmp_path):
    """W - dW_2 = W0 + dW_1 + dW_3 to float rounding; the history marks batch 2 reverted, the written delta is
    the revert itself, and a later batch-edit --base continues the sequence as batch 4."""
    out = tmp_path / "r2"
    res = CliRunner().invoke(app, ["revert", str(seq["e3"]), "--batch", "2", "-o", str(out), "--no-eval", "-q"])
    assert res.exit_code == 0, res.output
    assert "batch 3 came after" in res.stdout and "not re-evaluated" in res.stdout
    hist = read_history(seq["e3"])
    want = {layer: seq["W0"][layer] + dense(hist.delta(1))[layer] + dense(hist.delta(3))[layer] for layer in LAYERS}
    for layer, W in weights(out).items():
        close(W, want[layer])
    new = read_history(out)
    assert [r["status"] for r in new.batches] == ["applied", "reverted", "applied"] and new.active() == [1, 3]
    check_weights(new, load_model(str(out)), out)  # the history's hashes are the written model's
    delta = load_delta(out / "delta.safetensors")
    assert delta.meta["reverted_batches"] == [2]
    torch.testing.assert_close(dense(delta)[1], -dense(hist.delta(2))[1], rtol=0, atol=0)
    # already reverted, or no such batch: usage errors, nothing written
    for bad in ("2", "4"):
        res = CliRunner().invoke(app, ["revert", str(out), "--batch", bad, "-o", str(tmp_path / "x")])
        assert res.exit_code == 2 and not (tmp_path / "x").exists()
    edit([{"subject": "Steve Jobs", "prompt": "{} founded", "target_new": "Microsoft"}], tmp_path / "e4", base=out)
    h4 = read_history(tmp_path / "e4")
    assert h4.active() == [1, 3, 4] and h4.batches[3]["weight_hashes"]["before"] == new.data["weight_hashes"]
    # the carried keys lose exactly batch 2's row, so later batches stop protecting what it wrote
    keys3, runs3 = read_carried_keys(seq["e3"] / "carried_keys.safetensors")
    keys, runs = read_carried_keys(out / "carried_keys.safetensors")
    assert runs3 == {layer: [[1, 2], [2, 1], [3, 1]] for layer in LAYERS}
    assert runs == {layer: [[1, 2], [3, 1]] for layer in LAYERS}
    for layer in LAYERS:
        assert torch.equal(keys[layer], torch.cat([keys3[layer][:2], keys3[layer][3:]]))
    keys4, runs4 = read_carried_keys(tmp_path / "e4" / "carried_keys.safetensors")
    assert runs4 == {layer: [[1, 2], [3, 1], [4, 1]] for layer in LAYERS}
    assert all(torch.equal(keys4[layer][:3], keys[layer]) for layer in LAYERS)


def test_revert_of_keys_that_name_no_batch_keeps_them_and_says_so(seq, tmp_path, caplog):
    """Carried keys written before covedit recorded each row's batch: a revert cannot tell the reverted
    batch's rows apart, so it keeps every row and warns that later batches still protect them."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "e3"
    shutil.copytree(seq["e3"], folder)
    save_file(load_file(str(folder / "carried_keys.safetensors")), str(folder / "carried_keys.safetensors"))
    with caplog.at_level("WARNING", logger="covedit"):
        revert_batches(folder, [2], tmp_path / "r", evaluate=False)
    assert "unknown origin" in caplog.text and "may still be in it" in caplog.text
    keys, runs = read_carried_keys(tmp_path / "r" / "carried_keys.safetensors")
    assert runs == {layer: [[None, 4]] for layer in LAYERS}
    assert all(torch.equal(keys[layer], load_file(str(folder / "carried_keys.safetensors"))[f"layer.{layer}.keys"])
               for layer in LAYERS)


def test_reverting_every_batch_returns_the_original_weights(seq, tmp_path):
    revert_batches(seq["e3"], [1, 2, 3], tmp_path / "all", evaluate=False)
    for layer, W in weights(tmp_path / "all").items():
        close(W, seq["W0"][layer])
    # one at a time, in another order, the same
    revert_batches(seq["e3"], [2], tmp_path / "a", evaluate=False)
    revert_batches(tmp_path / "a", [3], tmp_path / "b", evaluate=False)
    revert_batches(tmp_path / "b", [1], tmp_path / "c", evaluate=False)
    assert read_history(tmp_path / "c").active() == []
    for layer, W in weights(tmp_path / "c").items():
        close(W, seq["W0"][layer])


def test_revert_re_evaluates_every_batch(seq, tmp_path):
    res = revert_batches(seq["e2"], [1], tmp_path / "r", evaluate=True)
    assert res.later == [2] and res.evaluated
    assert [(r["batch"], r["status"], r["n_facts"]) for r in res.per_batch] == [(1, "reverted", 2), (2, "applied", 1)]
    assert res.per_batch[1]["when_edited"]["n_facts"] == 1 and "efficacy_acc" in res.per_batch[0]["now"]
    assert res.drift_from_origin["n_prompts"] == 42
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["reverted_batches"] == [1] and manifest["evaluation"]["per_batch"] == res.per_batch


@pytest.mark.parametrize("damage", ["batch-0002.safetensors", "batch-0001.facts.jsonl", "history.json"])
def test_a_tampered_history_is_refused(seq, tmp_path, damage):
    folder = tmp_path / "e3"
    shutil.copytree(seq["e3"], folder)
    path = folder / "history" / damage
    if damage == "history.json":
        path.write_text(path.read_text()[:-20])
    else:
        data = bytearray(path.read_bytes())
        data[-2] ^= 0x01
        path.write_bytes(data)
    runner = CliRunner()
    for args in (["revert", str(folder), "--batch", "2", "-o", str(tmp_path / "out")],
                 ["export", str(folder), "-o", str(tmp_path / "out")], ["history", str(folder)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 65, (args, res.output)
        assert res.stderr.startswith("covedit: error: ") and res.stderr.count("\n") == 1 and "Traceback" not in res.output
        assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="cannot be trusted|not a readable"):
        edit(BATCHES[2], tmp_path / "e4", base=folder)
    assert not (tmp_path / "e4").exists()


def test_command_line_refusals_name_the_problem(seq, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["history", str(seq["origin"])])  # a model folder, not a batch-edit output
    assert res.exit_code == 66 and "holds no history/history.json" in res.stderr
    res = runner.invoke(app, ["export", str(seq["e3"]), "--format", "gguf", "-o", str(tmp_path / "a")])
    assert res.exit_code == 2 and not (tmp_path / "a").exists()
    res = runner.invoke(app, ["export", str(seq["e3"]), "--max-rank", "0", "-o", str(tmp_path / "a")])
    assert res.exit_code == 2 and not (tmp_path / "a").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    res = runner.invoke(app, ["revert", str(seq["e3"]), "--batch", "1", "-o", str(tmp_path / "full")])
    assert res.exit_code == 73 and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    res = runner.invoke(app, ["revert", str(seq["e3"]), "--batch", "two", "-o", str(tmp_path / "b")])
    assert res.exit_code == 2 and not (tmp_path / "b").exists()


def test_weights_that_are_not_the_historys_are_refused(seq):
    loaded = load_model(str(seq["e3"]))
    with torch.no_grad():
        loaded.down_weight(2)[0, 0] += 1e-3
    with pytest.raises(DataError, match="does not hold the weights its history records"):
        check_weights(read_history(seq["e3"]), loaded, seq["e3"])


def test_replay_reruns_the_applied_batches_on_another_model(seq, tmp_path, tokenizer):
    """The applied batches of a history (batch 2 reverted) with their facts and hyperparameters, on another
    model: a new history of two batches whose origin is that model; a failed replay leaves nothing behind."""
    from conftest import build_tiny

    other = tmp_path / "other"
    m = build_tiny("llama", tokenizer, seed=1).model
    with torch.no_grad():
        m.lm_head.weight.mul_(100.0)
    m.save_pretrained(other)
    tokenizer.save_pretrained(other)
    revert_batches(seq["e3"], [2], tmp_path / "r2", evaluate=False)
    res = CliRunner().invoke(app, ["replay", str(tmp_path / "r2"), "--model", str(other), "-o", str(tmp_path / "new"),
                                   "--no-eval", "-q"])
    assert res.exit_code == 0, res.output
    assert "batch 2 (batch 3 of" in res.stdout
    old, new = read_history(tmp_path / "r2"), read_history(tmp_path / "new")
    assert new.active() == [1, 2]
    for was, now in zip([old.record(1), old.record(3)], new.batches):
        assert now["facts"]["sha256"] == was["facts"]["sha256"] and now["hparams"] == was["hparams"]
        assert now["method"] == was["method"] and now["weight_hashes"] != was["weight_hashes"]
    loaded = load_model(str(other))
    assert new.data["origin"]["weight_hashes"] == {str(k): v for k, v in layer_hashes(loaded, LAYERS).items()}
    check_weights(new, load_model(str(tmp_path / "new")), tmp_path / "new")
    res = CliRunner().invoke(app, ["replay", str(tmp_path / "r2"), "--model", str(tmp_path / "absent"),
                                   "-o", str(tmp_path / "nothing"), "--no-eval", "-q"])
    assert res.exit_code == 66 and not (tmp_path / "nothing").exists()
    assert not [p for p in tmp_path.iterdir() if ".replay-" in p.name]


# ------------------------------------------------------------------------------------------- limits

def test_max_norm_growth_refuses_the_batch(seq, tmp_path):
    growth = max(read_history(seq["e2"]).batches[1]["norm_growth"].values())  # what batch 2 reached
    limit = 1 + (growth - 1) / 2 if growth > 1 else growth - 1e-9
    out = tmp_path / "e2"
    with pytest.raises(DataError, match=r"Batch 2 of this sequence would cross its limits \(layer \d's weight norm "
                                        r"would be [\d.]+ times the original model's \(limit --max-norm-growth"):
        edit(BATCHES[1], out, base=seq["e1"], max_norm_growth=limit)
    assert not out.exists()
    assert edit(BATCHES[1], out, base=seq["e1"], max_norm_growth=growth + 0.5).manifest["history"]["batch"] == 2


def test_max_drift_refuses_the_batch_from_the_command_line(seq, tmp_path):
    f = tmp_path / "f.jsonl"
    f.write_text(json.dumps(BATCHES[1][0]) + "\n")
    out = tmp_path / "e2"
    args = ["batch-edit", str(f), "--base", str(seq["e1"]), "-o", str(out), "--covariance", "identity", "-q",
            *[a for s in COMMON for a in ("--set", s)]]
    res = CliRunner().invoke(app, [*args, "--max-drift", "1e-9"])
    assert res.exit_code == 65, res.output
    line = res.stderr.strip()
    assert line.count("\n") == 0 and "mean KL from the original model on 42 unrelated prompts would be" in line
    assert "limit --max-drift 1e-09" in line and "nothing was written" in line and not out.exists()
    res = CliRunner().invoke(app, [*args, "--max-drift", "1", "--no-eval"])
    assert res.exit_code == 2 and not out.exists()


# ------------------------------------------------------------------------------------------- PEFT export

def logits(model, tokenizer, text="The Eiffel Tower is located in the city of") -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0].double()


def test_truncate_is_the_best_low_rank_approximation():
    from covedit.pipeline.export import truncate
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(5, 32, generator=g, dtype=torch.float64)
    dw = up @ down
    u, s, vh = torch.linalg.svd(dw)
    for r in (1, 3, 5, 7):
        a, b, err = truncate(up, down, r)
        k = min(r, 5)
        torch.testing.assert_close(a @ b, (u[:, :k] * s[:k]) @ vh[:k], rtol=0, atol=1e-10)
        assert err == pytest.approx(float(s[k:].norm() / s.norm()), abs=1e-12)


def test_export_peft_gives_the_edited_models_logits(seq, tmp_path):
    peft = pytest.importorskip("peft")  # the optional extra covedit[serve]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from covedit.pipeline.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    res = CliRunner().invoke(app, ["export", str(seq["e3"]), "--format", "peft", "-o", str(out)])
    assert res.exit_code == 0, res.output
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["r"] == config["lora_alpha"] == 4 and config["peft_type"] == "LORA"  # 2 + 1 + 1 facts
    assert config["target_modules"] == [f"model.layers.{layer}.mlp.down_proj" for layer in LAYERS]
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (16, 4)
    tok = AutoTokenizer.from_pretrained(seq["e3"])
    edited = logits(AutoModelForCausalLM.from_pretrained(seq["e3"]), tok)
    base = AutoModelForCausalLM.from_pretrained(seq["origin"])
    assert not torch.allclose(logits(base, tok), edited, atol=1e-4)  # the edit does move these logits
    served = load_adapter(base, out)
    assert isinstance(served, peft.PeftModel)
    torch.testing.assert_close(logits(served, tok), edited, rtol=0, atol=1e-5)
    # refused on any other weights: the edited model itself, or the base in another dtype
    with pytest.raises(DataError, match="not the adapter's base model"):
        load_adapter(AutoModelForCausalLM.from_pretrained(seq["e3"]), out)
    with pytest.raises(DataError, match="bfloat16, the adapter's base was float32"):
        load_adapter(AutoModelForCausalLM.from_pretrained(seq["origin"], dtype=torch.bfloat16), out)


def test_export_one_batch_and_a_truncated_rank(seq, tmp_path):
    from safetensors.torch import load_file

    from covedit.pipeline.export import ADAPTER_WEIGHTS, export_peft
    hist = read_history(seq["e3"])
    res = export_peft(seq["e3"], tmp_path / "b1", batches=[1])
    t = load_file(str(tmp_path / "b1" / ADAPTER_WEIGHTS))
    for layer in LAYERS:
        key = f"base_model.model.model.layers.{layer}.mlp.down_proj"
        hand = t[f"{key}.lora_B.weight"].double() @ t[f"{key}.lora_A.weight"].double()
        torch.testing.assert_close(hand, dense(hist.delta(1))[layer], rtol=0, atol=1e-12)
    assert res.rank == 2 and res.relative_error == {1: 0.0, 2: 0.0}
    res = export_peft(seq["e3"], tmp_path / "r2", max_rank=2)
    total = {layer: sum(dense(hist.delta(n))[layer] for n in (1, 2, 3)) for layer in LAYERS}
    t = load_file(str(tmp_path / "r2" / ADAPTER_WEIGHTS))
    assert res.rank == 2
    for layer in LAYERS:
        s = torch.linalg.svdvals(total[layer])
        assert res.relative_error[layer] == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)
        key = f"base_model.model.model.layers.{layer}.mlp.down_proj"
        hand = t[f"{key}.lora_B.weight"].double() @ t[f"{key}.lora_A.weight"].double()
        assert float((hand - total[layer]).norm() / total[layer].norm()) == pytest.approx(res.relative_error[layer],
                                                                                          rel=1e-3)
    with pytest.raises(UsageError):
        export_peft(seq["e3"], tmp_path / "x", batches=[7])


def test_truncated_export_scores_what_the_truncation_costs(seq, tmp_path):
    """--max-rank scores the exported batch's facts on origin + full ΔW and on origin + the adapter's factors;
    both numbers are what fact_metrics gives on those weights built by hand."""
    from safetensors.torch import load_file

    from covedit.pipeline.delta import add_low_rank
    from covedit.pipeline.evaluate import aggregate, fact_metrics
    from covedit.pipeline.export import ADAPTER_WEIGHTS, export_peft
    from covedit.pipeline.facts import read_facts
    hist = read_history(seq["e3"])
    res = export_peft(seq["e3"], tmp_path / "r1", batches=[1], max_rank=1)
    assert res.relative_error[1] > 0 and set(res.efficacy) == {"full", "truncated"}
    t = load_file(str(tmp_path / "r1" / ADAPTER_WEIGHTS))
    loaded = load_model(str(seq["origin"]))
    facts = read_facts(hist.facts_file(1), tokenizer=loaded.tokenizer)
    for which, parts in (("full", [(ld.layer, ld.up, ld.down) for ld in hist.delta(1).layers]),
                         ("truncated", [(layer, t[f"base_model.model.model.layers.{layer}.mlp.down_proj.lora_B.weight"],
                                         t[f"base_model.model.model.layers.{layer}.mlp.down_proj.lora_A.weight"])
                                        for layer in LAYERS])):
        model = load_model(str(seq["origin"]))
        for layer, up, down in parts:
            add_low_rank(model.down_weight(layer), up, down)
        agg = aggregate(fact_metrics(model, facts))
        assert res.efficacy[which] == {"n_facts": 2, "efficacy_acc": agg["efficacy_acc"],
                                       "generalization_acc": agg["generalization_acc"]}
    assert export_peft(seq["e3"], tmp_path / "r9", max_rank=9).efficacy is None  # nothing truncated
    assert export_peft(seq["e3"], tmp_path / "r1b", max_rank=1, evaluate=False).efficacy is None


def test_export_conv1d_model_for_peft(tmp_path, tokenizer):
    """GPT-2 keeps c_proj transposed (Conv1D): the same factors with fan_in_fan_out give the edited logits."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny

    from covedit.pipeline.export import export_peft, load_adapter
    origin = tmp_path / "gpt2"
    build_tiny("gpt2", tokenizer).model.save_pretrained(origin)
    tokenizer.save_pretrained(origin)
    edit(BATCHES[0], tmp_path / "e1", model=origin)
    res = export_peft(tmp_path / "e1", tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert res.layers == LAYERS and res.rank == 2
    served = load_adapter(AutoModelForCausalLM.from_pretrained(origin), tmp_path / "adapter")
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "e1")
    torch.testing.assert_close(logits(served, tokenizer), logits(edited, tokenizer), rtol=0, atol=1e-5)
