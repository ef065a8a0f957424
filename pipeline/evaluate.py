"""Metrics of an edit, batched: both metric families of the literature side by side, drift and fluency.

* "success" (ROME/MEMIT papers): the edited target is more likely than the true one, comparing the mean
  per-token negative log-likelihood of each continuation. Efficacy and generalisation ask P(new) > P(true);
  specificity asks the neighbourhood prompt to still prefer its own target over the new one.
* "token accuracy" (zsRE / EasyEdit): with teacher forcing, the share of target tokens that are the
  model's top-1 prediction.
* "generation" (what a user sees; teacher forcing overstates it): the greedy continuation of the rewrite
  prompt and of each paraphrase names the new target as a whole word (``says``: case-insensitive, runs of
  whitespace as one space, not inside a longer word), ``*_gen``, and no longer names the true one,
  ``*_gen_old_gone``. Continuations are short: the longer target's tokens plus ``GEN_EXTRA_TOKENS``, so an
  answer that comes later than that counts as not given. For a tokenizer with a chat template also
  ``chat_gen`` / ``chat_gen_old_gone``: the rewrite prompt as the user's turn of the model's own template,
  scored on the assistant's greedy reply (its budget adds the prompt's tokens: replies restate the question).
* ripple (portability): prompts whose answer follows from the edit (the fact's optional ``ripple`` list),
  ``ripple_acc`` (token accuracy of the expected answer) and ``ripple_gen`` (the greedy continuation names it).
* drift: KL(before ‖ after) of the next-token distribution after a fixed set of unrelated prompts shipped
  in ``pipeline/data/unrelated_prompts.txt``, and the share of them whose top-1 token changed.
* fluency: ROME/MEMIT's "GE", the weighted 2- and 3-gram entropy (bits; weights 2/3 and 4/3, arithmetic
  mean) of each greedy generation from ``pipeline/data/fluency_prompts.txt``, averaged over prompts. As in
  ROME the text scored is prompt plus continuation. Quirk: ROME splits words with ``nltk.word_tokenize``;
  we use a regular expression (runs of word characters, and each other non-space character alone), which
  agrees with it on ordinary prose without pulling in nltk and its downloaded tokenizer data. Papers print
  GE × 100 (about 620 for an unedited GPT-2 XL with 100-token generations); ``ge`` is that figure.

A metric that a fact cannot have (no paraphrases, no true target, no ripple prompts, no chat template) is
absent (None), never 0 or 100.
Every model call works on padded batches: one forward per batch of prompts, never one per prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from covedit.pipeline.errors import UsageError
from covedit.pipeline.keys import pad_rows, target_token_ids
from covedit.pipeline.models import LoadedModel
from covedit.pipeline.tokens import pad_id


log = logging.getLogger(__name__)

UNRELATED_PROMPTS = "unrelated_prompts.txt"
FLUENCY_PROMPTS = "fluency_prompts.txt"


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
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = _pad(loaded, [seqs[i][0] + seqs[i][1] for i in idx], "right")
        # Logits only where a target token is predicted: row r's positions len(p)-1 .. len(p)+len(t)-2.
        read = torch.zeros(ids.shape, dtype=torch.bool)
        for row, i in enumerate(idx):
            p, t = seqs[i]
            read[row, len(p) - 1:len(p) + len(t) - 1] = True
        with torch.no_grad():
            logp = torch.log_softmax(loaded.logits(read, input_ids=ids, attention_mask=mask, use_cache=False).float(), -1)
        logp = logp.split([len(seqs[i][1]) for i in idx])  # back to rows: the mask's True cells in row-major order
        for row, i in enumerate(idx):
            target = torch.tensor(seqs[i][1], device=logp[row].device)
            lp = logp[row].gather(1, target[:, None])[:, 0]
            acc = (logp[row].argmax(-1) == target).float().mean()
            out[i] = Score(float(-lp.mean()), float(lp.sum()), float(acc))
    return out  # type: ignore[return-value]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def fact_metrics(loaded: LoadedModel, facts: list, batch_size: int = 32, generation: bool = True) -> list[dict]:
    """Per fact: efficacy, generalisation, specificity in both teacher-forced families, P(new) on each prompt
    family, ripple token accuracy, and (``generation``) the generation family with the texts it scored."""
    gens = generation_metrics(loaded, facts, batch_size) if generation else None
    return _with_generation(_teacher_forced_metrics(loaded, facts, batch_size), gens)


def _with_generation(rows: list[dict], gens: list[dict] | None) -> list[dict]:
    """The teacher-forced rows with the generation family's metrics (absent, None, without ``gens``)."""
    return [{**row, **{m: None for m in GEN_METRICS}, **gen} for row, gen in zip(rows, gens or [{}] * len(rows))]


