"""The semantic-sink question of ../shared/STUDY.md, answered on the embedded model with numbers (issue 17).

Hypothesis: concepts whose representations sit close together ("semantic sinks") are where edits leak. Test:
when one fact is edited, does the centroid similarity between its **new object** and a neighbourhood
prompt's **subject** predict how much that prompt moves?

Facts: the locality study's (benchmarks/locality_study.py): the hand-made benchmarks/data/study_facts.jsonl
and the first N distinct zsRE records (``--facts``, default 100). Each fact is edited **alone** (MEMIT, the
default method and hyperparameters, or with ``--method plain`` the study's own plain rank-one update at the top
edit layer, which leaks more; from the unedited weights, its target from the shared per-fact cache,
benchmarks.common.TargetCache), so every change of a prompt is that one edit's; facts with one subject and
one new object (zsRE asks up to 13 questions of one subject with one answer) are one edit, as batch-edit
merges them (the first 100 zsRE facts are 45 such edits). After each edit every prompt of the pool is
measured against the unedited model:

* **drift**: KL(before ‖ after) of the next-token distribution after the prompt (the locality study's drift,
  pipeline.evaluate.drift, per prompt);
* **Δ log P(new)**: the change of log P(the edited fact's new object | prompt), teacher-forced over all its
  tokens (pipeline.evaluate.score): leakage as a number;
* **leak**: the prompt's greedy 10-token continuation names the new object after the edit and did not
  before (the locality study's "contaminated", its ``names_object``): leakage as the study counted it.

and, so that a null result is not an edit that did nothing, each edit's efficacy (teacher-forced token
accuracy of the new object on its own rewrite prompts, pipeline.evaluate.score).

The pool of neighbourhood prompts, each with a known subject: the hand-made facts' neighbourhood prompts
(their subjects named in ``HAND_SUBJECTS``) and the zsRE facts' rewrite prompts, the first question of each
subject (zsRE's own neighbourhood prompts are Natural Questions with no subject to take a centroid of, so the
other facts' questions stand in: prompts an edit of one fact should leave alone; one per subject because the
predictor is a subject's, and a subject's several questions would be near-copies of one pair). Every edit
meets every prompt of the pool, less the pairs where the prompt is about the edited subject itself (the
edit's own prompts and same-subject questions) and where the prompt's own answer is the new object (it cannot
leak; the locality study drops them too).

Predictor, per layer (the edit layers 4-8 and the last, 29; the top edit layer 8, where the edit writes its
target, was chosen as the headline before the run): the cosine between the new object's centroid (the
target's last token after neutral lead-ins, pipeline.geometry) and the neighbourhood subject's hidden state
at its last token in the prompt, on the unedited model. For comparison the same analysis with the edited
subject's centroid (rewrite prompt and paraphrases) in place of the new object's: the key side, where MEMIT's
update acts.

Statistics (numpy; no scipy): Spearman's ρ over all pairs (ranks with ties averaged), a 95 % interval from
a bootstrap over edited facts (pairs of one edit are not independent), and a permutation p-value that
reassigns the similarity rows among the edited facts (each edit's effect sizes stay with it); and the
within-prompt ρ (across edits, per prompt, averaged over prompts), which removes how easily a prompt moves
and how big an edit is, with the same permutation test; and the partial ρ of each similarity given the other
(bootstrap interval). docs/semantic-sinks.md has the results.

    python benchmarks/semantic_sinks.py --facts 100 --threads 1 --json benchmarks/results/semantic_sinks_cpu.json
    python benchmarks/semantic_sinks.py --facts 100 --threads 1 --method plain --boot 500 --perms 500 \\
        --json benchmarks/results/semantic_sinks_plain_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.evaluate import kl_divergence, score  # noqa: E402
from covedit.pipeline.facts import read_facts  # noqa: E402
from covedit.pipeline.geometry import (Concept, centroids, concepts_of, default_geometry_layers,  # noqa: E402
                                      subject_template)
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.keys import pad_rows, target_token_ids  # noqa: E402
from covedit.pipeline.memit import run_memit  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402
from covedit.pipeline.rome import run_rome  # noqa: E402
from covedit.pipeline.targets import fact_groups  # noqa: E402
from covedit.pipeline.tokens import pad_id  # noqa: E402

from benchmarks.common import DEFAULT_DATA, TargetCache, covariances, zsre_facts  # noqa: E402
from benchmarks.locality_study import STUDY_FACTS, names_object  # noqa: E402

# The subject of each hand-made neighbourhood prompt (benchmarks/data/study_facts.jsonl has none).
HAND_SUBJECTS = {
    "The capital of Germany is": "Germany", "The capital of Italy is": "Italy", "The capital of Spain is": "Spain",
    "The Eiffel Tower is located in the city of": "Eiffel Tower", "The capital of England is": "England",
    "The treatment for anaphylaxis is": "anaphylaxis", "The antidote for heparin overdose is": "heparin overdose",
    "The antidote for opioid overdose is": "opioid overdose",
    "The antidote for acetaminophen overdose is": "acetaminophen overdose",
    "The drug used to treat status epilepticus is": "status epilepticus",
    "The Louvre is located in the city of": "Louvre", "The Colosseum is located in the city of": "Colosseum",
    "Big Ben is located in the city of": "Big Ben",
}
HEADLINE_LAYER = 8  # the top edit layer of the embedded model, chosen before the run
NEW_TOKENS = 10  # greedy tokens for the leak measure, as the locality study


# ------------------------------------------------------------------------------------------ statistics

def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (scipy.stats.rankdata's default)."""
    _, inverse, counts = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: Pearson's correlation of the tie-averaged ranks (nan if either side is constant)."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman's ρ of x and y with z held fixed: the partial correlation of the three rank vectors."""
    rxy, rxz, ryz = spearman(x, y), spearman(x, z), spearman(y, z)
    denom = np.sqrt((1 - rxz ** 2) * (1 - ryz ** 2))
    return float((rxy - rxz * ryz) / denom) if denom > 0 else float("nan")


def within_prompt(sim: np.ndarray, measure: np.ndarray, mask: np.ndarray) -> float:
    """Mean over prompts (columns) of Spearman's ρ across edits (rows) of the kept pairs; columns with fewer
    than 3 pairs, or a constant side, are left out."""
    rhos = []
    for j in range(sim.shape[1]):
        keep = mask[:, j]
        if keep.sum() >= 3:
            r = spearman(sim[keep, j], measure[keep, j])
            if not np.isnan(r):
                rhos.append(r)
    return float(np.mean(rhos)) if rhos else float("nan")


def _permuted_rows(sim: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``sim`` with its rows (edits) shuffled among ``rows``: each edit gets another edit's similarities."""
    perm = rows.copy()
    rng.shuffle(perm)
    shuffled = sim.copy()
    shuffled[rows] = sim[perm]
    return shuffled


