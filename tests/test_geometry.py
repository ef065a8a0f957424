"""covedit geometry (pipeline/geometry.py): a centroid is the mean of the hidden states a plain forward pass gives
at the concept's last token; the cosine matrix is symmetric with a unit diagonal; pairs above the threshold are
flagged; --base-model with the same model moves nothing; bad input gets one sentence, its exit code and no
report."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

from conftest import build_tiny, cli, tiny_config
from covedit import cli as cli_module
from covedit.pipeline import geometry
from covedit.pipeline.errors import CannotWrite, UsageError
from covedit.pipeline.facts import Fact
from covedit.pipeline.geometry import (TARGET_TEMPLATES, build_result, centroids, concepts_of, cosine_matrix,
                                       flag_pairs, subject_template, write_geometry)

FACTS = [
    Fact("eiffel", "Eiffel Tower", "The {} is located in the city of", "Rome", "Paris",
         ("Where is the Eiffel Tower? It is in", "Which city has this tower?")),  # the second lacks the subject
    Fact("louvre", "Louvre", "The {} is a museum in", "Paris"),  # Paris: one fact's new, another's true target
    Fact("eiffel-2", "Eiffel Tower", "The {} was built by", "Gustave Eiffel"),  # the same subject again
]
ONE_THREAD = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def write_facts(path, facts=FACTS):
    with open(path, "w") as f:
        for fact in facts:
            f.write(json.dumps({"id": fact.id, "subject": fact.subject, "prompt": fact.prompt,
                                "target_new": fact.target_new, "target_true": fact.target_true,
                                "paraphrases": list(fact.paraphrases)}) + "\n")
    return path


def invoke(argv: list) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli_module.app, [str(a) for a in argv])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------------------------------------ concepts

def test_concepts_are_subjects_then_targets_each_once():
    concepts = concepts_of(FACTS)
    assert [c.label for c in concepts] == ["subject: Eiffel Tower", "subject: Louvre", "target: Rome",
                                           "target: Paris", "target: Gustave Eiffel"]
    eiffel, louvre, rome, paris, gustave = concepts
    assert eiffel.facts == ["eiffel", "eiffel-2"] and eiffel.roles == ["subject"]
    assert eiffel.texts == [("The {} is located in the city of", "Eiffel Tower"),
                            ("Where is the {}? It is in", "Eiffel Tower"),
                            ("The {} was built by", "Eiffel Tower")]
    assert eiffel.prompts_skipped == 1  # "Which city has this tower?" does not name it
    assert paris.roles == ["true", "new"] and paris.facts == ["eiffel", "louvre"]
    assert rome.texts == [(t, "Rome") for t in TARGET_TEMPLATES]
    assert louvre.texts == [("The {} is a museum in", "Louvre")]


def test_subject_template_finds_the_first_occurrence_exactly_else_ignoring_case():
    assert subject_template("Where is the Eiffel Tower? The Eiffel Tower is", "Eiffel Tower") == \
        "Where is the {}? The Eiffel Tower is"
    assert subject_template("the eiffel tower stands in", "Eiffel Tower") == "the {} stands in"
    assert subject_template("Which city has this tower?", "Eiffel Tower") is None
    assert subject_template("A {brace} and Louvre", "Louvre") is None


# ------------------------------------------------------------------------------------------ centroids

def _plain_states(loaded, text: str, upto: str) -> list[torch.Tensor]:
    """Every block's output at the last token of ``upto`` (a prefix of ``text``) from a plain forward of ``text``
    alone, with the final norm taken out so that the last hidden state is the last block's output too."""
    tok = loaded.tokenizer
    ids = tok(text, return_tensors="pt").input_ids
    position = len(tok(upto).input_ids) - 1
    assert tok(upto).input_ids == ids[0, :position + 1].tolist()  # the prefix tokenises as in the text
    norm_owner, name = ((loaded.model.model, "norm") if hasattr(loaded.model, "model") else
                        (loaded.model.transformer, "ln_f"))
    norm = getattr(norm_owner, name)
    setattr(norm_owner, name, torch.nn.Identity())
    try:
        with torch.no_grad():
            hs = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        setattr(norm_owner, name, norm)
    return [h[0, position].double() for h in hs[1:]]