# ------------------------------------------------------------------------------------------ generation family

GEN_EXTRA_TOKENS = 4  # greedy tokens beyond the longer target's own (rewrite, paraphrase and ripple prompts)
CHAT_EXTRA_TOKENS = 8  # a chat reply: the question's tokens + the target's + these (replies restate the question)
GEN_METRICS = ["efficacy_gen", "generalization_gen", "efficacy_gen_old_gone", "generalization_gen_old_gone",
               "chat_gen", "chat_gen_old_gone", "ripple_gen"]


def _one_space(text: str) -> str:
    return " ".join(text.split())


def _word_pattern(target: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(_one_space(target)) + r"(?!\w)", re.IGNORECASE)


def says(text: str, target: str) -> bool:
    """Whether ``text`` names ``target`` as a whole word or phrase: case-insensitive, any run of whitespace
    equal to one space, and no word character right before or after it ("Rome" is in "rome," and "(Rome)",
    not in "Romeo"; "New York" is in "new\\nyork")."""
    return bool(_one_space(target)) and _word_pattern(target).search(_one_space(text)) is not None


def says_new_old(text: str, new: str, old: str | None) -> tuple[bool, bool | None]:
    """(``text`` names ``new``, it names ``old``; None without an old target). Where one target holds the other
    ("Vatican City" and "Vatican"), the longer one is looked for first and its matches are blanked out
    before the shorter one is looked for, so "Vatican City" does not also count as "Vatican"."""
    if old is None:
        return says(text, new), None
    a, b = _one_space(new), _one_space(old)
    if a.casefold() == b.casefold():
        hit = says(text, a)
        return hit, hit
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    pattern = _word_pattern(longer)
    text = _one_space(text)
    long_hit = pattern.search(text) is not None
    short_hit = _word_pattern(shorter).search(pattern.sub(" ", text)) is not None
    return (long_hit, short_hit) if longer == a else (short_hit, long_hit)