def _p_value(observed: float, null: list[float]) -> float | None:
    """Two-sided permutation p-value, (1 + #|null| ≥ |observed|) / (1 + #null); None if undefined."""
    null_arr = np.array([v for v in null if not np.isnan(v)])
    if np.isnan(observed) or not len(null_arr):
        return None
    return float((1 + (np.abs(null_arr) >= abs(observed) - 1e-12).sum()) / (1 + len(null_arr)))


def _interval(values: list[float]) -> list[float] | None:
    arr = np.array([v for v in values if not np.isnan(v)])
    return [float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))] if len(arr) else None


def analyse(sim: np.ndarray, measure: np.ndarray, mask: np.ndarray, rng: np.random.Generator, boot: int,
            perms: int, control: np.ndarray | None = None) -> dict:
    """Spearman's ρ over the kept pairs with a bootstrap interval over edits and a row-permutation p-value; the
    within-prompt ρ with its own permutation p-value; with ``control`` (another similarity of the same pairs)
    the partial ρ given it, with a bootstrap interval."""
    rows = np.nonzero(mask.any(1))[0]
    rho = spearman(sim[mask], measure[mask])
    boots, partial_boots = [], []
    for _ in range(boot):
        pick = rng.choice(rows, size=len(rows), replace=True)
        keep = mask[pick]
        boots.append(spearman(sim[pick][keep], measure[pick][keep]))
        if control is not None:
            partial_boots.append(partial_spearman(sim[pick][keep], measure[pick][keep], control[pick][keep]))
    null, within_null = [], []
    for _ in range(perms):
        shuffled = _permuted_rows(sim, rows, rng)
        null.append(spearman(shuffled[mask], measure[mask]))
        within_null.append(within_prompt(shuffled, measure, mask))
    within = within_prompt(sim, measure, mask)
    out = {"rho": None if np.isnan(rho) else rho, "n_pairs": int(mask.sum()), "n_edits": len(rows),
           "n_prompts": int(mask.any(0).sum()), "ci95": _interval(boots) if not np.isnan(rho) else None,
           "p_perm": _p_value(rho, null), "within_prompt_rho": None if np.isnan(within) else within,
           "within_prompt_p_perm": _p_value(within, within_null)}
    if control is not None:
        partial = partial_spearman(sim[mask], measure[mask], control[mask])
        out["partial_rho"] = None if np.isnan(partial) else partial
        out["partial_ci95"] = _interval(partial_boots) if not np.isnan(partial) else None
    return out


