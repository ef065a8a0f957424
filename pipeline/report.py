"""Evaluation reports: ``report.json`` (everything), ``report.md`` (tables a person reads) and PNG plots.

A report compares two columns, "before" and "after" (an unedited and an edited model, a base model and
another one), or shows one column alone. Its input is a plain dict, built by ``build_report`` from two
``evaluate.Evaluation`` objects or by ``report_from_summary`` from a ``batch-edit`` summary::

    data = build_report(evaluate_model(edited, facts), before=evaluate_model(base, facts))
    write_report("report/", data)      # report/report.json, report.md, p_new.png, metrics.png

Quirks:

* The folder appears atomically: everything is written into a temporary folder next to it and renamed
  into place. A previous report there (a folder holding ``report.json``) is replaced; a folder holding
  anything else is refused, so a mistyped path never deletes someone's files.
* Plots use matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend change).
* Probabilities are shown in percent; metrics a fact cannot have are shown as "–" and left out of the
  aggregates, whose "facts" column says how many facts each one covers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from matplotlib.figure import Figure

from covedit.pipeline.atomic import replace_folder
from covedit.pipeline.errors import CannotWrite
from covedit.pipeline.evaluate import METRICS, Evaluation, drift

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MAX_FACT_ROWS = 50
FAMILIES = {
    "success": "Success rate: P(new) > P(true) (ROME/MEMIT papers, CounterFact)",
    "acc": "Top-1 token accuracy, teacher-forced (zsRE / EasyEdit)",
}
KINDS = ("efficacy", "generalization", "specificity")
KIND_NOTES = {
    ("efficacy", "success"): "rewrite prompt: P(new) > P(true)",
    ("generalization", "success"): "paraphrases: P(new) > P(true)",
    ("specificity", "success"): "neighbourhood: P(own target) > P(new)",
    ("efficacy", "acc"): "rewrite prompt, target_new tokens",
    ("generalization", "acc"): "paraphrases, target_new tokens",
    ("specificity", "acc"): "neighbourhood, their own target's tokens",
}
FAMILIES["gen"] = "Generation: the greedy continuation names the target (whole word, case-insensitive)"
# (row label, metric, what it is measured on) of each family; the generation family is shown where it was
# measured, and the OPTIONAL rows only where some fact has them (a chat template, ripple prompts).
FAMILY_ROWS = {
    "success": [(kind, f"{kind}_success", KIND_NOTES[(kind, "success")]) for kind in KINDS],
    "acc": [(kind, f"{kind}_acc", KIND_NOTES[(kind, "acc")]) for kind in KINDS]
    + [("ripple", "ripple_acc", "ripple prompts, their expected answer's tokens")],
    "gen": [("efficacy", "efficacy_gen", "rewrite prompt: names target_new"),
            ("efficacy, old gone", "efficacy_gen_old_gone", "rewrite prompt: no longer names target_true"),
            ("generalization", "generalization_gen", "paraphrases: name target_new"),
            ("generalization, old gone", "generalization_gen_old_gone", "paraphrases: no longer name target_true"),
            ("chat", "chat_gen", "rewrite prompt as a user turn of the chat template: the reply names target_new"),
            ("chat, old gone", "chat_gen_old_gone", "the same reply no longer names target_true"),
            ("ripple", "ripple_gen", "ripple prompts: name their expected answer")],
}
OPTIONAL_ROWS = {"ripple_acc", "chat_gen", "chat_gen_old_gone", "ripple_gen"}
GEN_NOTE = ("Greedy continuations, short ones: the longer of the two targets' tokens and a few more (a chat reply: "
            "also the question's tokens), so an answer given later counts as not given. \"Old gone\": the true "
            "target is no longer named (facts with a true target).")


def shown_rows(fam: str, aggregates: list[dict | None]) -> list[tuple[str, str, str]]:
    """The rows of family ``fam`` to show for these aggregates (the columns): the success and accuracy families
    always show their three kinds; the generation family nothing where it was not measured; an OPTIONAL row
    only where some column has it (None is "no fact has it", never shown as 0)."""
    aggs = [a or {} for a in aggregates]

    def has(m: str) -> bool:
        return any(a.get(m) is not None for a in aggs)

    rows = FAMILY_ROWS[fam]
    if fam == "gen" and not any(has(m) for _, m, _ in rows):
        return []
    return [r for r in rows if r[1] not in OPTIONAL_ROWS or has(r[1])]


# ------------------------------------------------------------------------------------------ building the data

def _as_dict(ev: Evaluation | dict | None) -> dict | None:
    return ev.to_dict() if isinstance(ev, Evaluation) else ev


def build_report(after: Evaluation | dict, before: Evaluation | dict | None = None, title: str = "covedit evaluation",
                 labels: tuple[str, str] = ("before", "after"), update_norms: dict | None = None,
                 meta: dict | None = None) -> dict:
    """The report's data; drift is computed when both evaluations hold next-token distributions."""
    d = None
    if (isinstance(before, Evaluation) and isinstance(after, Evaluation)
            and before.next_tokens is not None and after.next_tokens is not None):
        d = drift(before.next_tokens, after.next_tokens)
    return {"title": title, "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "labels": {"before": labels[0], "after": labels[1]},
            "before": _as_dict(before), "after": _as_dict(after), "drift": d,
            "update_norms": update_norms, "meta": meta or {}}