def chat_prompt_ids(tokenizer, user_message: str) -> list[int] | None:
    """The tokens of ``user_message`` as the user's turn of the tokenizer's own chat template, ready for the
    assistant's reply; None where the tokenizer has no chat template or its template refuses the turn."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 (a template may raise anything: no chat measure then)
        log.warning("the chat template refused a user turn (%s): no chat measure", e)
        return None
    return list(tokenizer(text, add_special_tokens=False).input_ids)  # the template holds its own BOS, if any


def generation_jobs(loaded: LoadedModel, facts: list) -> list[tuple]:
    """What the generation family generates: ``(prompt text or token ids, max_new_tokens, fact index, kind)``
    for each rewrite prompt, paraphrase, ripple prompt and (with a chat template) chat turn."""
    tok = loaded.tokenizer
    n_tok = {}

    def length(target: str) -> int:
        if target not in n_tok:
            n_tok[target] = len(target_token_ids(tok, target))
        return n_tok[target]

    jobs = []
    for i, f in enumerate(facts):
        budget = max(length(f.target_new), length(f.target_true) if f.target_true else 0) + GEN_EXTRA_TOKENS
        jobs.append((f.rewrite_prompt(), budget, i, "rewrite"))
        jobs += [(p, budget, i, "paraphrases") for p in f.paraphrases]
        jobs += [(r.prompt, length(r.target) + GEN_EXTRA_TOKENS, i, "ripple") for r in getattr(f, "ripple", ())]
        chat = chat_prompt_ids(tok, f.rewrite_prompt())
        if chat is not None:
            question = len(tok(f.rewrite_prompt(), add_special_tokens=False).input_ids)
            jobs.append((chat, question + budget - GEN_EXTRA_TOKENS + CHAT_EXTRA_TOKENS, i, "chat"))
    return jobs


def generation_rows(facts: list, jobs: list[tuple], texts: list[str]) -> list[dict]:
    """Per fact: the generation family scored on the greedy ``texts`` of ``jobs`` (``generation_jobs``), and
    ``generations``, the texts themselves."""
    got: list[dict] = [{"rewrite": None, "paraphrases": [], "chat": None, "ripple": []} for _ in facts]
    for (_, _, i, kind), text in zip(jobs, texts, strict=True):
        if isinstance(got[i][kind], list):
            got[i][kind].append(text)
        else:
            got[i][kind] = text
    rows = []
    for f, g in zip(facts, got):
        old = f.target_true
        rewrite = says_new_old(g["rewrite"], f.target_new, old)
        para = [says_new_old(t, f.target_new, old) for t in g["paraphrases"]]
        chat = None if g["chat"] is None else says_new_old(g["chat"], f.target_new, old)
        ripple = [says(t, r.target) for t, r in zip(g["ripple"], getattr(f, "ripple", ()))]
        rows.append({
            "efficacy_gen": float(rewrite[0]),
            "generalization_gen": _mean([float(n) for n, _ in para]),
            "efficacy_gen_old_gone": None if old is None else float(not rewrite[1]),
            "generalization_gen_old_gone": None if old is None else _mean([float(not o) for _, o in para]),
            "chat_gen": None if chat is None else float(chat[0]),
            "chat_gen_old_gone": None if chat is None or old is None else float(not chat[1]),
            "ripple_gen": _mean([float(r) for r in ripple]),
            "generations": g,
        })
    return rows


def generate_by_budget(loaded: LoadedModel, prompts: list, budgets: list[int], batch_size: int = 32) -> list[str]:
    """Greedy continuations of prompts with budgets of their own, in one call of greedy_continuations sorted
    by (prompt kind, budget): plain text first, then token ids (chat turns, much longer), so that a batch
    mostly holds prompts of one length and budget (each row is cut to its own). Returned in input order."""
    order = sorted(range(len(prompts)), key=lambda k: (not isinstance(prompts[k], str), budgets[k]))
    texts: list[str] = [""] * len(prompts)
    for k, text in zip(order, greedy_continuations(loaded, [prompts[k] for k in order], [budgets[k] for k in order],
                                                   batch_size)):
        texts[k] = text
    return texts


def generation_metrics(loaded: LoadedModel, facts: list, batch_size: int = 32) -> list[dict]:
    """Per fact: the generation family (see the module docstring) and ``generations``, the texts it scored.
    All prompts of all facts are generated in one call, each to its own budget."""
    jobs = generation_jobs(loaded, facts)
    return generation_rows(facts, jobs, generate_by_budget(loaded, [j[0] for j in jobs], [j[1] for j in jobs],
                                                           batch_size))


def _teacher_forced_metrics(loaded: LoadedModel, facts: list, batch_size: int = 32) -> list[dict]:
    """Both teacher-forced families per fact (one scoring pass over every prompt), and ripple token accuracy."""
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
        for r in getattr(f, "ripple", ()):
            prompts.append(r.prompt), targets.append(r.target), where.append((i, "ripple", "own"))
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
            "p_true_rewrite": _mean([math.exp(s.logprob) for s in true_r]),
            "p_new_paraphrase": _mean([math.exp(s.logprob) for s in new_p]),
            "p_own_neighborhood": _mean([math.exp(s.logprob) for s in own_n]),
            "efficacy_success": _mean([float(n.nll < t.nll) for n, t in zip(new_r, true_r)]) if true_r else None,
            "generalization_success": _mean([float(n.nll < t.nll) for n, t in zip(new_p, true_p)]) if true_p else None,
            "specificity_success": _mean([float(o.nll < n.nll) for o, n in zip(own_n, new_n)]) if own_n else None,
            "efficacy_acc": _mean([s.token_acc for s in new_r]),
            "generalization_acc": _mean([s.token_acc for s in new_p]),
            "specificity_acc": _mean([s.token_acc for s in own_n]),
            "ripple_acc": _mean([s.token_acc for s in d.get("ripple_own", [])]),
        })
    return rows


METRICS = ["efficacy_success", "generalization_success", "specificity_success",
           "efficacy_acc", "generalization_acc", "specificity_acc", "ripple_acc", *GEN_METRICS]


def aggregate(rows: list[dict]) -> dict[str, float | int | None]:
    """Mean of each metric over the facts that have it, in percent; None where no fact has it.

    ``n_<metric>`` says how many facts have the metric, and ``n_facts`` how many there are in all, so a
    generalisation score over 3 of 100 facts is not read as one over 100.
    """
    out: dict[str, float | int | None] = {"n_facts": len(rows)}
    for m in METRICS:
        vals = [r.get(m) for r in rows if r.get(m) is not None]
        out[m] = 100 * sum(vals) / len(vals) if vals else None
        out[f"n_{m}"] = len(vals)
    return out


# ------------------------------------------------------------------------------------------ prompt sets

def load_prompts(name: str) -> list[str]:
    """A prompt set shipped in ``pipeline/data``: one prompt a line, blank and ``#`` lines skipped."""
    text = resources.files("covedit.pipeline").joinpath("data", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _pad(loaded: LoadedModel, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded into (ids, mask) on the model's device."""
    ids, mask = pad_rows(rows, pad_id(loaded.tokenizer), side)
    return ids.to(loaded.device), mask.to(loaded.device)


# ------------------------------------------------------------------------------------------ drift

@dataclass
class NextTokens:
    """Next-token log-distributions of one model after a prompt set: the reference that drift compares."""

    prompts: list[str]
    logprobs: torch.Tensor  # (n_prompts, vocab) float32, log-softmax
    top1: list[str]  # decoded top-1 token after each prompt

    def to_dict(self) -> dict:
        """JSON-safe summary (the full distributions are too big for a report)."""
        return {"prompts": self.prompts, "top1": self.top1,
                "top1_prob": [float(p) for p in self.logprobs.max(-1).values.exp()]}


@torch.no_grad()
def next_token_logprobs(loaded: LoadedModel, prompts: list[str] | None = None, batch_size: int = 64) -> NextTokens:
    """log P(next token | prompt) for each prompt (default: the shipped unrelated prompts), batched."""
    prompts = load_prompts(UNRELATED_PROMPTS) if prompts is None else list(prompts)
    if not prompts:
        raise UsageError("The prompt set for drift is empty.")
    tok = loaded.tokenizer
    rows = [tok(p).input_ids for p in prompts]
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask = _pad(loaded, chunk, "right")
        last = torch.zeros(ids.shape, dtype=torch.bool)
        last[torch.arange(len(chunk)), torch.tensor([len(r) - 1 for r in chunk])] = True
        logits = loaded.logits(last, input_ids=ids, attention_mask=mask, use_cache=False)  # (len(chunk), V)
        out.append(torch.log_softmax(logits.float(), -1).cpu())
    logprobs = torch.cat(out)
    top1 = [tok.decode([int(t)]) for t in logprobs.argmax(-1)]
    return NextTokens(prompts, logprobs, top1)


def kl_divergence(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """KL(before ‖ after) in nats of each row of two log-distributions, in float64 (exactly 0 for equal rows)."""
    lb, la = before.double(), after.double()
    pb = lb.exp()
    return torch.where(pb > 0, pb * (lb - la), torch.zeros_like(pb)).sum(-1)


def drift(before: NextTokens, after: NextTokens) -> dict:
    """How far ``after`` moved from ``before`` on the same prompts.

    ``mean_kl``: mean over prompts of KL(before ‖ after) in nats, computed in float64 (exactly 0 for the
    same model); ``top1_changed_pct``: share of prompts whose most likely next token changed, in percent.
    """
    if before.prompts != after.prompts:
        raise UsageError("Drift compares the same prompts before and after; these prompt sets differ.")
    if before.logprobs.shape != after.logprobs.shape:
        raise UsageError(f"Cannot compare next-token distributions over vocabularies of {before.logprobs.shape[-1]} "
                         f"and {after.logprobs.shape[-1]} tokens: the two models must share a tokenizer.")
    kl = kl_divergence(before.logprobs, after.logprobs)
    changed = before.logprobs.argmax(-1) != after.logprobs.argmax(-1)
    return {
        "n_prompts": len(before.prompts),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_changed_pct": 100.0 * float(changed.double().mean()),
        "per_prompt": [{"prompt": p, "kl": float(k), "top1_before": b, "top1_after": a}
                       for p, k, b, a in zip(before.prompts, kl, before.top1, after.top1)],
    }


# ------------------------------------------------------------------------------------------ generation, fluency

@torch.no_grad()
def greedy_continuations(loaded: LoadedModel, prompts: list[str] | list[list[int]], max_new_tokens: int | list[int] = 50,
                         batch_size: int = 16) -> list[str]:
    """The greedy continuation of each prompt (new text only, up to the first end-of-text), left-padded batches.
    A prompt may also be given as its token ids (a chat template's, which holds its own special tokens), and
    ``max_new_tokens`` per prompt: a batch runs to its longest and each row is cut to its own (greedy tokens do
    not depend on how many follow them), so prompts of different budgets share batches."""
    tok = loaded.tokenizer
    rows = [list(p) if isinstance(p, (list, tuple)) else tok(p).input_ids for p in prompts]
    limits = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    eos = tok.eos_token_id
    pad = pad_id(tok)
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk, chunk_limits = rows[start:start + batch_size], limits[start:start + batch_size]
        ids, mask = _pad(loaded, chunk, "left")
        gen = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(chunk_limits),
                                    do_sample=False, num_beams=1, pad_token_id=pad)
        for row, limit in zip(gen[:, ids.shape[1]:].tolist(), chunk_limits):
            row = row[:limit]
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            out.append(tok.decode(row, skip_special_tokens=True))
    return out


_WORDS = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens for n-gram entropy: runs of word characters, and every other non-space character alone."""
    return _WORDS.findall(text)


def n_gram_entropy(tokens: list[str], ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy``: arithmetic mean over n of weight_n × entropy (bits) of the n-gram
    frequencies. A text shorter than n has no n-grams and contributes entropy 0 for that n."""
    ents = []
    for n, w in zip(ns, weights, strict=True):
        counts: dict[tuple[str, ...], int] = {}
        for i in range(len(tokens) - n + 1):
            gram = tuple(tokens[i:i + n])
            counts[gram] = counts.get(gram, 0) + 1
        total = sum(counts.values())
        ents.append(w * -sum(c / total * math.log2(c / total) for c in counts.values()))
    return sum(ents) / len(ents)


def fluency(loaded: LoadedModel, prompts: list[str] | None = None, max_new_tokens: int = 50,
            batch_size: int = 16) -> dict:
    """Mean n-gram entropy of greedy generations (prompt + continuation, as ROME scores them)."""
    prompts = load_prompts(FLUENCY_PROMPTS) if prompts is None else list(prompts)
    return fluency_of(prompts, greedy_continuations(loaded, prompts, max_new_tokens, batch_size), max_new_tokens)


def fluency_of(prompts: list[str], conts: list[str], max_new_tokens: int) -> dict:
    """``fluency``'s summary of the greedy continuations ``conts`` of ``prompts``."""
    ents = [n_gram_entropy(words(p + c)) for p, c in zip(prompts, conts, strict=True)]
    mean = sum(ents) / len(ents)
    return {"n_prompts": len(prompts), "max_new_tokens": max_new_tokens, "ngram_entropy": mean, "ge": 100 * mean,
            "generations": [{"prompt": p, "continuation": c, "ngram_entropy": e}
                            for p, c, e in zip(prompts, conts, ents)]}


# ------------------------------------------------------------------------------------------ whole evaluation

@dataclass
class Evaluation:
    """Everything measured on one model: per-fact metrics, their aggregate, drift reference, fluency."""

    model_id: str
    per_fact: list[dict]
    aggregate: dict
    next_tokens: NextTokens | None = None  # reference for drift against another model
    fluency: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-safe: the next-token distributions are summarised by their top-1 tokens."""
        return {"model": self.model_id, "n_facts": len(self.per_fact), "aggregate": self.aggregate,
                "per_fact": self.per_fact, "unrelated": self.next_tokens.to_dict() if self.next_tokens else None,
                "fluency": self.fluency, **self.extra}


def evaluate_model(loaded: LoadedModel, facts: list, batch_size: int = 32, unrelated: bool = True,
                   unrelated_prompts: list[str] | None = None, with_fluency: bool = True,
                   fluency_prompts: list[str] | None = None, max_new_tokens: int = 50,
                   reference_cache: Path | None = None, generation: bool = True) -> Evaluation:
    """Per-fact metrics and their aggregate, plus the unrelated-prompt distributions and fluency.

    ``reference_cache`` (a folder): take the parts that do not depend on the facts (the unrelated-prompt
    distributions and fluency) from there when this model's were measured before, else measure and store
    them: an unedited model gives the same numbers every time, and measuring them again (the greedy
    generations above all) is most of a small batch-edit's evaluation; a file that cannot be read is
    measured again and replaced. ``extra["reference_cached"]`` says which happened. With no facts this is
    the reference alone. The generation family
    (``generation``) is per fact, so it is measured every time, never cached.

    Every greedy generation (the generation family's and fluency's) runs in one decoding pass: rows that
    share a step share its fixed cost (on the 2-core CPU a step of 30 rows costs 2.3× one of 1, not 30×;
    benchmarks/bench_eval.py)."""
    log.info("evaluating %s on %d facts%s", loaded.model_id, len(facts), ", with fluency" if with_fluency else "")
    rows = _teacher_forced_metrics(loaded, facts, batch_size) if facts else []
    extra = {}
    unrelated_prompts = load_prompts(UNRELATED_PROMPTS) if unrelated_prompts is None else list(unrelated_prompts)
    fluency_list = (load_prompts(FLUENCY_PROMPTS) if fluency_prompts is None else list(fluency_prompts)) \
        if with_fluency else None
    path = None
    if reference_cache is not None and unrelated:
        path = Path(reference_cache) / f"reference-{reference_key(loaded, unrelated_prompts, fluency_list, max_new_tokens)}.pt"
    saved = _read_reference(path) if path is not None else None
    if path is not None:
        extra["reference_cached"] = saved is not None
    next_tokens, flu = saved if saved is not None else (
        next_token_logprobs(loaded, unrelated_prompts) if unrelated else None, None)
    jobs = generation_jobs(loaded, facts) if generation else []
    flu_prompts = fluency_list if with_fluency and saved is None else []
    texts = generate_by_budget(loaded, [j[0] for j in jobs] + flu_prompts,
                               [j[1] for j in jobs] + [max_new_tokens] * len(flu_prompts), batch_size)
    if flu_prompts:
        flu = fluency_of(flu_prompts, texts[len(jobs):], max_new_tokens)
    if path is not None and saved is None:
        _write_reference(path, next_tokens, flu)
    rows = _with_generation(rows, generation_rows(facts, jobs, texts[:len(jobs)]) if generation else None)
    return Evaluation(model_id=loaded.model_id, per_fact=rows, aggregate=aggregate(rows), next_tokens=next_tokens,
                      fluency=flu, extra=extra)


def reference_key(loaded: LoadedModel, unrelated_prompts: list[str], fluency_prompts: list[str] | None,
                  max_new_tokens: int) -> str:
    """What determines a model's unrelated-prompt distributions and greedy generations: the model as
    ``LoadedModel.fingerprint`` sees it, the prompts and the length of the generations (``fluency_prompts``
    None: no fluency)."""
    key = {"model": loaded.fingerprint(), "unrelated": unrelated_prompts, "fluency": fluency_prompts,
           "max_new_tokens": max_new_tokens}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _read_reference(path: Path) -> tuple[NextTokens, dict | None] | None:
    """A stored reference, or None when there is none or it cannot be read (then it is measured again)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        return NextTokens(saved["prompts"], saved["logprobs"], saved["top1"]), saved["fluency"]
    except Exception as e:  # noqa: BLE001 (any unreadable file is measured again)
        log.warning("unreadable evaluation cache %s (%s): measuring again", path, e)
        return None


def _write_reference(path: Path, next_tokens: NextTokens, flu: dict | None) -> None:
    """Store a reference atomically; a folder that cannot be written only costs measuring it next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"prompts": next_tokens.prompts, "logprobs": next_tokens.logprobs, "top1": next_tokens.top1,
                    "fluency": flu}, tmp)
        tmp.replace(path)
    except OSError as e:
        log.warning("cannot store the evaluation reference in %s (%s): it will be measured again next time",
                    path.parent, e)


# ------------------------------------------------------------------------------------------ probe

def probe(loaded: LoadedModel, facts: list, n_tokens: int = 5, batch_size: int = 32) -> list[dict]:
    """What the model says now, per fact: greedy continuation of the rewrite prompt, P(true), P(new), and
    whether it already knows the true answer (teacher-forced top-1 accuracy of it is 1).

    Without ``target_true`` (zsRE records) the check is made on ``target_new``: in zsRE the "answer" the
    edit asks for is the true answer, so knowing it means the edit has nothing to do.
    """
    prompts = [f.rewrite_prompt() for f in facts]
    conts = greedy_continuations(loaded, prompts, n_tokens, batch_size)
    s_prompts, s_targets = [], []
    for f, p in zip(facts, prompts):
        s_prompts.append(p), s_targets.append(f.target_new)
        if f.target_true:
            s_prompts.append(p), s_targets.append(f.target_true)
    scores = iter(score(loaded, s_prompts, s_targets, batch_size))
    out = []
    for f, p, c in zip(facts, prompts, conts):
        new = next(scores)
        true = next(scores) if f.target_true else None
        known_by = true if true is not None else new
        out.append({"id": f.id, "prompt": p, "continuation": c,
                    "target_true": f.target_true, "target_new": f.target_new,
                    "p_true": math.exp(true.logprob) if true is not None else None,
                    "p_new": math.exp(new.logprob),
                    "checked": "target_true" if true is not None else "target_new",
                    "knows": known_by.token_acc == 1.0})
    return out
