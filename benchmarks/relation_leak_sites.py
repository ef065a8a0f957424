"""Where a batch edit leaks into same-relation prompts: at the neighbour's subject tokens, at its last token,
or at its other tokens (issue 14, the diagnostic after preserve_relation's negative result).

After MEMIT edits the 100 counterfactual facts of benchmarks/relation_locality.py ("The capital of France is"
→ another capital), many prompts of the same relations about subjects never edited ("The capital of Kenya
is") change their top-1 token. Two explanations predict different things:

* **subject keys** — the neighbour's subject tokens produce keys close (in the C⁻¹ metric) to an edited
  subject's, so Δ writes there: applying Δ *only at the neighbour's subject tokens* reproduces the leak;
* **relation context** — the tokens the prompts share ("The capital of … is") carry the leak: applying Δ
  only at the last token (where the next token is predicted) or at the other non-subject tokens reproduces it.

The edit's factors ΔW = up @ down per layer are computed once (default hyperparameters, targets from the
shared cache); the model keeps its original weights and a forward hook adds ΔW k_t to each edited
down-projection's output at the chosen positions t only. ``everywhere`` must equal the edited model (checked
and reported). Per condition: share of same-relation neighbour prompts whose top-1 token is unchanged, and
mean KL of the next-token distribution from the unedited model.

    python benchmarks/relation_leak_sites.py --json benchmarks/results/relation_leak_sites_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import delta_at  # noqa: E402
from benchmarks.relation_locality import RELATIONS, setup  # noqa: E402
from covedit.pipeline.keys import encode_with_subject  # noqa: E402
from covedit.pipeline.memit import run_memit  # noqa: E402

CONDITIONS = ("unedited", "everywhere", "subject tokens", "last token", "other tokens")


def positions(tokenizer, template: str, subject: str) -> dict[str, list[bool]]:
    """Per condition, which token positions of ``template`` with ``subject`` put in get Δ (the subject's
    tokens as the edit itself finds them, keys.encode_with_subject; the last token; the rest)."""
    enc = encode_with_subject(tokenizer, [template], [subject])
    n, first, end = int(enc.last[0]) + 1, int(enc.subject_first[0]), int(enc.subject_last[0])
    subj = [first <= i <= end for i in range(n)]
    last = [i == n - 1 for i in range(n)]
    return {"unedited": [False] * n, "everywhere": [True] * n,
            "subject tokens": [s and not lt for s, lt in zip(subj, last)], "last token": last,
            "other tokens": [not s and not lt for s, lt in zip(subj, last)]}


@torch.no_grad()
def next_logprobs(loaded, prompt: str) -> torch.Tensor:
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"].to(loaded.device)
    return torch.log_softmax(loaded.logits(1, input_ids=ids)[0, -1].double(), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    facts, neighbours, loaded, hp, templates, targets, covs = setup(args.model, args.facts)
    originals = {layer: loaded.down_weight(layer).detach().clone() for layer in hp.layers}
    t0 = time.perf_counter()
    out = run_memit(loaded, facts, hp.layers, covs, hp.lam, hp.target, templates, time.perf_counter, targets=targets)
    print(f"edited {len(facts)} facts in {time.perf_counter() - t0:.1f} s (targets cached)", flush=True)
    # the edited model's own next-token distributions, then back to the original weights
    pairs = [(rel, p) for rel in RELATIONS for p, _ in neighbours[rel]]
    template_and_subject = {}
    for rel, (_, template, _) in RELATIONS.items():
        head, tail = template.split("{}")
        for p, _ in neighbours[rel]:
            template_and_subject[p] = template, p[len(head):len(p) - len(tail) if tail else None]
    edited = [next_logprobs(loaded, p) for _, p in pairs]
    with torch.no_grad():
        for layer, W in originals.items():
            loaded.down_weight(layer).copy_(W)
    factors = {layer: (up, down) for layer, (up, down) in out.factors.items()}

    rows = {c: {"kept": [], "kl": []} for c in CONDITIONS}
    worst_gap = 0.0
    for (rel, p), lp_edited in zip(pairs, edited):
        masks = positions(loaded.tokenizer, *template_and_subject[p])
        base = next_logprobs(loaded, p)
        for c in CONDITIONS:
            with delta_at(loaded, factors, torch.tensor([masks[c]], device=loaded.device)):
                lp = next_logprobs(loaded, p)
            if c == "everywhere":
                worst_gap = max(worst_gap, float((lp - lp_edited).abs().max()))
            rows[c]["kept"].append(bool(lp.argmax() == base.argmax()))
            rows[c]["kl"].append(float((base.exp() * (base - lp)).sum()))
    summary = {c: {"kept_top1_pct": 100.0 * sum(r["kept"]) / len(r["kept"]), "mean_kl": sum(r["kl"]) / len(r["kl"]),
                   "by_relation_kept_pct": {rel: 100.0 * sum(k for k, (r2, _) in zip(r["kept"], pairs) if r2 == rel)
                                            / sum(1 for r2, _ in pairs if r2 == rel) for rel in RELATIONS}}
               for c, r in rows.items()}
    result = {"model": loaded.model_id, "layers": hp.layers, "lam": hp.lam, "facts": len(facts),
              "neighbour_prompts": len(pairs), "everywhere_vs_edited_max_logprob_gap": worst_gap,
              "conditions": summary}
    print("| Δ applied at | same-relation kept top-1 | mean KL |\n|---|---|---|")
    for c in CONDITIONS:
        print(f"| {c} | {summary[c]['kept_top1_pct']:.1f} % | {summary[c]['mean_kl']:.4f} |")
    print(f"hooked 'everywhere' against the edited model: largest log-probability gap {worst_gap:.2e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