def quick_look(ev: dict | None, n: int = 5) -> str:
    """A small before/after table of a batch-edit evaluation (None: not evaluated, nothing to show): P(new
    target) on the rewrite prompt and paraphrases, P(own target) nearby, the aggregates, drift, fluency."""
    if not ev:
        return ""

    def pct(x):
        return "  -  " if x is None else f"{100 * x:5.1f}"

    lines = ["", "fact                       P(new) rewrite    P(new) paraphrase   P(true) neighbourhood",
             "                           before  after     before  after       before  after"]
    for row in ev["per_fact"][:n]:
        b, a = row["before"], row["after"]
        lines.append(f"{row['id'][:26]:<26} {pct(b['p_new_rewrite'])}  {pct(a['p_new_rewrite'])}     "
                     f"{pct(b['p_new_paraphrase'])}  {pct(a['p_new_paraphrase'])}       "
                     f"{pct(b['p_own_neighborhood'])}  {pct(a['p_own_neighborhood'])}")
    if len(ev["per_fact"]) > n:
        lines.append(f"... and {len(ev['per_fact']) - n} more facts (manifest.json has them all)")
    lines.append("")
    lines.append("aggregate (%)              " + "  ".join(f"{k}" for k in ("efficacy", "generalization", "specificity")))
    for fam in ("success", "acc"):
        for when in ("before", "after"):
            vals = [ev[when].get(f"{m}_{fam}") for m in ("efficacy", "generalization", "specificity")]
            label = {"success": "success P(new)>P(true)", "acc": "top-1 token accuracy"}[fam]
            lines.append(f"{label:<22} {when:<6} " + "  ".join("   -   " if v is None else f"{v:7.1f}" for v in vals))
    lines += _quick_look_generation(ev)
    d, flu = ev.get("drift"), ev.get("fluency") or {}
    if d:
        lines.append(f"drift on {d['n_prompts']} unrelated prompts: mean KL {d['mean_kl']:.4f} nats, "
                     f"top-1 token changed on {d['top1_changed_pct']:.1f} %")
    if flu.get("before") and flu.get("after"):
        lines.append(f"fluency (GE, n-gram entropy x100): {flu['before']['ge']:.1f} -> {flu['after']['ge']:.1f}")
    return "\n".join(lines)


def _quick_look_generation(ev: dict) -> list[str]:
    """quick_look's lines of the generation family (in the columns of the others), then the chat reply and
    the ripple prompts, each only where it was measured."""
    b, a = ev.get("before") or {}, ev.get("after") or {}
    shown = {m for _, m, _ in shown_rows("gen", [b, a])}
    lines = []
    if shown:
        for label, suffix in (("generation: new named", "gen"), ("generation: old gone", "gen_old_gone")):
            for when, agg in (("before", b), ("after", a)):
                vals = [agg.get(f"{k}_{suffix}") for k in ("efficacy", "generalization")] + [None]
                lines.append(f"{label:<22} {when:<6} " + "  ".join("   -   " if v is None else f"{v:7.1f}" for v in vals))

    def change(m: str) -> str:
        return f"{_pct(b.get(m))} -> {_pct(a.get(m))}"

    if "chat_gen" in shown:
        lines.append("chat reply to the rewrite prompt (%): new named " + change("chat_gen")
                     + (f", old gone {change('chat_gen_old_gone')}" if "chat_gen_old_gone" in shown else ""))
    ripple = [(name, m) for name, m in (("token accuracy", "ripple_acc"), ("generation names it", "ripple_gen"))
              if a.get(m) is not None or b.get(m) is not None]
    if ripple:
        n = a.get("n_ripple_acc") or a.get("n_ripple_gen")
        lines.append("ripple prompts, expected answer (%): " + ", ".join(f"{name} {change(m)}" for name, m in ripple)
                     + (f" ({n} facts)" if n else ""))
    return lines


