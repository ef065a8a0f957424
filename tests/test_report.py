"""Reports (pipeline/report.py): the files, tables and plots of a written report, atomic replacement and
refusal to write over someone else's folder, a report from a batch-edit summary, and the two terminal
renderings, quick_look (batch-edit's before/after table) and render_text (evaluate's summary), number by
number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from covedit.pipeline.errors import CannotWrite
from covedit.pipeline.report import build_report, quick_look, render_text, report_from_summary, write_report


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).shape[0] > 100


@pytest.mark.slow
def test_report_files_tables_and_plots(evaluations, tmp_path):
    before, after = evaluations
    out = tmp_path / "reports" / "r1"
    data = build_report(after, before, labels=("base", "edited"), update_norms={"2": 1.5, "3": 0.25})
    assert write_report(out, data) == out
    assert sorted(p.name for p in out.iterdir()) == ["metrics.png", "p_new.png", "report.json", "report.md",
                                                      "update_norms.png"]
    for png in ("metrics.png", "p_new.png", "update_norms.png"):
        assert _is_png(out / png)
    md = (out / "report.md").read_text()
    for heading in ("Success rate: P(new) > P(true)", "Top-1 token accuracy, teacher-forced", "Drift on unrelated prompts",
                    "## Fluency", "## Update norms", "## Per fact"):
        assert heading in md
    assert "| metric | measured on | base | edited | facts |" in md
    assert "| generalization | paraphrases: P(new) > P(true) | – | – | 1 |" not in md  # one fact has it: a number
    assert "| jobs |" in md and "– → –" in md  # absent metrics shown as absent
    saved = json.loads((out / "report.json").read_text())
    assert saved["after"]["aggregate"]["n_efficacy_success"] == 2
    assert saved["drift"]["mean_kl"] == pytest.approx(data["drift"]["mean_kl"])
    assert saved["plots"] == ["p_new.png", "metrics.png", "update_norms.png"]
    # a second report replaces the first; nothing temporary is left next to it
    write_report(out, build_report(after))
    assert not (out / "update_norms.png").exists() and "base" not in json.loads((out / "report.json").read_text())["labels"].values()
    assert [p.name for p in out.parent.iterdir()] == ["r1"]


def test_unwritable_report_dir_raises_cannot_write_and_leaves_nothing(evaluations, tmp_path):
    _, after = evaluations
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CannotWrite):
        write_report(blocker / "report", build_report(after))
    with pytest.raises(CannotWrite):
        write_report(blocker, build_report(after))
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CannotWrite):
        write_report(other, build_report(after))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "someone-elses"]
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_report_from_a_batch_edit_summary(evaluations, tmp_path):
    before, after = evaluations
    summary = {"method": "memit", "n_facts": 3, "model": "tiny", "layers": [2, 3],
               "evaluation": {"before": before.aggregate, "after": after.aggregate,
                              "per_fact": [{"id": b["id"], "before": b, "after": a}
                                           for b, a in zip(before.per_fact, after.per_fact)]},
               "update_norms": {"2": 3.0, "3": 1.0}}
    write_report(tmp_path / "r", report_from_summary(summary))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| metric | measured on | unedited | edited | facts |" in md and "Not measured" in md
    assert _is_png(tmp_path / "r" / "update_norms.png") and _is_png(tmp_path / "r" / "p_new.png")


# ---------------------------------------------------------------------------------- terminal renderings

def _fact(fid, before, after):
    keys = ("p_new_rewrite", "p_new_paraphrase", "p_own_neighborhood")
    return {"id": fid, "before": dict(zip(keys, before)), "after": dict(zip(keys, after))}


BATCH_EVALUATION = {
    "per_fact": [_fact("eiffel", (0.0123, 0.02, 0.5), (0.875, 0.5, 0.45)),
                 _fact("a-fact-id-longer-than-twenty-six-characters", (0.001, None, None), (0.9994, None, None)),
                 _fact("third", (0.1, 0.1, 0.1), (0.2, 0.2, 0.2))],
    "before": {"efficacy_success": 0.0, "generalization_success": 50.0, "specificity_success": None,
               "efficacy_acc": 12.5, "generalization_acc": 25.0, "specificity_acc": 100.0},
    "after": {"efficacy_success": 100.0, "generalization_success": 50.0, "specificity_success": None,
              "efficacy_acc": 87.5, "generalization_acc": 62.25, "specificity_acc": 91.75},
    "drift": {"n_prompts": 42, "mean_kl": 0.012345, "top1_changed_pct": 2.381, "per_prompt": []},
    "fluency": {"before": {"ge": 612.34}, "after": {"ge": 598.76}},
}


def test_quick_look_renders_the_numbers_of_an_evaluation():
    """Probabilities in percent to one decimal, absent ones as "-", ids cut to 26 characters, only the
    first n facts, then the aggregates, drift and fluency."""
    assert quick_look(BATCH_EVALUATION, n=2).splitlines() == [
        "",
        "fact                       P(new) rewrite    P(new) paraphrase   P(true) neighbourhood",
        "                           before  after     before  after       before  after",
        "eiffel                       1.2   87.5       2.0   50.0        50.0   45.0",
        "a-fact-id-longer-than-twen   0.1   99.9       -      -           -      -  ",
        "... and 1 more facts (manifest.json has them all)",
        "",
        "aggregate (%)              efficacy  generalization  specificity",
        "success P(new)>P(true) before     0.0     50.0     -   ",
        "success P(new)>P(true) after    100.0     50.0     -   ",
        "top-1 token accuracy   before    12.5     25.0    100.0",
        "top-1 token accuracy   after     87.5     62.2     91.8",
        "drift on 42 unrelated prompts: mean KL 0.0123 nats, top-1 token changed on 2.4 %",
        "fluency (GE, n-gram entropy x100): 612.3 -> 598.8",
    ]


def test_quick_look_shows_nothing_without_an_evaluation_and_leaves_out_what_was_not_measured():
    assert quick_look(None) == "" and quick_look({}) == ""
    partial = {**BATCH_EVALUATION, "drift": None, "fluency": {"before": None, "after": {"ge": 1.0}}}
    lines = quick_look(partial).splitlines()
    assert lines[3].startswith("eiffel") and lines[5].startswith("third") and lines[6] == ""  # n=5: all three
    assert not any(line.startswith(("drift", "fluency", "...")) for line in lines)
    assert lines[-1].startswith("top-1 token accuracy   after")


def test_render_text_puts_both_columns_side_by_side():
    keys = [f"{k}_{fam}" for fam in ("success", "acc") for k in ("efficacy", "generalization", "specificity")]
    before = {"model": "base-model", "aggregate": dict(zip(keys, (0.0, 50.0, None, 12.5, 25.0, 100.0))),
              "fluency": {"ge": 600.0}}
    after = {"model": "edited-model", "fluency": {"ge": 590.55},
             "aggregate": dict(zip(keys, (100.0, 50.0, None, 87.5, 62.25, 91.75))) | {f"n_{k}": 2 for k in keys[:2]}}
    data = build_report(after, before, labels=("base", "edited"))
    data["drift"] = {"n_prompts": 42, "mean_kl": 0.0123456, "top1_changed_pct": 2.381}
    assert render_text(data).splitlines() == [
        "base: base-model",
        "edited: edited-model",
        "",
        "aggregate (%)                                           base          edited   facts",
        "Success rate: P(new) > P(true)",
        "  efficacy                                               0.0           100.0       2",
        "  generalization                                        50.0            50.0       2",
        "  specificity                                              –               –       –",
        "Top-1 token accuracy, teacher-forced",
        "  efficacy                                              12.5            87.5       –",
        "  generalization                                        25.0            62.2       –",
        "  specificity                                          100.0            91.8       –",
        "drift on 42 unrelated prompts: mean KL 0.01235 nats, top-1 token changed on 2.4 %",
        "fluency (n-gram entropy ×100, GE): base 600.0, edited 590.5",
    ]
    alone = render_text(build_report(after)).splitlines()
    assert alone[:3] == ["after: edited-model", "", f"{'aggregate (%)':<44}{'after':>16}{'facts':>8}"]
    assert alone[4] == f"  {'efficacy':<42}{'100.0':>16}{'2':>8}" and not any("drift" in line for line in alone)


# ---------------------------------------------------------------------------------- generation family, ripple

GEN_BEFORE = {"efficacy_gen": 0.0, "generalization_gen": 12.5, "efficacy_gen_old_gone": 25.0,
              "generalization_gen_old_gone": 50.0, "chat_gen": 0.0, "chat_gen_old_gone": 0.0,
              "ripple_acc": 10.0, "ripple_gen": 0.0, "n_ripple_acc": 4, "n_ripple_gen": 4}
GEN_AFTER = {"efficacy_gen": 100.0, "generalization_gen": 62.5, "efficacy_gen_old_gone": 75.0,
             "generalization_gen_old_gone": 87.5, "chat_gen": 33.333, "chat_gen_old_gone": 66.667,
             "ripple_acc": 40.0, "ripple_gen": 25.0, "n_ripple_acc": 4, "n_ripple_gen": 4}


def test_quick_look_shows_the_generation_family_chat_and_ripple_where_measured():
    ev = {**BATCH_EVALUATION, "before": {**BATCH_EVALUATION["before"], **GEN_BEFORE},
          "after": {**BATCH_EVALUATION["after"], **GEN_AFTER}}
    lines = quick_look(ev, n=2).splitlines()
    assert lines[8:18] == [
        "success P(new)>P(true) before     0.0     50.0     -   ",
        "success P(new)>P(true) after    100.0     50.0     -   ",
        "top-1 token accuracy   before    12.5     25.0    100.0",
        "top-1 token accuracy   after     87.5     62.2     91.8",
        "generation: new named  before     0.0     12.5     -   ",
        "generation: new named  after    100.0     62.5     -   ",
        "generation: old gone   before    25.0     50.0     -   ",
        "generation: old gone   after     75.0     87.5     -   ",
        "chat reply to the rewrite prompt (%): new named 0.0 -> 33.3, old gone 0.0 -> 66.7",
        "ripple prompts, expected answer (%): token accuracy 10.0 -> 40.0, generation names it 0.0 -> 25.0 (4 facts)",
    ]
    assert lines[18].startswith("drift on 42")
    # no chat template (None), no ripple prompts (None): those lines are left out, never shown as 0
    absent = {"chat_gen": None, "chat_gen_old_gone": None, "ripple_acc": None, "ripple_gen": None,
              "n_ripple_acc": 0, "n_ripple_gen": 0}
    ev = {**BATCH_EVALUATION, "before": {**BATCH_EVALUATION["before"], **GEN_BEFORE, **absent},
          "after": {**BATCH_EVALUATION["after"], **GEN_AFTER, **absent}}
    lines = quick_look(ev, n=2).splitlines()
    assert lines[15] == "generation: old gone   after     75.0     87.5     -   " and lines[16].startswith("drift")


def _aggregates(gen: bool):
    keys = [f"{k}_{fam}" for fam in ("success", "acc") for k in ("efficacy", "generalization", "specificity")]
    before = dict(zip(keys, (0.0, 50.0, None, 12.5, 25.0, 100.0)))
    after = dict(zip(keys, (100.0, 50.0, None, 87.5, 62.25, 91.75)))
    if gen:
        before, after = {**before, **GEN_BEFORE}, {**after, **GEN_AFTER, "n_efficacy_gen": 8, "n_chat_gen": 6}
    return before, after


def test_render_text_shows_the_generation_family_beside_the_others():
    before, after = _aggregates(gen=True)
    data = build_report({"model": "edited-model", "aggregate": after}, {"model": "base-model", "aggregate": before},
                        labels=("base", "edited"))
    assert render_text(data).splitlines()[4:] == [
        "Success rate: P(new) > P(true)",
        "  efficacy                                               0.0           100.0       –",
        "  generalization                                        50.0            50.0       –",
        "  specificity                                              –               –       –",
        "Top-1 token accuracy, teacher-forced",
        "  efficacy                                              12.5            87.5       –",
        "  generalization                                        25.0            62.2       –",
        "  specificity                                          100.0            91.8       –",
        "  ripple                                                10.0            40.0       4",
        "Generation: the greedy continuation names the target",
        "  efficacy                                               0.0           100.0       8",
        "  efficacy, old gone                                    25.0            75.0       –",
        "  generalization                                        12.5            62.5       –",
        "  generalization, old gone                              50.0            87.5       –",
        "  chat                                                   0.0            33.3       6",
        "  chat, old gone                                         0.0            66.7       –",
        "  ripple                                                 0.0            25.0       4",
    ]
    # an evaluation without the generation family (an older manifest, generation=False) shows no such section
    before, after = _aggregates(gen=False)
    after |= {m: None for m in GEN_AFTER if not m.startswith("n_")}
    text = render_text(build_report({"model": "m", "aggregate": after}, {"model": "b", "aggregate": before}))
    assert "Generation" not in text and "ripple" not in text and text.splitlines()[-1].startswith("  specificity")


def test_markdown_has_the_generation_table_and_the_rewrite_continuations():
    from covedit.pipeline.report import render_markdown
    before, after = _aggregates(gen=True)
    for agg in (before, after):
        agg.update(ripple_acc=None, ripple_gen=None, n_ripple_acc=0, n_ripple_gen=0)
    fact = {"id": "eiffel", "efficacy_gen": 1.0, "generations": {"rewrite": " Rome,\n Italy"}}
    data = build_report({"model": "e", "aggregate": after, "per_fact": [fact]},
                        {"model": "b", "aggregate": before, "per_fact": [{**fact, "efficacy_gen": 0.0,
                                                                          "generations": {"rewrite": " Paris"}}]},
                        labels=("base", "edited"))
    md = render_markdown(data, [])
    assert "### Generation: the greedy continuation names the target (whole word, case-insensitive)" in md
    assert "| efficacy, old gone | rewrite prompt: no longer names target_true | 25.0 | 75.0 | – |" in md
    assert "| chat | rewrite prompt as a user turn of the chat template: the reply names target_new | 0.0 | 33.3 | 6 |" in md
    assert "ripple" not in md  # no fact has ripple prompts
    assert md.count("| efficacy generation | greedy continuation of the rewrite prompt |") == 1
    assert "| no → yes | \"Paris\" → \"Rome, Italy\" |" in md