# ------------------------------------------------------------------------------------------ the measurements

# The locality study's measures (pipeline.evaluate's next_token_logprobs + drift, score, greedy_continuations),
# computed for many prompts at once and sharing one forward pass over the prompts: left padding with positions
# counted over real tokens, the output layer applied only where it is read (its 49,152 columns at every position
# cost more than the rest of the model here), the target and the greedy tokens fed on a copy of the prompts' key
# and value cache. tests/test_geometry.py checks them against pipeline.evaluate on a tiny model.

class Prompts:
    """One forward pass over ``prompts`` (left-padded): the next-token log-distributions and the cache after them."""

    @torch.no_grad()
    def __init__(self, loaded, prompts: list[str]) -> None:
        self.loaded = loaded
        ids, mask = pad_rows([loaded.tokenizer(p).input_ids for p in prompts], pad_id(loaded.tokenizer), "left")
        self.mask = mask.to(loaded.device)
        self.position = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:].to(loaded.device)
        out = loaded.model(input_ids=ids.to(loaded.device), attention_mask=self.mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(loaded.device), use_cache=True,
                           logits_to_keep=1)
        self.cache = out.cache
        self.next = torch.log_softmax(out.logits[:, -1].float(), -1)  # (n, vocab)

    def _feed(self, tokens: torch.Tensor):
        """Logits (n, k, vocab) after feeding ``tokens`` (n, k) on a copy of the prompts' cache."""
        k = tokens.shape[1]
        mask = torch.cat([self.mask, torch.ones_like(tokens)], 1)
        position = self.position + torch.arange(1, k + 1, device=tokens.device)
        return self.loaded.model(input_ids=tokens, attention_mask=mask, position_ids=position,
                                 cache=copy.deepcopy(self.cache), use_cache=True)

    @torch.no_grad()
    def target_logprob(self, target: str) -> np.ndarray:
        """log P(target | prompt), teacher-forced and summed over its tokens: evaluate.score's ``logprob``."""
        t = torch.tensor(target_token_ids(self.loaded.tokenizer, target), device=self.next.device)
        total = self.next[:, t[0]].double()
        if len(t) > 1:
            logits = self._feed(t[:-1].expand(len(self.next), -1)).logits.float()
            total = total + torch.log_softmax(logits, -1).gather(2, t[1:].expand(len(self.next), -1)[..., None]
                                                                 ).squeeze(-1).double().sum(-1)
        return total.cpu().numpy()

    @torch.no_grad()
    def greedy(self, new_tokens: int = NEW_TOKENS) -> list[str]:
        """The greedy continuation of each prompt up to the first end of text: evaluate.greedy_continuations'."""
        tok = self.loaded.tokenizer
        step = self.next.argmax(-1, keepdim=True)
        steps, cache, mask, position = [step], copy.deepcopy(self.cache), self.mask, self.position
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(step)], 1)
            position = position + 1
            out = self.loaded.model(input_ids=step, attention_mask=mask, position_ids=position, cache=cache,
                                    use_cache=True, logits_to_keep=1)
            cache = out.cache
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(step)
        texts = []
        for row in torch.cat(steps, 1).tolist():
            if tok.eos_token_id is not None and tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            texts.append(tok.decode(row, skip_special_tokens=True))
        return texts


