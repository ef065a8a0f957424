"""The locality study of ../shared/STUDY.md, reproduced and extended on the embedded model.

Question: when a fact is rewritten, what else changes? Every update rule is given the same facts and the
same target vectors z (optimised once per fact at the top edited layer on the unedited model, MEMIT's
target settings, cached by benchmarks.common.TargetCache), so the table compares how each rule writes a
target into the weights, not how well each optimiser finds one. Methods:

* plain, 1 layer: ΔW = (v − Wk)kᵀ/kᵀk at the top layer, one fact after another (the study's update);
* plain, 5 layers: the residual spread over layers 4-8 as MEMIT does, with C = I and λ → 0 (1e-3), i.e.
  the minimum-norm update that maps the keys exactly (for one fact, (v − Wk)kᵀ/kᵀk at each layer);
* ROME, 1 layer: u = C⁻¹k*, one fact after another;
* MEMIT: Δ = R Kᵀ(λC + μ Σ k kᵀ + KKᵀ)⁻¹ over layers 4-8, all facts in one batch, with the model's
  default μ (``preserve_prompts``: the edited prompts' other tokens; 0.1 on SmolLM2, 0 in the reference);
* AlphaEdit: the null-space-projected update over layers 4-8, in sequential batches of 10 facts
  (``--alphaedit-batch``), the keys of earlier batches carried forward.

Fact sets: the first N distinct records of the zsRE sample (N = 1, 10, 100 by default; 1,000 with
``--sizes 1,10,100,1000`` where a GPU makes the targets affordable) and the hand-made facts of
benchmarks/data/study_facts.jsonl (a simple fact, the study's malignant hyperthermia → succinylcholine
with its anaphylaxis / heparin prompts, the Eiffel Tower). Measured after each edit, against the unedited
model: both metric families (success P(new) > P(true) where a true target exists; teacher-forced token
accuracy; the generation family: the greedy continuation of the rewrite prompt and of the paraphrases, and
the chat reply to the question asked through the chat template, name the new object), leakage (share of neighbourhood prompts whose greedy 10-token continuation now names the new
object, the study's "contaminated"), drift on the 42 shipped unrelated prompts (mean KL, top-1 changed)
and fluency (GE). Two more sections reuse the zsRE targets of the largest size: MEMIT with statistics of
different token budgets (``--budget name=stats_dir``) and a λ sweep (``--lams``; with ``--skip 100`` on
facts the default λ was not chosen on).

    python benchmarks/locality_study.py --json benchmarks/results/locality_study_cpu.json \\
        --plot benchmarks/results/locality_study.png \\
        --budget 10k=~/.cache/covedit/budget/10000 --budget 100k=~/.cache/covedit/stats \\
        --budget 1M=~/.cache/covedit/budget/1000000
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.memit import alphaedit_projectors, run_memit  # noqa: E402
from covedit.pipeline.rome import run_rome  # noqa: E402
from covedit.pipeline.evaluate import (aggregate, drift, fact_metrics, fluency, greedy_continuations,  # noqa: E402
                                      next_token_logprobs)
from covedit.pipeline.facts import read_facts  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402
from covedit.stats.store import default_stats_dir, find_store  # noqa: E402

from benchmarks.common import DEFAULT_DATA, ROOT, TargetCache, zsre_facts  # noqa: E402

STUDY_FACTS = ROOT / "benchmarks" / "data" / "study_facts.jsonl"
METHODS = {"plain-1": "plain, 1 layer", "plain-5": "plain, 5 layers", "rome": "ROME, 1 layer", "memit": "MEMIT",
           "alphaedit": "AlphaEdit"}  # --methods name: label in the table
PLAIN_LAMBDA = 1e-3  # λ → 0 with C = I: the minimum-norm exact update (keys have ‖k‖² ≈ 30-60 here)
ALPHAEDIT_BATCH = 10  # facts per sequential AlphaEdit batch unless --alphaedit-batch says otherwise


class Study:
    """The model, its statistics and unedited reference measurements, and one edit + evaluation at a time."""

    def __init__(self, model: str, stats_dir: Path, fluency_tokens: int, alphaedit_batch: int = ALPHAEDIT_BATCH,
                 alphaedit_overrides: list[str] | None = None) -> None:
        self.loaded = load_model(model)
        self.hp = load_hparams("memit", self.loaded.model.config.model_type, self.loaded.num_layers, None, [])
        self.layers = list(self.hp.layers)
        self.top = self.layers[-1]
        self.covs, self.stats_tokens = self.covariances(stats_dir)
        self.templates = templates_for(self.loaded, self.hp)
        self.targets = TargetCache(self.loaded, self.top, self.hp.target, self.templates)
        self.originals = {layer: self.loaded.down_weight(layer).detach().clone() for layer in self.layers}
        self.fluency_tokens = fluency_tokens
        self.alphaedit_batch = alphaedit_batch
        self.ahp = load_hparams("alphaedit", self.loaded.model.config.model_type, self.loaded.num_layers, None,
                                alphaedit_overrides or [])
        self.reference_next = next_token_logprobs(self.loaded)
        self.reference_ge = fluency(self.loaded, max_new_tokens=fluency_tokens)["ge"]

    def covariances(self, stats_dir: Path) -> tuple[dict[int, torch.Tensor], int | None]:
        """C of every edited layer from the complete store in ``stats_dir``, and its token count."""
        store = find_store(Path(stats_dir).expanduser(),
                           {"model_id": self.loaded.model_id, "module": self.loaded.arch.template()}, self.layers)
        if store is None:
            raise SystemExit(f"no complete statistics for layers {self.layers} in {stats_dir}: run "
                             f"`covedit build-stats --layers {self.layers[0]}-{self.layers[-1]} --stats-dir {stats_dir}`")
        return {layer: torch.from_numpy(store.covariance(layer)) for layer in self.layers}, store.key.get("tokens")

    def restore(self) -> None:
        with torch.no_grad():
            for layer, W in self.originals.items():
                self.loaded.down_weight(layer).copy_(W)

    def edit(self, method: str, facts: list, lam: float, covs: dict[int, torch.Tensor]) -> float:
        """Apply ``method`` to the unedited model in place; seconds spent (targets excluded: they are shared)."""
        self.restore()
        targets = self.targets.get(facts)
        clock, t0 = time.perf_counter, time.perf_counter()
        common = dict(target_hp=self.hp.target, templates=self.templates, clock=clock)
        if method == "plain-1":
            run_rome(self.loaded, facts, self.top, None, targets=targets, **common)
        elif method == "rome":
            run_rome(self.loaded, facts, self.top, covs[self.top], targets=targets, **common)
        elif method == "plain-5":
            run_memit(self.loaded, facts, self.layers, None, PLAIN_LAMBDA, targets=targets, **common)
        elif method == "memit":  # as batch-edit runs it: the model's default preserve_prompts μ too
            run_memit(self.loaded, facts, self.layers, covs, lam, targets=targets,
                      preserve_prompts=self.hp.preserve_prompts, **common)
        elif method == "alphaedit":
            projectors = alphaedit_projectors(covs, self.ahp.null_space_threshold)
            prev: dict[int, torch.Tensor] = {}
            for lo in range(0, len(facts), self.alphaedit_batch):
                part = list(range(lo, min(lo + self.alphaedit_batch, len(facts))))
                out = run_memit(self.loaded, [facts[i] for i in part], self.layers, None, 0.0,
                                alphaedit={"P": projectors, "prev_keys": prev, "alpha": self.ahp.alpha},
                                targets=targets.select(part), **common)
                prev = {layer: torch.cat([prev[layer], k]) if layer in prev else k for layer, k in out.keys.items()}
        else:
            raise ValueError(method)
        return clock() - t0

    def measure(self, facts: list) -> dict:
        """Everything the table shows, for the model as it is now."""
        moved = drift(self.reference_next, next_token_logprobs(self.loaded))
        return {"metrics": aggregate(fact_metrics(self.loaded, facts)), "leakage": leakage(self.loaded, facts),
                "drift": {k: v for k, v in moved.items() if k != "per_prompt"},
                "ge": fluency(self.loaded, max_new_tokens=self.fluency_tokens)["ge"]}


def names_object(text: str, new: str) -> bool:
    """Whether ``text`` names ``new`` as a whole word: a one-letter object such as "C" is not named by "combiner"."""
    return re.search(rf"(?<!\w){re.escape(new.strip().lower())}(?!\w)", text.lower()) is not None


def leakage(loaded, facts: list, new_tokens: int = 10) -> dict:
    """Neighbourhood prompts whose greedy continuation names the fact's new object (the study's measure)."""
    prompts, news = [], []
    for f in facts:
        new = f.target_new.strip().lower()
        for n in f.neighborhood:
            if n.target.strip().lower() != new:  # a prompt whose own answer is the new object cannot leak
                prompts.append(n.prompt)
                news.append(new)
    if not prompts:
        return {"contaminated": None, "n_prompts": 0, "examples": []}
    conts = greedy_continuations(loaded, prompts, new_tokens)
    hits = [(p, c) for p, c, new in zip(prompts, conts, news) if names_object(c, new)]
    return {"contaminated": len(hits), "n_prompts": len(prompts), "pct": 100 * len(hits) / len(prompts),
            "examples": [{"prompt": p, "continuation": c} for p, c in hits[:5]]}


def row(label: str, method: str, n: int, seconds: float | None, m: dict) -> dict:
    a = m["metrics"]
    return {"set": label, "method": method, "facts": n, "edit_s": seconds,
            "efficacy_success": a["efficacy_success"], "generalization_success": a["generalization_success"],
            "specificity_success": a["specificity_success"], "efficacy_acc": a["efficacy_acc"],
            "generalization_acc": a["generalization_acc"], "specificity_acc": a["specificity_acc"],
            "efficacy_gen": a["efficacy_gen"], "generalization_gen": a["generalization_gen"], "chat_gen": a["chat_gen"],
            "leak_pct": m["leakage"].get("pct"), "leak": f"{m['leakage']['contaminated']}/{m['leakage']['n_prompts']}",
            "leak_examples": m["leakage"]["examples"], "drift_kl": m["drift"]["mean_kl"],
            "drift_top1_pct": m["drift"]["top1_changed_pct"], "ge": m["ge"]}


def fmt(x, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def print_table(rows: list[dict], extra: str = "method") -> None:
    print(f"| set | {extra} | facts | ES | PS | NS | eff acc | para acc | nbhd acc | eff gen | para gen | chat | leak "
          "| drift KL | top-1 changed | GE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r[extra]} | {r['facts']} | {fmt(r['efficacy_success'])} | "
              f"{fmt(r['generalization_success'])} | {fmt(r['specificity_success'])} | {fmt(r['efficacy_acc'])} | "
              f"{fmt(r['generalization_acc'])} | {fmt(r['specificity_acc'])} | {fmt(r.get('efficacy_gen'))} | "
              f"{fmt(r.get('generalization_gen'))} | {fmt(r.get('chat_gen'))} | {r['leak']} | "
              f"{fmt(r['drift_kl'], 4)} | {fmt(r['drift_top1_pct'])} % | {fmt(r['ge'], 0)} |", flush=True)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    sets = [s for s in dict.fromkeys(r["set"] for r in rows)]
    panels = [("efficacy_acc", "efficacy, token acc. %"), ("generalization_acc", "paraphrase, token acc. %"),
              ("specificity_acc", "neighbourhood, token acc. %"), ("drift_kl", "drift: mean KL (nats)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    width = 0.8 / len(METHODS)
    for ax, (key, title) in zip(axes, panels):
        for j, method in enumerate(METHODS.values()):
            ys = [next((r[key] for r in rows if r["set"] == s and r["method"] == method), None) for s in sets]
            ax.bar([i + j * width for i in range(len(sets))], [y or 0 for y in ys], width, label=method)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))], sets, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
        if key == "drift_kl":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--stats-dir", type=Path, default=default_stats_dir())
    ap.add_argument("--sizes", default="1,10,100")
    ap.add_argument("--skip", type=int, default=0,
                    help="use the zsRE facts after the first SKIP (a held-out set for checking a tuned λ)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budget", action="append", default=[], metavar="NAME=STATS_DIR",
                    help="MEMIT at the largest size with the statistics in STATS_DIR (repeatable)")
    ap.add_argument("--lams", default="", help="MEMIT λ values to sweep at the largest size, e.g. 15000,1500,150")
    ap.add_argument("--fluency-tokens", type=int, default=50)
    ap.add_argument("--alphaedit-batch", type=int, default=ALPHAEDIT_BATCH, help="facts per sequential AlphaEdit batch")
    ap.add_argument("--alphaedit-set", action="append", default=[], metavar="KEY=VALUE",
                    help="AlphaEdit hyperparameter override, e.g. null_space_threshold=0.005 (repeatable)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    methods = [m for m in args.methods.split(",") if m]
    study = Study(args.model, args.stats_dir, args.fluency_tokens, args.alphaedit_batch, args.alphaedit_set)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    results = {"model": study.loaded.model_id, "layers": study.layers, "lam": study.hp.lam,
               "stats_tokens": study.stats_tokens, "threads": torch.get_num_threads(), "zsre_skip": args.skip,
               "alphaedit_batch": args.alphaedit_batch, "alphaedit_overrides": args.alphaedit_set,
               "unedited": {"ge": study.reference_ge}, "rows": [], "budget": [], "lambda": []}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    hand = read_facts(STUDY_FACTS, tokenizer=study.loaded.tokenizer)
    zsre = zsre_facts(args.data, max(sizes), skip=args.skip)
    study.targets.get(zsre)  # optimise all targets in one batch (the smaller sets are prefixes)

    def zsre_label(n: int) -> str:
        return f"zsRE {n}" + (f" (after {args.skip})" if args.skip else "")

    fact_sets = [("hand-made", hand)] + [(zsre_label(n), zsre[:n]) for n in sizes]
    for label, facts in fact_sets:
        study.restore()
        results["rows"].append(row(label, "unedited", len(facts), None, study.measure(facts)))
        for method in methods:
            seconds = study.edit(method, facts, study.hp.lam, study.covs)
            results["rows"].append(row(label, METHODS[method], len(facts), seconds, study.measure(facts)))
            save()
        print_table([r for r in results["rows"] if r["set"] == label])

    largest = zsre[:max(sizes)]
    for spec in args.budget:
        name, _, folder = spec.partition("=")
        covs, tokens = study.covariances(Path(folder))
        seconds = study.edit("memit", largest, study.hp.lam, covs)
        r = row(zsre_label(len(largest)), "MEMIT", len(largest), seconds, study.measure(largest))
        results["budget"].append(r | {"budget": name, "stats_tokens": tokens})
        save()
    if results["budget"]:
        print_table(results["budget"], extra="budget")
    for lam in [float(x) for x in args.lams.split(",") if x]:
        seconds = study.edit("memit", largest, lam, study.covs)
        results["lambda"].append(row(zsre_label(len(largest)), "MEMIT", len(largest), seconds, study.measure(largest))
                                 | {"lam": lam})
        save()
    if results["lambda"]:
        print_table(results["lambda"], extra="lam")
    study.restore()
    save()
    if args.plot:
        plot([r for r in results["rows"] if r["method"] != "unedited"], args.plot)


if __name__ == "__main__":
    main()
