"""Why same-relation neighbours leak: a shared residual, or keys that overlap? (issue 14, point 6)

relation_leak_sites.py showed that most of the same-relation leak ("The capital of Kenya is" changing its
answer after "The capital of France is" → Rome was edited, with 99 other facts) is written at the
neighbour's *subject* tokens. Two explanations predict that, and they call for different fixes:

* **a shared residual**: the edits of one relation push their subjects' states in a common direction
  ("answer this relation differently"), and a neighbour whose key resembles the edited ones in any way
  receives that common push. Then the targets' δ of one relation are aligned, and what the update writes at
  a neighbour's subject points along the relation's mean δ.
* **overlapping keys**: the δ are unrelated to each other, but a neighbour's key overlaps the edited keys
  of its own type (countries with countries), so the update writes a mixture of their residuals there.
  Then the leaked neighbours are the ones where the update writes most, and that tracks how similar
  their keys are to the edited keys.

On the 100 counterfactual facts of relation_locality.py (same facts, targets from the shared cache, the
model's default MEMIT), this measures without editing anything twice:

1. δ's alignment: cosine between δ of two facts of one relation and of two relations; the norm of each
   relation's mean δ against the mean ‖δ‖ (for n unrelated directions about 1/√n);
2. after the edit, for each of the 82 neighbour prompts: whether its top-1 token is kept, its KL from the
   unedited model, the update's relative write at its subject's last token ‖ΔW k‖ / ‖W k‖ (layer 8, the
   top edited layer; keys of the unedited model), the cosine of that write with its relation's mean δ,
   and the largest C⁻¹-whitened cosine of its key to an edited fact's key of the same relation;
3. the same write for the edited facts' own keys (what the update is meant to write);
4. how much of the write at a neighbour is the write at its type's mean key: with m_r the mean of the
   relation's edited keys, the cosine of ΔW k with ΔW m_r and the ratio ‖ΔW m_r‖ / ‖ΔW k‖; and where m_r and
   the neighbours' own parts k − m_r lie in C's spectrum (the Rayleigh quotient xᵀCx / xᵀx as a percentile of
   C's eigenvalues; a coarse view: what a write along x costs the solve goes with xᵀC⁻¹x);
5. a third explanation, checked on the same prompts: the leaked neighbours are the ones the unedited model
   held least firmly (top-1 minus top-2 log-probability at the answer position), and what they change to
   (whether the new top-1 is the first token of an edited answer of the same relation).

    python benchmarks/relation_overlap.py --json benchmarks/results/relation_overlap_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import edit_variants  # noqa: E402
from benchmarks.relation_locality import RELATIONS, setup, subject_of  # noqa: E402
from covedit.pipeline.evaluate import evaluate_model, kl_divergence, next_token_logprobs  # noqa: E402
from covedit.pipeline.keys import compute_keys, target_token_ids  # noqa: E402


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return torch.tensor(r, dtype=torch.float64)
    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    facts, neighbours, loaded, hp, templates, targets, covs = setup(args.model, args.facts)
    top = hp.layers[-1]
    relation = [f.id.split(":")[0] for f in facts]
    delta = targets.delta.double()
    unit = delta / delta.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    same = torch.tensor([[a == b for b in relation] for a in relation])
    off = ~torch.eye(len(facts), dtype=torch.bool)
    rel_mean = {rel: delta[[i for i, r in enumerate(relation) if r == rel]].mean(0) for rel in RELATIONS}
    alignment = {
        "delta_cos_same_relation": float(cos[same & off].mean()),
        "delta_cos_other_relation": float(cos[~same].mean()),
        "mean_delta_norm_share": {rel: float(rel_mean[rel].norm() / delta[[i for i, r in enumerate(relation) if r == rel]]
                                             .norm(dim=1).mean()) for rel in RELATIONS},
        "unrelated_share_expected": {rel: relation.count(rel) ** -0.5 for rel in RELATIONS},
    }

    pairs = [(p, a, rel) for rel in RELATIONS for p, a in neighbours[rel]]
    near_subjects = [subject_of(p, RELATIONS[rel][1]) for p, _, rel in pairs]
    bare = ["{}"]
    k_near = compute_keys(loaded, [top], [p.replace(s, "{}", 1) for (p, _, _), s in zip(pairs, near_subjects)],
                          near_subjects, bare)[top].double()
    k_edit = compute_keys(loaded, [top], [f.prompt for f in facts], [f.subject for f in facts], bare)[top].double()
    C = covs[top].double()
    c_inv = torch.linalg.inv(C)
    white = lambda k: (k @ c_inv) / torch.sqrt(((k @ c_inv) * k).sum(1, keepdim=True))  # noqa: E731
    whitened_cos = white(k_near) @ k_edit.T / torch.sqrt(((k_edit @ c_inv) * k_edit).sum(1))[None, :]
    W0 = loaded.down_weight(top).detach().double().clone()

    before = evaluate_model(loaded, facts, with_fluency=False, generation=False)
    near_before = next_token_logprobs(loaded, [p for p, _, _ in pairs])
    label, row = next(edit_variants(loaded, hp, facts, targets, covs,
                                    [("default", {"lam": hp.lam, "preserve_prompts": hp.preserve_prompts})],
                                    before, with_fluency=False))
    near_after = next_token_logprobs(loaded, [p for p, _, _ in pairs])
    dW = loaded.down_weight(top).detach().double() - W0
    kept = (near_before.logprobs.argmax(-1) == near_after.logprobs.argmax(-1)).tolist()
    top2 = near_before.logprobs.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).tolist()
    tokenizer = loaded.tokenizer
    edited_first = {rel: {target_token_ids(tokenizer, f.target_new)[0] for f, r in zip(facts, relation) if r == rel}
                    for rel in RELATIONS}
    top1_after = near_after.logprobs.argmax(-1).tolist()
    kl = kl_divergence(near_before.logprobs, near_after.logprobs).tolist()
    write_near = dW @ k_near.T  # (d_model, n_near)
    rel_write_near = (write_near.norm(dim=0) / (W0 @ k_near.T).norm(dim=0)).tolist()
    rel_write_edit = ((dW @ k_edit.T).norm(dim=0) / (W0 @ k_edit.T).norm(dim=0)).tolist()
    type_mean = {rel: k_edit[[i for i, r in enumerate(relation) if r == rel]].mean(0) for rel in RELATIONS}
    eigenvalues = torch.linalg.eigvalsh(C)

    def spectrum_percentile(x: torch.Tensor) -> float:
        """Where x's Rayleigh quotient xᵀCx / xᵀx falls among C's eigenvalues (0: the smallest, 100: the largest)."""
        q = (x @ C @ x) / (x @ x)
        return float(100.0 * (eigenvalues < q).double().mean())
    prompts = []
    for j, ((prompt, answer, rel), subject) in enumerate(zip(pairs, near_subjects)):
        same_rel = [i for i, r in enumerate(relation) if r == rel]
        m = rel_mean[rel]
        mean_write = dW @ type_mean[rel]
        prompts.append({"prompt": prompt, "relation": rel, "kept_top1": kept[j], "kl": kl[j],
                        "write_cos_type_mean_write": float(write_near[:, j] @ mean_write
                                                           / (write_near[:, j].norm() * mean_write.norm())),
                        "type_mean_write_ratio": float(mean_write.norm() / write_near[:, j].norm()),
                        "own_part_spectrum_percentile": spectrum_percentile(k_near[j] - type_mean[rel]),
                        "relative_write": rel_write_near[j], "margin_before": margin[j],
                        "top1_after": tokenizer.decode([top1_after[j]]),
                        "top1_after_is_edited_answer": top1_after[j] in edited_first[rel],
                        "write_cos_relation_mean_delta": float(write_near[:, j] @ m / (write_near[:, j].norm() * m.norm())),
                        "max_whitened_cos_same_relation": float(whitened_cos[j, same_rel].max()),
                        "max_whitened_cos_other_relations": float(whitened_cos[j, [i for i in range(len(facts))
                                                                                    if i not in same_rel]].max())})
    leaked = [p for p in prompts if not p["kept_top1"]]
    held = [p for p in prompts if p["kept_top1"]]
    summary = {
        "edit": {k: row[k] for k in ("efficacy_acc", "generalization_acc", "drift_mean_kl", "realised_mean")},
        "same_relation_kept_top1_pct": 100.0 * len(held) / len(prompts),
        "relative_write_edited_keys_mean": mean(rel_write_edit),
        "relative_write_neighbours_kept_mean": mean(p["relative_write"] for p in held),
        "relative_write_neighbours_leaked_mean": mean(p["relative_write"] for p in leaked),
        "max_whitened_cos_same_relation_kept_mean": mean(p["max_whitened_cos_same_relation"] for p in held),
        "max_whitened_cos_same_relation_leaked_mean": mean(p["max_whitened_cos_same_relation"] for p in leaked),
        "max_whitened_cos_other_relations_mean": mean(p["max_whitened_cos_other_relations"] for p in prompts),
        "write_cos_relation_mean_delta_mean": mean(p["write_cos_relation_mean_delta"] for p in prompts),
        "write_cos_relation_mean_delta_leaked_mean": mean(p["write_cos_relation_mean_delta"] for p in leaked),
        "write_cos_type_mean_write_mean": mean(p["write_cos_type_mean_write"] for p in prompts),
        "write_cos_type_mean_write_leaked_mean": mean(p["write_cos_type_mean_write"] for p in leaked),
        "type_mean_write_ratio_mean": mean(p["type_mean_write_ratio"] for p in prompts),
        "type_mean_spectrum_percentile": {rel: spectrum_percentile(type_mean[rel]) for rel in RELATIONS},
        "own_part_spectrum_percentile_mean": mean(p["own_part_spectrum_percentile"] for p in prompts),
        "margin_before_kept_median": sorted(p["margin_before"] for p in held)[len(held) // 2] if held else None,
        "margin_before_leaked_median": sorted(p["margin_before"] for p in leaked)[len(leaked) // 2] if leaked else None,
        "margin_before_kept_mean": mean(p["margin_before"] for p in held),
        "margin_before_leaked_mean": mean(p["margin_before"] for p in leaked),
        "leaked_to_an_edited_answer": sum(p["top1_after_is_edited_answer"] for p in leaked),
        "leaked": len(leaked),
        "spearman_margin_vs_kl": spearman(margin, kl),
        "spearman_relative_write_vs_kl": spearman(rel_write_near, kl),
        "spearman_whitened_cos_vs_relative_write": spearman([p["max_whitened_cos_same_relation"] for p in prompts],
                                                            rel_write_near),
        "spearman_whitened_cos_vs_kl": spearman([p["max_whitened_cos_same_relation"] for p in prompts], kl),
    }
    result = {"model": loaded.model_id, "layer": top, "lam": hp.lam, "preserve_prompts": hp.preserve_prompts,
              "facts": len(facts), "neighbour_prompts": len(pairs), "alignment": alignment, "summary": summary,
              "prompts": prompts}
    print(json.dumps({"alignment": alignment, "summary": summary}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