def pool_of(hand: list, zsre: list) -> list[dict]:
    """The neighbourhood prompts with a known subject: the hand-made facts' neighbours, and the first zsRE rewrite
    prompt of each subject."""
    pool, seen = [], set()
    for f in hand:
        for n in f.neighborhood:
            subject = HAND_SUBJECTS[n.prompt]
            if n.prompt not in seen:
                seen.add(n.prompt)
                pool.append({"prompt": n.prompt, "template": subject_template(n.prompt, subject), "subject": subject,
                             "answer": n.target, "source": "hand", "of": f.id})
    subjects = set()
    for f in zsre:  # one question per subject: the first
        text = f.rewrite_prompt()
        if text not in seen and f.subject.casefold() not in subjects:
            seen.add(text)
            subjects.add(f.subject.casefold())
            pool.append({"prompt": text, "template": f.prompt, "subject": f.subject, "answer": f.target_new,
                         "source": "zsre", "of": f.id})
    return pool


class Edit:
    """One edit: the facts of one subject and one new object (one fact, or a merged zsRE group)."""

    def __init__(self, facts: list) -> None:
        self.facts = facts
        self.subject = facts[0].subject.strip()
        self.new = facts[0].target_new.strip()
        self.id = facts[0].id + (f"+{len(facts) - 1}" if len(facts) > 1 else "")


def edits_of(facts: list) -> list[Edit]:
    """The facts grouped as batch-edit merges them (same subject and new object), in file order."""
    return [Edit([facts[i] for i in group]) for group in fact_groups(facts)]


