# covedit's target optimisation as it was before it reused the prefix (commit c688309), kept verbatim so
# that benchmarks/bench_targets.py can time today's code against it on the same facts and steps, and tests
# can check that the new code finds the same δ. Not used by the product. Changed since, only so that it
# optimises the same loss as today's code (two marked lines, issue 14): the KL row ends at the subject's
# last token, and a fact stops when its whole loss (not its NLL) is below the threshold.
"""Target vectors z = h + δ for a batch of facts, all optimised together (MEMIT's ``compute_z``, batched).

For fact i, δᵢ ∈ R^d_model is added to the output of block ``layer`` at the subject's last token of each of
its prompts. δ is trained with Adam to make the model say ``target_new``::

    loss_i = nll_i + kl_factor · KL(p_now ‖ p_start) + weight_decay · ‖δᵢ‖ / ‖hᵢ‖²

* nll_i: mean over the context templates of the mean over target tokens of −log p(token | prefix), with
  the rewrite prompt placed in the template and the target teacher-forced (all its tokens but the last
  are appended as token ids, never re-tokenised from text).
* KL: next-token distribution after "{subject} is a" (its last token), edited against unedited, in the
  direction compute_z uses (``kl_div(p_start, p_now)`` = KL(p_now ‖ p_start)).
* weight decay: ‖δ‖ / ‖h‖², as compute_z writes it (not squared: the published weight 0.5 with ROME's clamp
  of 4 assumes this weak form), h the block output at the subject's last token of the bare rewrite prompt.
* after every Adam step ‖δᵢ‖ ≤ clamp_norm_factor · ‖hᵢ‖.

Why batched equals one at a time: the total loss is the sum (not the mean) over facts, a fact's rows
never interact with another's, and Adam works element-wise, so each δᵢ follows exactly the path it would
follow alone (up to float rounding). Early stopping is per fact: once nll_i < early_stop_loss at a forward
pass, δᵢ is frozen (Adam's momentum would still move it, so its old value is restored after each step)
and its rows leave the batch. ``steps`` counts forward passes as the reference's ``v_num_grad_steps``
does: the last pass only measures, so at most ``steps - 1`` updates are made.

Quirks:

* Rows are left-padded with position ids counted over real tokens, so every row ends at the same column
  and the model computes logits for the last few columns only (``logits_to_keep``): memory is
  rows × (longest target) × vocab, not rows × length × vocab.
* Facts are chunked in order of their longest row, so rows of similar length share a forward.
* ``max_rows`` bounds the rows of one forward; a fact's rows (templates + 1) always share a chunk, so one
  chunk can exceed it when a single fact has more rows.
* ``max_facts`` bounds the facts optimised in one loop: larger batches run as consecutive groups (same
  targets, by the argument above), so the reference distributions (facts × vocab floats, 1 GiB for 1,000
  facts of a 262k vocabulary) and Adam's state stay bounded however many facts are edited.
* The model runs in its own dtype; δ, the logits' softmax and the losses are float32.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from covedit.pipeline.errors import DataError
from covedit.pipeline.hooks import capture_outputs, edit_output
from covedit.pipeline.hparams import TargetHParams
from covedit.pipeline.keys import encode_with_subject, target_token_ids
from covedit.pipeline.models import LoadedModel
from covedit.pipeline.tokens import pad_id

log = logging.getLogger(__name__)

KL_PROMPT = "{} is a"


@dataclass
class TargetResult:
    """Per fact: the target value z at the subject's last token after block ``layer``, and how it went."""

    z: torch.Tensor  # (n, d_model) float32, h + δ
    h: torch.Tensor  # (n, d_model) float32, the block output there before editing (bare rewrite prompt)
    nll_before: torch.Tensor  # (n,) mean NLL of target_new over the templates, δ = 0
    nll_after: torch.Tensor  # (n,) the same with the final δ
    steps_taken: torch.Tensor  # (n,) Adam updates applied to each δ

    @property
    def delta(self) -> torch.Tensor:
        return self.z - self.h

    def select(self, index: list[int]) -> TargetResult:
        """The results of some facts (a fact's target does not depend on the others in its batch)."""
        return TargetResult(self.z[index], self.h[index], self.nll_before[index], self.nll_after[index],
                            self.steps_taken[index])

    @staticmethod
    def concat(parts: list[TargetResult]) -> TargetResult:
        return TargetResult(*(torch.cat([getattr(p, f) for p in parts]) for f in
                              ("z", "h", "nll_before", "nll_after", "steps_taken")))