def report_from_summary(summary: dict) -> dict:
    """Report data from a ``batch-edit`` summary (its before/after evaluation and per-layer update norms)."""
    ev = summary.get("evaluation") or {}
    per = ev.get("per_fact") or []
    model = summary.get("model")

    def side(when: str) -> dict | None:
        if not ev.get(when):
            return None
        return {"model": model if when == "before" else f"{model} + {summary.get('method')} edit",
                "n_facts": len(per), "aggregate": ev[when], "per_fact": [r[when] for r in per],
                "unrelated": None, "fluency": (ev.get("fluency") or {}).get(when)}

    meta = {k: summary.get(k) for k in ("method", "layers", "n_facts", "facts_file", "facts_sha256", "hparams", "timings")}
    return {"title": f"covedit batch-edit: {summary.get('method')} on {summary.get('n_facts')} facts",
            "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "labels": {"before": "unedited", "after": "edited"},
            "before": side("before"), "after": side("after") or {"model": model, "per_fact": [], "aggregate": {}},
            "drift": ev.get("drift"), "update_norms": summary.get("update_norms"), "meta": meta}


# ------------------------------------------------------------------------------------------ markdown

def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _prob(p: float | None) -> str:
    """A probability in percent with three significant figures (small ones stay readable)."""
    if p is None:
        return "–"
    v = 100 * p
    return "0" if v == 0 else (f"{v:.3g}" if v >= 0.01 else f"{v:.1e}")


def _quoted(text: str | None) -> str:
    """A generated text for a table cell: whitespace runs as one space, in quotes; – where there is none."""
    return "–" if text is None else '"' + " ".join(text.split()) + '"'


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return out