def test_a_centroid_is_the_mean_of_the_hidden_states_of_a_plain_forward(tiny):
    layers = [1, tiny.num_layers - 1]
    concepts = concepts_of(FACTS)
    cents = centroids(tiny, concepts, layers, batch_size=3)  # batches split concepts' texts: padding must not matter
    for k, c in enumerate(concepts):
        per_text = []
        for template, text in c.texts:
            filled = template.replace("{}", text)
            per_text.append(_plain_states(tiny, filled, filled[:filled.index(text) + len(text)]))
        for layer in layers:
            expected = torch.stack([states[layer] for states in per_text]).mean(0)
            assert torch.allclose(cents[layer][k], expected, rtol=1e-5, atol=1e-5), (c.label, layer)


def test_a_text_that_opens_with_its_one_token_concept_is_left_out_unless_it_is_the_only_one(tiny):
    facts = [Fact("fr", "France", "The capital of {} is", "London", None, ("France's capital is",)),
             Fact("pa", "Paris", "{} is the capital of", "Italy")]  # its only text opens with it
    assert len(tiny.tokenizer("France").input_ids) == 1 and tiny.tokenizer.bos_token_id not in tiny.tokenizer("x").input_ids
    concepts = concepts_of(facts)
    cents = centroids(tiny, concepts, [2])
    assert [c.at_first_token for c in concepts] == [1, 1, 0, 0]
    france = _plain_states(tiny, "The capital of France is", "The capital of France")[2]
    assert torch.allclose(cents[2][0], france, rtol=1e-5, atol=1e-5)  # the paraphrase is left out
    paris = _plain_states(tiny, "Paris is the capital of", "Paris")[2]
    assert torch.allclose(cents[2][1], paris, rtol=1e-5, atol=1e-5)  # kept: there is nothing else


def test_cosine_matrix_is_symmetric_with_a_unit_diagonal_and_flags_pairs_above_the_threshold():
    x = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[3] = 2.5 * x[1] + 0.01 * x[2]  # nearly parallel to row 1
    m = cosine_matrix(x)
    assert torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.ones(6, dtype=torch.float64))
    for i in range(6):
        for j in range(6):
            if i != j:
                assert abs(float(m[i, j]) - float(torch.dot(x[i], x[j]) / (x[i].norm() * x[j].norm()))) < 1e-12
    labels = list("abcdef")
    flagged = flag_pairs(labels, m, 0.99)
    assert [(p["a"], p["b"]) for p in flagged] == [("b", "d")]
    assert flag_pairs(labels, m, float(m[1, 3])) == []  # strictly above
    everything = flag_pairs(labels, m, -1.0)
    assert len(everything) == 15 and [p["cosine"] for p in everything] == sorted((p["cosine"] for p in everything), reverse=True)


def test_the_same_model_as_base_moves_nothing_and_a_changed_one_moves_what_it_changed(tiny, tokenizer):
    layers = [1, 3]
    concepts = concepts_of(FACTS)
    cents = centroids(tiny, concepts, layers)
    same = build_result(concepts, FACTS, cents, 0.5, base=centroids(tiny, concepts, layers))
    for layer in layers:
        e = same["per_layer"][str(layer)]
        assert e["matrix"] == e["base_matrix"]
        assert all(abs(m["cosine_base_edited"] - 1) < 1e-12 for m in e["moved"])
        assert all(r["sim_new_change"] == 0.0 for r in e["facts"])
        assert all(r["sim_true_change"] == 0.0 for r in e["facts"] if "sim_true_change" in r)
    other = build_tiny(tiny.model.config.model_type, tokenizer)
    with torch.no_grad():
        other.down_weight(2).add_(0.5 * torch.randn_like(other.down_weight(2)))
    moved = build_result(concepts, FACTS, centroids(other, concepts, layers), 0.5, base=cents)
    e1, e3 = moved["per_layer"]["1"], moved["per_layer"]["3"]
    assert all(abs(m["cosine_base_edited"] - 1) < 1e-12 for m in e1["moved"])  # below the changed layer: nothing
    assert min(m["cosine_base_edited"] for m in e3["moved"]) < 0.9999
    labels = moved["labels"]
    for r in e3["facts"]:
        s, t = labels.index(f"subject: {r['subject']}"), labels.index(f"target: {r['target_new']}")
        assert r["sim_new_change"] == pytest.approx(e3["matrix"][s][t] - e3["base_matrix"][s][t], abs=1e-5)
        assert r["sim_new_base"] == pytest.approx(e3["base_matrix"][s][t], abs=1e-6)