@dataclass
class _FactRows:
    """The token rows of one fact: one per template (prompt + target[:-1]) and the KL row."""

    rows: list[list[int]]  # templates first, KL row last
    subject_pos: list[int]  # subject's last token in each row (unpadded)
    target: list[int]  # target_new token ids


@dataclass
class _Chunk:
    """A left-padded forward batch holding every row of some facts."""

    facts: torch.Tensor  # (c,) global fact indices
    input_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, T)
    row_fact: torch.Tensor  # (R,) global fact index of each row
    subject_pos: torch.Tensor  # (R,) padded column of the subject's last token
    labels: torch.Tensor  # (n_rewrite_rows, keep) target ids over the last `keep` columns, -100 elsewhere
    rewrite_rows: torch.Tensor  # (n_rewrite_rows,) row numbers of rewrite rows
    rewrite_fact: torch.Tensor  # (n_rewrite_rows,) chunk-local fact index
    kl_rows: torch.Tensor  # (c,) row number of each fact's KL row
    keep: int  # columns at the end whose logits are computed


def _fact_rows(tokenizer, facts: list, templates: list[str]) -> list[_FactRows]:
    """Tokenise every rewrite and KL prompt once (subject located by keys.encode_with_subject)."""
    prompts, subjects = [], []
    for f in facts:
        prompts += [t.replace("{}", f.prompt) for t in templates] + [KL_PROMPT]
        subjects += [f.subject] * (len(templates) + 1)
    enc = encode_with_subject(tokenizer, prompts, subjects, padding_side="right")
    per = len(templates) + 1
    out = []
    for i, f in enumerate(facts):
        target = target_token_ids(tokenizer, f.target_new)
        rows, pos = [], []
        for r in range(i * per, (i + 1) * per):
            ids = enc.input_ids[r, : int(enc.last[r]) + 1].tolist()
            if r < (i + 1) * per - 1:  # a rewrite row: teacher-force the target
                ids = ids + target[:-1]
            else:  # issue 14: the KL row ends at the subject's last token
                ids = ids[: int(enc.subject_last[r]) + 1]
            rows.append(ids)
            pos.append(int(enc.subject_last[r]))
        out.append(_FactRows(rows, pos, target))
    return out


def _build_chunk(fact_rows: list[_FactRows], facts: list[int], pad_id: int, input_device: torch.device,
                 device: torch.device) -> _Chunk:
    """Token ids go to ``input_device`` (the embeddings'), everything indexed per row or fact to ``device``
    (the edited layer's, where δ lives); the label side moves to the logits' device in _forward."""
    rows, row_fact, subject_pos, rewrite_rows, rewrite_fact, kl_rows, targets = [], [], [], [], [], [], []
    for local, i in enumerate(facts):
        fr = fact_rows[i]
        for j, (ids, pos) in enumerate(zip(fr.rows, fr.subject_pos)):
            if j < len(fr.rows) - 1:
                rewrite_rows.append(len(rows))
                rewrite_fact.append(local)
                targets.append(fr.target)
            else:
                kl_rows.append(len(rows))
            rows.append(ids)
            row_fact.append(i)
            subject_pos.append(pos)
    width = max(len(r) for r in rows)
    keep = max(len(t) for t in targets)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[r, width - len(ids):] = 1
        subject_pos[r] += width - len(ids)
    labels = torch.full((len(targets), keep), -100, dtype=torch.long)
    for r, t in enumerate(targets):  # the last len(t) columns predict the target's tokens
        labels[r, keep - len(t):] = torch.tensor(t, dtype=torch.long)

    def as_long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return _Chunk(as_long(facts), input_ids.to(input_device), mask.to(input_device), as_long(row_fact), as_long(subject_pos),
                  labels.to(device), as_long(rewrite_rows), as_long(rewrite_fact), as_long(kl_rows), keep)