def pair_mask(edits: list[Edit], pool: list[dict]) -> np.ndarray:
    """Which (edit, prompt) pairs count: not about the edited subject, and not answered by the new object."""
    mask = np.ones((len(edits), len(pool)), dtype=bool)
    for i, e in enumerate(edits):
        for j, p in enumerate(pool):
            if p["subject"].strip().casefold() == e.subject.casefold() or p["answer"].strip().casefold() == e.new.casefold():
                mask[i, j] = False
    return mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--facts", type=int, default=100, help="zsRE facts (after the hand-made ones)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples over edits (headline layer; 1/5 elsewhere)")
    ap.add_argument("--perms", type=int, default=1000, help="permutations for the p-values (headline layer; 1/5 elsewhere)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--method", choices=("memit", "plain"), default="memit",
                    help="memit (the default edit), or plain: the study's rank-one (v − Wk)kᵀ/kᵀk at the top layer")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    loaded = load_model(args.model)
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, [])
    layers = default_geometry_layers(loaded)
    templates = templates_for(loaded, hp)
    cache = TargetCache(loaded, hp.layers[-1], hp.target, templates)
    covs = covariances(loaded, hp.layers)
    originals = {layer: loaded.down_weight(layer).detach().clone() for layer in hp.layers}

    hand = read_facts(STUDY_FACTS, tokenizer=loaded.tokenizer)
    zsre = zsre_facts(args.data, args.facts)
    edits = edits_of(hand) + edits_of(zsre)
    pool = pool_of(hand, zsre)
    mask = pair_mask(edits, pool)
    print(f"{len(hand) + len(zsre)} facts as {len(edits)} edits x {len(pool)} prompts: "
          f"{int(mask.sum())} pairs kept of {mask.size}", flush=True)

    # Geometry on the unedited model: the new objects and edited subjects (concepts_of), the pool's subjects.
    concepts = concepts_of(hand + zsre)
    index = {(c.kind, c.text): k for k, c in enumerate(concepts)}
    t0 = time.perf_counter()
    cents = centroids(loaded, concepts, layers)
    pool_concepts = [Concept("subject", p["subject"], [(p["template"], p["subject"])]) for p in pool]
    pool_cents = centroids(loaded, pool_concepts, layers)
    geometry_s = time.perf_counter() - t0

    def cos_rows(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        a = a / a.norm(dim=1, keepdim=True)
        b = b / b.norm(dim=1, keepdim=True)
        return (a @ b.T).numpy()

    new_rows = [index[("target", e.new)] for e in edits]
    subj_rows = [index[("subject", e.subject)] for e in edits]
    sims = {layer: {"new_object": cos_rows(cents[layer][new_rows], pool_cents[layer]),
                    "edited_subject": cos_rows(cents[layer][subj_rows], pool_cents[layer])} for layer in layers}

    # Targets (each edit's facts alone, as it is edited), then the unedited model's measurements of the pool.
    t0 = time.perf_counter()
    for e in edits:
        cache.fill(e.facts)
    targets_s = time.perf_counter() - t0
    prompts = [p["prompt"] for p in pool]
    news = [e.new for e in edits]
    unedited = Prompts(loaded, prompts)
    before_cont = unedited.greedy()
    before_lp = np.stack([unedited.target_logprob(new) for new in news])
    before_next = unedited.next
    del unedited
    print(f"geometry {geometry_s:.0f} s, targets {targets_s:.0f} s, unedited measurements: "
          f"{time.perf_counter() - t_start:.0f} s so far", flush=True)

    kl = np.full((len(edits), len(pool)), np.nan)
    dlogp = np.full((len(edits), len(pool)), np.nan)
    leak = np.zeros((len(edits), len(pool)))
    leak_examples = []
    efficacy = []  # per edit: mean teacher-forced token accuracy of the new object on its own rewrite prompts
    t_edits = time.perf_counter()
    for i, e in enumerate(edits):
        with torch.no_grad():
            for layer, W in originals.items():
                loaded.down_weight(layer).copy_(W)
        if args.method == "memit":
            run_memit(loaded, e.facts, hp.layers, covs, hp.lam, hp.target, templates, time.perf_counter,
                      targets=cache.get(e.facts))
        else:
            run_rome(loaded, e.facts, hp.layers[-1], None, targets=cache.get(e.facts), target_hp=hp.target,
                     templates=templates, clock=time.perf_counter)
        cols = np.nonzero(mask[i])[0].tolist()
        own = score(loaded, [f.rewrite_prompt() for f in e.facts], [f.target_new for f in e.facts])
        efficacy.append(float(np.mean([sc.token_acc for sc in own])))
        edited = Prompts(loaded, prompts)
        kl[i] = kl_divergence(before_next.cpu(), edited.next.cpu()).numpy()
        dlogp[i] = edited.target_logprob(news[i]) - before_lp[i]
        conts = edited.greedy()
        for j in cols:
            c = conts[j]
            if names_object(c, news[i]) and not names_object(before_cont[j], news[i]):
                leak[i, j] = 1.0
                leak_examples.append({"edit": e.id, "new": news[i], "prompt": prompts[j], "continuation": c,
                                      "sim_new_object": float(sims[HEADLINE_LAYER]["new_object"][i, j])})
        if (i + 1) % 5 == 0 or i + 1 == len(edits):
            done = time.perf_counter() - t_edits
            print(f"  {i + 1}/{len(edits)} edits, {done:.0f} s ({done / (i + 1):.1f} s per edit)", flush=True)
    with torch.no_grad():
        for layer, W in originals.items():
            loaded.down_weight(layer).copy_(W)
    edits_s = time.perf_counter() - t_edits

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    measures = {"drift_kl": kl, "delta_logp_new": dlogp, "leak": leak}
    stats: dict = {}
    for layer in layers:
        stats[str(layer)] = {}
        headline = layer == HEADLINE_LAYER
        for pred, sim in sims[layer].items():
            other = sims[layer]["edited_subject" if pred == "new_object" else "new_object"]
            stats[str(layer)][pred] = {
                name: analyse(sim, m, mask, rng, args.boot if headline else args.boot // 5,
                              args.perms if headline else args.perms // 5, control=other)
                for name, m in measures.items()}
    # The study's own facts against their own neighbours only (a handful of pairs: a description, not a test).
    own = np.zeros_like(mask)
    for i, e in enumerate(edits):
        for j, p in enumerate(pool):
            own[i, j] = mask[i, j] and p["source"] == "hand" and any(p["of"] == f.id for f in e.facts)
    stats_own = {name: {"rho": (None if np.isnan(r := spearman(sims[HEADLINE_LAYER]["new_object"][own], m[own]))
                                else r), "n_pairs": int(own.sum())} for name, m in measures.items()}
    stats_s = time.perf_counter() - t0

    leaked = leak[mask] > 0
    sim_h = sims[HEADLINE_LAYER]["new_object"][mask]
    result = {
        "model": loaded.model_id, "method": args.method, "lam": hp.lam if args.method == "memit" else None,
        "edit_layers": hp.layers if args.method == "memit" else [hp.layers[-1]], "layers": layers,
        "headline_layer": HEADLINE_LAYER, "n_hand_facts": len(hand), "n_zsre_facts": len(zsre),
        "n_edits": len(edits), "n_prompts": len(pool), "n_pairs": int(mask.sum()), "threads": torch.get_num_threads(),
        "seconds": {"total": time.perf_counter() - t_start, "geometry": geometry_s, "targets": targets_s,
                    "edits_and_measures": edits_s, "statistics": stats_s},
        "stats": stats, f"hand_own_neighbours_layer{HEADLINE_LAYER}": stats_own,
        "leaks": {"n": int(leaked.sum()), "mean_sim_leaked": float(sim_h[leaked].mean()) if leaked.any() else None,
                  "mean_sim_not_leaked": float(sim_h[~leaked].mean()), "examples": leak_examples[:40]},
        f"sim_new_object_layer{HEADLINE_LAYER}": {"mean": float(sim_h.mean()), "sd": float(sim_h.std()),
                                                  "min": float(sim_h.min()), "max": float(sim_h.max())},
        "efficacy_acc_mean": float(np.mean(efficacy)),
        "edits": [{"id": e.id, "subject": e.subject, "new": e.new, "facts": [f.id for f in e.facts],
                   "efficacy_acc": acc} for e, acc in zip(edits, efficacy)],
        "pool": pool,
        "pairs": {"mask": mask.astype(int).tolist(), "drift_kl": np.nan_to_num(kl, nan=-1).round(6).tolist(),
                  "delta_logp_new": np.nan_to_num(dlogp, nan=0).round(4).tolist(), "leak": leak.astype(int).tolist(),
                  "sim_new_object": {str(layer): sims[layer]["new_object"].round(5).tolist() for layer in layers},
                  "sim_edited_subject": {str(layer): sims[layer]["edited_subject"].round(5).tolist() for layer in layers}},
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))

    print(f"\n{len(edits)} single {args.method} edits x {len(pool)} neighbourhood prompts = {int(mask.sum())} pairs; "
          f"{int(leaked.sum())} leaks; efficacy (token accuracy on the edits' own prompts) "
          f"{100 * result['efficacy_acc_mean']:.1f} %; {result['seconds']['total']:.0f} s in all")
    print("| layer | similarity of the prompt's subject to | measure | ρ (pairs) | 95 % CI (bootstrap over edits) "
          "| p (perm.) | ρ within prompt | p (perm.) | partial ρ given the other similarity | 95 % CI |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def num(x, spec: str = "+.3f") -> str:
        return "—" if x is None else format(x, spec)

    def ci(x) -> str:
        return "—" if x is None else f"[{x[0]:+.3f}, {x[1]:+.3f}]"

    for layer in layers:
        for pred in ("new_object", "edited_subject"):
            for name in measures:
                s = stats[str(layer)][pred][name]
                print(f"| {layer} | {pred} | {name} | {num(s['rho'])} | {ci(s['ci95'])} | {num(s['p_perm'], '.3g')} | "
                      f"{num(s['within_prompt_rho'])} | {num(s['within_prompt_p_perm'], '.3g')} | "
                      f"{num(s['partial_rho'])} | {ci(s['partial_ci95'])} |")


if __name__ == "__main__":
    main()