# ------------------------------------------------------------------------------------------ the command

@pytest.mark.slow  # a subprocess of the command line, as the other end-to-end command tests (25 s on 2 cores)
def test_geometry_command_writes_matrices_and_heatmaps_and_with_the_same_base_shows_no_movement(tiny_dir, tmp_path):
    facts = write_facts(tmp_path / "facts.jsonl")
    report = tmp_path / "report"
    r = cli("geometry", facts, "--model", tiny_dir, "--base-model", tiny_dir, "--report", report,
            "--threshold", "0.5", "-q", env=ONE_THREAD, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads((report / "geometry.json").read_text())
    assert data["layers"] == [1, 2, 3]  # the tiny llama's MEMIT layers (1-3 of 4) and its last layer
    assert sorted(p.name for p in report.iterdir()) == ["geometry.json", "heatmap_layer1.png", "heatmap_layer2.png",
                                                        "heatmap_layer3.png"]
    for layer in (1, 2, 3):
        assert (report / f"heatmap_layer{layer}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        e = data["per_layer"][str(layer)]
        m = torch.tensor(e["matrix"])
        assert m.shape == (5, 5) and torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.ones(5))
        assert e["matrix"] == e["base_matrix"]
        assert all(x["sim_new_change"] == 0 for x in e["facts"])
        assert [(p["a"], p["b"]) for p in e["flagged"]] == [
            (data["labels"][i], data["labels"][j]) for i, j in
            sorted(((i, j) for i in range(5) for j in range(i + 1, 5) if e["matrix"][i][j] > 0.5),
                   key=lambda ij: -e["matrix"][ij[0]][ij[1]])]
    assert "subject~new" in r.stdout and "wrote" in r.stdout
    # Run again into the same report: it is replaced whole; --layers picks the layers.
    r = cli("geometry", facts, "--model", tiny_dir, "--report", report, "--layers", "0,3", "--json",
            env=ONE_THREAD, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["layers"] == [0, 3]
    assert sorted(p.name for p in report.iterdir()) == ["geometry.json", "heatmap_layer0.png", "heatmap_layer3.png"]


@pytest.mark.parametrize("args,code,message", [
    (["--layers", "9"], 2, "Layer 9 is out of range: this model has layers 0-3."),
    (["--threshold", "1.5"], 2, "--threshold must be a cosine between -1 and 1, got 1.5."),
    (["--layers", "3-1"], 2, "--layers: range '3-1' runs backwards."),
])
def test_bad_options_exit_2_with_one_sentence_and_write_nothing(tiny_dir, tmp_path, args, code, message):
    facts = write_facts(tmp_path / "facts.jsonl")
    report = tmp_path / "report"
    status, out, err = invoke(["geometry", facts, "--model", tiny_dir, "--report", report, "-q", *args])
    assert status == code
    assert err.strip() == f"covedit: error: {message}"
    assert not report.exists() and [p.name for p in tmp_path.iterdir()] == ["facts.jsonl"]


def test_bad_facts_missing_inputs_and_an_unwritable_report_get_their_exit_codes(tiny_dir, tmp_path):
    facts = write_facts(tmp_path / "facts.jsonl")
    report = tmp_path / "report"
    status, _, err = invoke(["geometry", tmp_path / "nope.jsonl", "--model", tiny_dir, "--report", report, "-q"])
    assert status == 66 and err.count("\n") == 1 and "does not exist" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "subject": "Louvre", "prompt": "no slot here", "target_new": "Rome"}\n')
    status, _, err = invoke(["geometry", bad, "--model", tiny_dir, "--report", report, "-q"])
    assert status == 65 and "line 1" in err and err.startswith("covedit: error:")
    status, _, err = invoke(["geometry", facts, "--model", tmp_path / "no-model", "--report", report, "-q"])
    assert status == 66 and "does not exist" in err
    assert not report.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    status, _, err = invoke(["geometry", facts, "--model", tiny_dir, "--report", foreign, "-q"])
    assert status == 73 and "not a covedit geometry report" in err
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]


