"""Metrics of an edit, batched: both metric families of the literature, side by side.

* "success" (ROME/MEMIT papers): the edited target is more likely than the true one, comparing the mean
  per-token negative log-likelihood of each continuation. Efficacy and generalisation ask P(new) > P(true);
  specificity asks the neighbourhood prompt to still prefer its own target over the new one.
* "token accuracy" (zsRE / EasyEdit): with teacher forcing, the share of target tokens that are the
  model's top-1 prediction.

A metric that a fact cannot have (no paraphrases, no true target) is absent (None), never 0 or 100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.keys import target_token_ids
from pipeline.models import LoadedModel


@dataclass(frozen=True)
class Score:
    """Teacher-forced score of one continuation after one prompt."""

    nll: float  # mean negative log-likelihood per target token
    logprob: float  # total log-probability of the continuation
    token_acc: float  # share of target tokens that are the top-1 prediction


def score(loaded: LoadedModel, prompts: list[str], targets: list[str], batch_size: int = 32) -> list[Score]:
    """Score each target as the continuation of its prompt, in padded batches (one forward per batch)."""
    tok = loaded.tokenizer
    seqs = []
    for prompt, target in zip(prompts, targets, strict=True):
        p = tok(prompt).input_ids
        t = target_token_ids(tok, target)
        seqs.append((p, t))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    out: list[Score | None] = [None] * len(seqs)
    pad = tok.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            full = seqs[i][0] + seqs[i][1]
            ids[row, :len(full)] = torch.tensor(full)
            mask[row, :len(full)] = 1
        with torch.no_grad():
            logits = loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                                  use_cache=False).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for row, i in enumerate(idx):
            p, t = seqs[i]
            pos = torch.arange(len(p) - 1, len(p) + len(t) - 1, device=logp.device)
            target = torch.tensor(t, device=logp.device)
            lp = logp[row, pos, target]
            acc = (logp[row, pos].argmax(-1) == target).float().mean()
            out[i] = Score(float(-lp.mean()), float(lp.sum()), float(acc))
    return out  # type: ignore[return-value]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def fact_metrics(loaded: LoadedModel, facts: list, batch_size: int = 32) -> list[dict]:
    """Per fact: efficacy, generalisation, specificity in both families, plus P(new) on each prompt family."""
    prompts, targets, where = [], [], []
    for i, f in enumerate(facts):
        rewrite = f.rewrite_prompt()
        for kind, prompt_list in (("rewrite", [rewrite]), ("paraphrase", list(f.paraphrases))):
            for p in prompt_list:
                prompts.append(p), targets.append(f.target_new), where.append((i, kind, "new"))
                if f.target_true:
                    prompts.append(p), targets.append(f.target_true), where.append((i, kind, "true"))
        for n in f.neighborhood:
            prompts.append(n.prompt), targets.append(n.target), where.append((i, "neighborhood", "own"))
            prompts.append(n.prompt), targets.append(f.target_new), where.append((i, "neighborhood", "new"))
    scores = score(loaded, prompts, targets, batch_size)
    per: list[dict] = [{"rewrite": [], "paraphrase": [], "neighborhood": []} for _ in facts]
    for (i, kind, which), s in zip(where, scores):
        per[i].setdefault(f"{kind}_{which}", []).append(s)
    rows = []
    for i, f in enumerate(facts):
        d = per[i]
        new_r, true_r = d.get("rewrite_new", []), d.get("rewrite_true", [])
        new_p, true_p = d.get("paraphrase_new", []), d.get("paraphrase_true", [])
        own_n, new_n = d.get("neighborhood_own", []), d.get("neighborhood_new", [])
        rows.append({
            "id": f.id,
            "p_new_rewrite": _mean([math.exp(s.logprob) for s in new_r]),
            "p_new_paraphrase": _mean([math.exp(s.logprob) for s in new_p]),
            "p_own_neighborhood": _mean([math.exp(s.logprob) for s in own_n]),
            "efficacy_success": _mean([float(n.nll < t.nll) for n, t in zip(new_r, true_r)]) if true_r else None,
            "generalization_success": _mean([float(n.nll < t.nll) for n, t in zip(new_p, true_p)]) if true_p else None,
            "specificity_success": _mean([float(o.nll < n.nll) for o, n in zip(own_n, new_n)]) if own_n else None,
            "efficacy_acc": _mean([s.token_acc for s in new_r]),
            "generalization_acc": _mean([s.token_acc for s in new_p]),
            "specificity_acc": _mean([s.token_acc for s in own_n]),
        })
    return rows


METRICS = ["efficacy_success", "generalization_success", "specificity_success",
           "efficacy_acc", "generalization_acc", "specificity_acc"]


def aggregate(rows: list[dict]) -> dict[str, float | None]:
    """Mean of each metric over the facts that have it, in percent; None where no fact has it."""
    out = {}
    for m in METRICS:
        vals = [r[m] for r in rows if r[m] is not None]
        out[m] = 100 * sum(vals) / len(vals) if vals else None
    return out