def render_markdown(data: dict, plots: list[str]) -> str:
    """report.md: aggregates of the metric families side by side (generation, chat and ripple rows where
    measured), drift, fluency, norms, first facts."""
    before, after = data.get("before"), data["after"]
    lb, la = data["labels"]["before"], data["labels"]["after"]
    cols = [lb, la] if before else [la]
    lines = [f"# {data['title']}", "", f"Created {data['created']}.", ""]
    if before:
        lines.append(f"- **{lb}**: `{before.get('model')}`")
    lines.append(f"- **{la}**: `{after.get('model')}`")
    lines.append(f"- facts: {after.get('n_facts', len(after.get('per_fact', [])))}")
    for k, v in (data.get("meta") or {}).items():
        if v is not None and k in ("method", "layers", "facts_file"):
            lines.append(f"- {k}: {v}")
    lines.append("")

    lines += ["## Aggregate metrics (%)", "",
              "Each metric is the mean over the facts that have it; \"facts\" says how many that is "
              "(a fact without paraphrases has no generalisation, a fact without a true target has no success metrics).",
              ""]
    aggs = [(before.get("aggregate") or {}) if before else None, after.get("aggregate") or {}]
    for fam, title in FAMILIES.items():
        shown = shown_rows(fam, aggs)
        if not shown:
            continue
        lines += [f"### {title}", ""]
        if fam == "gen":
            lines += [GEN_NOTE, ""]
        rows = []
        for kind, m, note in shown:
            vals = ([_pct(aggs[0].get(m))] if before else []) + [_pct(aggs[1].get(m))]
            n = aggs[1].get(f"n_{m}")
            rows.append([kind, note, *vals, "–" if n is None else str(n)])
        lines += _table(["metric", "measured on", *cols, "facts"], rows) + [""]

    lines += ["## Drift on unrelated prompts", ""]
    d = data.get("drift")
    if d:
        lines += [f"Next-token distribution after {d['n_prompts']} fixed unrelated prompts (`pipeline/data/unrelated_prompts.txt`), "
                  f"{lb} vs {la}.", ""]
        lines += _table(["mean KL(before ‖ after) (nats)", "max KL (nats)", "top-1 token changed (%)"],
                        [[f"{d['mean_kl']:.4g}", f"{d['max_kl']:.4g}", f"{d['top1_changed_pct']:.1f}"]]) + [""]
        changed = [r for r in d["per_prompt"] if r["top1_before"] != r["top1_after"]]
        shown = changed[:10] + [r for r in sorted(d["per_prompt"], key=lambda r: -r["kl"]) if r not in changed][:max(0, 5 - len(changed))]
        lines += [f"Prompts whose top-1 token changed ({len(changed)}), then those with the largest KL:", ""]
        lines += _table(["prompt", "KL", f"top-1 {lb}", f"top-1 {la}"],
                        [[r["prompt"], f"{r['kl']:.3g}", repr(r["top1_before"]), repr(r["top1_after"])]
                         for r in shown]) + [""]
    else:
        lines += ["Not measured (it needs both models: `covedit evaluate --model EDITED --base-model BASE`).", ""]

    lines += ["## Fluency", ""]
    flu = [(lb, before.get("fluency") if before else None), (la, after.get("fluency"))]
    flu = [(label, f) for label, f in flu if f]
    if flu:
        lines += ["Weighted 2- and 3-gram entropy of greedy generations (ROME/MEMIT \"GE\"; papers print it ×100, "
                  f"about 620 for an unedited GPT-2 XL on 100-token texts). {flu[0][1]['n_prompts']} prompts, "
                  f"{flu[0][1]['max_new_tokens']} new tokens each.", ""]
        lines += _table(["model", "n-gram entropy (bits)", "GE (×100)"],
                        [[label, f"{f['ngram_entropy']:.3f}", f"{f['ge']:.1f}"] for label, f in flu]) + [""]
        for label, f in flu:
            g = f["generations"][0]
            text = " ".join((g["prompt"] + g["continuation"]).split())
            lines += [f"Example ({label}): {text}", ""]
    else:
        lines += ["Not measured.", ""]

    norms = data.get("update_norms")
    if norms:
        lines += ["## Update norms", ""]
        lines += _table(["layer", "‖ΔW‖_F"], [[str(k), f"{v:.4g}"] for k, v in sorted(norms.items(), key=lambda kv: int(kv[0]))]) + [""]

    per_a = after.get("per_fact") or []
    per_b = (before.get("per_fact") or []) if before else []
    if per_a:
        lines += [f"## Per fact (first {min(MAX_FACT_ROWS, len(per_a))} of {len(per_a)}; report.json has all)", ""]
        arrow = (lambda b, a: f"{b} → {a}") if before else (lambda b, a: a)
        header = ["fact", "P(new) rewrite %", "P(true) rewrite %", "P(new) paraphrase %", "P(own) neighbourhood %",
                  "efficacy success", "efficacy token acc %"]
        with_gen = any(r.get("efficacy_gen") is not None for r in per_a)
        if with_gen:
            header += ["efficacy generation", "greedy continuation of the rewrite prompt"]
        rows = []
        for i, a in enumerate(per_a[:MAX_FACT_ROWS]):
            b = per_b[i] if i < len(per_b) else {}

            def cell(key, fmt):
                return arrow(fmt(b.get(key)), fmt(a.get(key)))

            rows.append([str(a.get("id")), cell("p_new_rewrite", _prob), cell("p_true_rewrite", _prob),
                         cell("p_new_paraphrase", _prob), cell("p_own_neighborhood", _prob),
                         cell("efficacy_success", lambda x: "–" if x is None else ("yes" if x >= 0.5 else "no")),
                         cell("efficacy_acc", lambda x: _pct(None if x is None else 100 * x, 0))])
            if with_gen:
                said = cell("efficacy_gen", lambda x: "–" if x is None else ("yes" if x >= 0.5 else "no"))
                rows[-1] += [said, arrow(*(_quoted((r.get("generations") or {}).get("rewrite")) for r in (b, a)))]
        lines += _table(header, rows) + [""]
        if before:
            lines += [f"Cells read \"{lb} → {la}\".", ""]

    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def render_text(data: dict) -> str:
    """A short plain-text summary for the terminal: the metric families side by side (generation, chat and
    ripple where measured), drift, fluency."""
    before, after = data.get("before"), data["after"]
    lb, la = data["labels"]["before"], data["labels"]["after"]
    cols = [lb, la] if before else [la]
    head = f"{'aggregate (%)':<44}" + "".join(f"{c[:14]:>16}" for c in cols) + f"{'facts':>8}"
    lines = ([f"{lb}: {before.get('model')}"] if before else []) + [f"{la}: {after.get('model')}", "", head]
    aggs = [(before.get("aggregate") or {}) if before else None, after.get("aggregate") or {}]
    for fam, title in FAMILIES.items():
        shown = shown_rows(fam, aggs)
        if shown:
            lines.append(title.split(" (")[0])
        for kind, m, _ in shown:
            vals = ([aggs[0].get(m)] if before else []) + [aggs[1].get(m)]
            n = aggs[1].get(f"n_{m}")
            lines.append(f"  {kind:<42}" + "".join(f"{_pct(v):>16}" for v in vals) + f"{'–' if n is None else n:>8}")
    d = data.get("drift")
    if d:
        lines.append(f"drift on {d['n_prompts']} unrelated prompts: mean KL {d['mean_kl']:.4g} nats, "
                     f"top-1 token changed on {d['top1_changed_pct']:.1f} %")
    flu = [(label, ev.get("fluency")) for label, ev in ((lb, before), (la, after)) if ev and ev.get("fluency")]
    if flu:
        lines.append("fluency (n-gram entropy ×100, GE): " + ", ".join(f"{label} {f['ge']:.1f}" for label, f in flu))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots

BEFORE_COLOR, AFTER_COLOR = "#9aa5b1", "#1f77b4"


def plot_p_new(data: dict, path: Path) -> bool:
    """P(new target) on the rewrite prompt per fact: before against after (log-log), or sorted alone."""
    after = [r.get("p_new_rewrite") for r in data["after"].get("per_fact") or []]
    if not after:
        return False
    before_d = data.get("before")
    fig = Figure(figsize=(6.4, 5.2), dpi=110)
    ax = fig.add_subplot()
    floor = 1e-8
    if before_d and before_d.get("per_fact"):
        before = [r.get("p_new_rewrite") for r in before_d["per_fact"]]
        ids = [r.get("id") for r in data["after"]["per_fact"]]
        kept = [(i, max(b, floor), max(a, floor)) for i, b, a in zip(ids, before, after) if a is not None and b is not None]
        pairs = [(b, a) for _, b, a in kept]
        xs, ys = zip(*pairs)
        ax.scatter(xs, ys, s=22, color=AFTER_COLOR, alpha=0.75, edgecolors="none")
        if len(kept) <= 20:  # few facts: name them
            for i, b, a in kept:
                ax.annotate(str(i)[:24], (b, a), xytext=(4, -10), textcoords="offset points", fontsize=7, color="#444444")
        lo = min(min(xs), min(ys)) / 2
        ax.plot([lo, 1], [lo, 1], color="#888888", lw=1, ls="--", label="unchanged")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlim(lo, 1.5), ax.set_ylim(lo, 1.5)
        ax.set_xlabel(f"P(new target), {data['labels']['before']}  (values below 1e-8 drawn at 1e-8)")
        ax.set_ylabel(f"P(new target), {data['labels']['after']}")
        up = sum(a > b for b, a in pairs)
        ax.set_title(f"P(new target) on the rewrite prompt, {len(pairs)} facts ({up} rose)")
        ax.legend(loc="lower right")
    else:
        vals = sorted(max(a, floor) for a in after if a is not None)
        ax.bar(range(len(vals)), vals, color=AFTER_COLOR, width=0.9)
        ax.set_yscale("log")
        ax.set_xlabel("facts, sorted")
        ax.set_ylabel(f"P(new target) {data['labels']['after']}")
        ax.set_title(f"P(new target) on the rewrite prompt, {len(vals)} facts")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def plot_metrics(data: dict, path: Path) -> bool:
    """Bars of the aggregate metrics, one panel per family, before next to after."""
    before = (data.get("before") or {}).get("aggregate") if data.get("before") else None
    after = data["after"].get("aggregate") or {}
    if not any(after.get(m) is not None for m in METRICS):
        return False
    panels = [(fam, title, rows) for fam, title in FAMILIES.items() if (rows := shown_rows(fam, [before, after]))]
    fig = Figure(figsize=(max(10.0, 1.0 * sum(len(r) for *_, r in panels) + 1.5), 4.2), dpi=110)
    axes = fig.subplots(1, len(panels), sharey=True, gridspec_kw={"width_ratios": [len(r) for *_, r in panels]})
    axes = [axes] if len(panels) == 1 else list(axes)
    width = 0.38 if before else 0.6
    for ax, (fam, title, rows) in zip(axes, panels):
        series = ([(data["labels"]["before"], before, BEFORE_COLOR)] if before else []) + [(data["labels"]["after"], after, AFTER_COLOR)]
        for j, (label, agg, color) in enumerate(series):
            offset = (j - (len(series) - 1) / 2) * width
            for i, (_, m, _) in enumerate(rows):
                v = agg.get(m)
                x = i + offset
                if v is None:
                    ax.text(x, 2, "n/a", ha="center", va="bottom", fontsize=8, color="#666666")
                    continue
                ax.bar(x, v, width=width * 0.95, color=color, label=label if i == 0 else None)
                ax.text(x, v + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), [kind.replace(", ", ",\n") for kind, _, _ in rows], fontsize=8)
        ax.set_ylim(0, 110)
        ax.set_title("Generation: names the target" if fam == "gen" else title.split(" (")[0], fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("% of facts (accuracy: of target tokens)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, format="png")
    return True


def plot_update_norms(norms: dict, path: Path) -> bool:
    """Frobenius norm of each layer's weight update."""
    if not norms:
        return False
    items = sorted(((int(k), float(v)) for k, v in norms.items()))
    fig = Figure(figsize=(6.4, 3.8), dpi=110)
    ax = fig.add_subplot()
    ax.bar([str(k) for k, _ in items], [v for _, v in items], color=AFTER_COLOR)
    ax.set_xlabel("layer")
    ax.set_ylabel("‖ΔW‖ (Frobenius)")
    ax.set_title("Update norm per edited layer")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


# ------------------------------------------------------------------------------------------ writing

def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _write_files(folder: Path, data: dict) -> list[str]:
    plots = []
    for name, fn in (("p_new.png", lambda p: plot_p_new(data, p)), ("metrics.png", lambda p: plot_metrics(data, p)),
                     ("update_norms.png", lambda p: plot_update_norms(data.get("update_norms") or {}, p))):
        if fn(folder / name):
            plots.append(name)
    (folder / REPORT_JSON).write_text(json.dumps(_json_safe({**data, "plots": plots}), indent=2, default=str) + "\n")
    (folder / REPORT_MD).write_text(render_markdown(data, plots), encoding="utf-8")
    return plots


def check_report_dir(report_dir: Path | str, marker: str = REPORT_JSON, kind: str = "covedit report") -> None:
    """Refuse, before any work is done, a report path that is a file or a folder of other files (a folder
    holding ``marker`` is an earlier report of this ``kind``, which may be replaced)."""
    report_dir = Path(report_dir).expanduser()
    if report_dir.exists() and not report_dir.is_dir():
        raise CannotWrite(f"Report path {report_dir} exists and is not a folder.")
    if report_dir.is_dir() and any(report_dir.iterdir()) and not (report_dir / marker).exists():
        raise CannotWrite(f"Report folder {report_dir} holds files that are not a {kind}; choose a new or empty folder.")
    probe = report_dir.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CannotWrite(f"Cannot create the report folder {report_dir}: {probe} is not a folder.")


def write_report(report_dir: Path | str, data: dict) -> Path:
    """Write report.json, report.md and the plots into ``report_dir``, atomically (see the module docstring)."""
    report_dir = Path(report_dir).expanduser()
    check_report_dir(report_dir)
    replace_folder(report_dir, lambda tmp: _write_files(tmp, data), "the report")
    log.info("wrote the report to %s", report_dir)
    return report_dir