def test_a_base_model_of_another_shape_is_refused(tiny_dir, tmp_path, tokenizer):
    other = tmp_path / "three-layers"
    config = tiny_config("llama", len(tokenizer))
    config.num_hidden_layers = 3
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    facts = write_facts(tmp_path / "facts.jsonl")
    status, _, err = invoke(["geometry", facts, "--model", tiny_dir, "--base-model", other, "--report",
                             tmp_path / "report", "--layers", "1", "-q"])
    assert status == 2 and "--base-model has 3 layers of width 16, the model 4 of width 16" in err
    assert not (tmp_path / "report").exists()


def test_a_failure_while_writing_leaves_the_previous_report_whole(tiny, tmp_path, monkeypatch):
    concepts = concepts_of(FACTS)
    result = build_result(concepts, FACTS, centroids(tiny, concepts, [1]), 0.9)
    report = tmp_path / "report"
    write_geometry(report, result)
    before = {p.name: p.read_bytes() for p in report.iterdir()}

    def broken(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(geometry, "plot_heatmap", broken)
    with pytest.raises(CannotWrite, match="No space left on device"):
        write_geometry(report, result)
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folder left behind
    with pytest.raises(CannotWrite):
        write_geometry(tmp_path / "new", result)
    assert not (tmp_path / "new").exists()


def test_threshold_check():
    geometry.check_threshold(0.9)
    geometry.check_threshold(-1.0)
    for bad in (1.01, float("nan"), float("inf")):
        with pytest.raises(UsageError):
            geometry.check_threshold(bad)


# ------------------------------------------------------------------------------------------ the benchmark

def test_the_sink_benchmarks_batched_measures_are_the_locality_studys(tokenizer):
    """benchmarks/semantic_sinks.py reads next-token distributions, target log-probabilities and greedy
    continuations for many prompts from one forward pass; they must be pipeline.evaluate's numbers."""
    from benchmarks import semantic_sinks as ss
    from covedit.pipeline.evaluate import drift, greedy_continuations, next_token_logprobs, score

    loaded, other = build_tiny("llama", tokenizer), build_tiny("llama", tokenizer, seed=1)
    prompts = ["The capital of Germany is", "Big Ben is located in the city of", "Hi", "The antidote for heparin overdose is"]
    before, after = ss.Prompts(loaded, prompts), ss.Prompts(other, prompts)
    assert torch.allclose(before.next, next_token_logprobs(loaded, prompts).logprobs, atol=1e-4)
    expected_kl = [d["kl"] for d in drift(next_token_logprobs(loaded, prompts), next_token_logprobs(other, prompts))["per_prompt"]]
    assert ss.kl_divergence(before.next, after.next).numpy() == pytest.approx(expected_kl, rel=1e-3, abs=1e-6)
    for target in ("Rome", "Gustave Eiffel", "acetaminophen overdose"):
        expected = [s.logprob for s in score(loaded, prompts, [target] * len(prompts))]
        assert before.target_logprob(target) == pytest.approx(expected, abs=1e-3)
    assert before.greedy(6) == greedy_continuations(loaded, prompts, 6)
    assert before.target_logprob("Rome") == pytest.approx([s.logprob for s in score(loaded, prompts, ["Rome"] * 4)],
                                                          abs=1e-3)  # the cache is copied, never consumed