def _forward(loaded: LoadedModel, chunk: _Chunk, delta: torch.Tensor, layer: int,
             n_templates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-fact NLL (c,) and KL-prompt next-token log-probs (c, vocab), with δ added at ``layer``; both on δ's
    device (a model spread over devices computes its logits elsewhere)."""
    rows = torch.arange(len(chunk.row_fact), device=delta.device)

    def add_delta(h: torch.Tensor) -> torch.Tensor:
        return h.index_put((rows, chunk.subject_pos), delta[chunk.row_fact].to(h.dtype), accumulate=True)

    inputs = dict(input_ids=chunk.input_ids, attention_mask=chunk.attention_mask,
                  position_ids=(chunk.attention_mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
    if _accepts_logits_to_keep(loaded.model):
        inputs["logits_to_keep"] = chunk.keep
    with edit_output(loaded.block(layer), add_delta):
        logits = loaded.model(**inputs).logits[:, -chunk.keep:].float()
    at = logits.device
    labels = chunk.labels.to(at)
    rewrite = logits[chunk.rewrite_rows.to(at)]  # (n_rewrite, keep, V)
    token_nll = F.cross_entropy(rewrite.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                reduction="none").view(labels.shape)
    row_nll = token_nll.sum(1) / (labels != -100).sum(1)
    nll = torch.zeros(len(chunk.facts), device=at).index_add(0, chunk.rewrite_fact.to(at), row_nll) / n_templates
    kl_logprobs = F.log_softmax(logits[chunk.kl_rows.to(at), -1], dim=-1)
    return nll.to(delta.device), kl_logprobs.to(delta.device)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def block_outputs(loaded: LoadedModel, facts: list, layer: int, batch_rows: int) -> torch.Tensor:
    """h: output of block ``layer`` at the subject's last token of each bare rewrite prompt, float32."""
    out = []
    for lo in range(0, len(facts), batch_rows):
        chunk = facts[lo:lo + batch_rows]
        enc = encode_with_subject(loaded.tokenizer, [f.prompt for f in chunk], [f.subject for f in chunk],
                                  padding_side="left").to(loaded.device)
        inputs = enc.model_inputs()
        if _accepts_logits_to_keep(loaded.model):
            inputs["logits_to_keep"] = 1
        with capture_outputs([loaded.block(layer)]) as seen:
            loaded.model(**inputs)
        at = seen[0].device  # the block's device
        out.append(seen[0][torch.arange(len(chunk), device=at), enc.subject_last.to(at)].float())
    return torch.cat(out)


def compute_targets(loaded: LoadedModel, facts: list, layer: int, hp: TargetHParams, templates: list[str],
                    max_rows: int = 128, max_facts: int = 256) -> TargetResult:
    """Optimise one δ per fact, all facts in shared forward passes; see the module docstring for the loss.

    ``facts`` need ``.subject``, ``.prompt`` (with ``{}``) and ``.target_new``; ``templates``
    are context templates such as ``["{}", "Prefix. {}"]``; ``max_rows`` bounds the rows of one forward,
    ``max_facts`` the facts of one optimisation loop.
    """
    loaded.check_layers([layer])
    if not templates:
        raise ValueError("at least one context template is needed ('{}' alone means no context)")
    for t in templates:
        if t.count("{}") != 1:
            raise DataError(f"Context template {t!r} must contain exactly one '{{}}'.")
    if len(facts) == 0:
        empty = torch.zeros(0, loaded.d_model, device=loaded.layer_device(layer))
        return TargetResult(empty, empty.clone(), torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    group = max(1, max_facts)
    return TargetResult.concat([_optimise(loaded, facts[lo:lo + group], layer, hp, templates, max_rows)
                                for lo in range(0, len(facts), group)])


def _optimise(loaded: LoadedModel, facts: list, layer: int, hp: TargetHParams, templates: list[str],
              max_rows: int) -> TargetResult:
    """compute_targets for one group of facts."""
    device, n, d = loaded.layer_device(layer), len(facts), loaded.d_model  # δ lives with its layer
    fact_rows = _fact_rows(loaded.tokenizer, facts, templates)
    per_fact = len(templates) + 1
    facts_per_chunk = max(1, max_rows // per_fact)
    pad = pad_id(loaded.tokenizer)
    h = block_outputs(loaded, facts, layer, max_rows)
    h_norm = h.norm(dim=1)
    max_norm = hp.clamp_norm_factor * h_norm

    delta = torch.zeros(n, d, dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    frozen = torch.zeros(n, dtype=torch.bool, device=device)
    steps_taken = torch.zeros(n, dtype=torch.long, device=device)
    nll_before = torch.zeros(n, device=device)
    nll_now = torch.zeros(n, device=device)
    kl_start: torch.Tensor | None = None  # (n, vocab) log-probs with δ = 0

    # Facts in order of their longest row, so a chunk holds rows of similar length (less left padding).
    by_length = torch.tensor(sorted(range(n), key=lambda i: max(len(r) for r in fact_rows[i].rows)),
                             dtype=torch.long, device=device)
    for it in range(hp.steps):
        measuring_only = it == hp.steps - 1
        active = by_length[~frozen[by_length]]
        if len(active) == 0:
            break
        opt.zero_grad(set_to_none=False)
        for lo in range(0, len(active), facts_per_chunk):
            idx = active[lo:lo + facts_per_chunk]
            chunk = _build_chunk(fact_rows, idx.tolist(), pad, loaded.device, device)
            with torch.set_grad_enabled(not measuring_only):
                nll, kl_logprobs = _forward(loaded, chunk, delta, layer, len(templates))
                if kl_start is None:  # first pass: δ = 0 for every fact
                    kl_start = torch.empty(n, kl_logprobs.shape[-1], device=device)
                if it == 0:
                    kl_start[idx] = kl_logprobs.detach()
                    nll_before[idx] = nll.detach()
                kl = (kl_logprobs.exp() * (kl_logprobs - kl_start[idx])).sum(-1)
            nll_now[idx] = nll.detach()
            decay_now = hp.weight_decay * delta[idx].detach().norm(dim=1) / h_norm[idx] ** 2  # issue 14:
            done = (nll + hp.kl_factor * kl + decay_now).detach() < hp.early_stop_loss  # stop on the whole loss
            frozen[idx[done]] = True
            if not measuring_only and not done.all():
                ((nll + hp.kl_factor * kl)[~done]).sum().backward()
        training = active[~frozen[active]]
        if measuring_only or len(training) == 0:
            break
        decay = hp.weight_decay * (delta[training].norm(dim=1) / h_norm[training] ** 2).sum()
        decay.backward()
        with torch.no_grad():
            delta.grad[frozen] = 0
            kept = delta[frozen].clone()
            opt.step()
            delta[frozen] = kept  # Adam's momentum moves rows even with zero gradient
            norms = delta.norm(dim=1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-30), torch.ones_like(norms))
            delta.mul_(scale.unsqueeze(1))
        steps_taken[training] += 1
        log.debug("targets step %d: %d facts training, mean NLL %.4f", it, len(training), float(nll_now.mean()))

    z = (h + delta.detach()).float()
    log.info("targets at layer %d for %d facts: NLL %.3f -> %.3f, %.1f steps on average, %d stopped early",
             layer, n, float(nll_before.mean()), float(nll_now.mean()), float(steps_taken.float().mean()),
             int(frozen.sum()))
    return TargetResult(z, h, nll_before.cpu(), nll_now.cpu(), steps_taken.cpu())
