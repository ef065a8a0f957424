"""Target vectors z for a batch of facts, all optimised together (MEMIT's ``compute_z``, batched).

For fact i, δᵢ ∈ R^d_model is added to the output of block ``layer``'s MLP down-projection (where ROME
puts v*) at the subject's last token of each of its prompts, and trained with Adam to make the model say
``target_new``::

    loss_i = nll_i + kl_factor · KL(p_now ‖ p_start) + weight_decay · ‖δᵢ‖ / ‖sᵢ‖²

* nll_i: mean over its rewrite prompts, each placed in every context template, of the mean over target
  tokens of −log p(token | prefix), the target teacher-forced (all its tokens but the last are appended as
  token ids, never re-tokenised from text).
* KL: the next-token distribution at the subject's last token of "{subject} is a" (compute_z's lookup
  index: what follows the subject itself), edited against unedited, in the direction compute_z uses
  (``kl_div(p_start, p_now)`` = KL(p_now ‖ p_start)).
* weight decay ‖δ‖ / ‖s‖², as compute_z writes it (not squared: the published weight 0.5 with the clamp
  assumes this weak form), and after every Adam step ‖δᵢ‖ ≤ clamp_norm_factor · ‖sᵢ‖. The scale s is
  taken at the subject's last token of the bare rewrite prompt (for merged facts, the mean of their
  norms): the block output h for MEMIT (compute_z, ``relative_to="block"``), the MLP output m = W k for
  ROME (compute_v, ``relative_to="mlp"``). Where the
  block normalises its MLP output (Gemma-2/3, OLMo-2: the registry's ``post_mlp_norm``) it is always m:
  behind a scale-invariant norm only δ's size relative to m matters.
* A fact stops once its whole loss_i is below ``early_stop_loss`` (compute_z's ``loss < 5e-2``), and with
  ``stop_when_top1`` also once every target token is the most probable token at every one of its rewrite
  rows (ENCORE's "most-probable early stopping", MPES): the smallest δ that makes the model say the target
  in every context, instead of pushing its probability towards 1 (a larger residual for the solve to write).
* With ``first_step`` = ρ > 0 (off by default) the first update is not Adam's: δ goes straight to ρ times
  the clamp radius along −∇loss at δ = 0. Adam's first steps move every coordinate by about lr, so at the
  default lr δ needs a few of them to reach the sphere where it ends; Adam takes every later update.

Facts that share a subject and a new target (zsRE asks up to 13 questions of one subject with one
answer) are merged (``merge=True``): they get one δ, optimised over all their prompts. Their keys are
nearly the same vector, so separately optimised δs would ask the solve for inconsistent values on one key.
Each fact still gets its own z = h + δ, with h at its own prompt, so the solve sees every fact.

Where the block adds its MLP output to the residual stream itself (Llama, GPT-2, ...), adding δ to it is
adding δ to the block output: exactly MEMIT's compute_z. Behind a post-MLP norm N it is the only place
where δ is what the solve can write (postnorm.py). Either way the result is given in the residual stream,
z = h + N(m + δ) − N(m) (N the identity where there is none): the block output the edit should produce.

Why batched equals one at a time: the total loss is the sum (not the mean) over facts, a fact's rows
never interact with another's, and Adam works element-wise, so each δᵢ follows exactly the path it would
follow alone (up to float rounding). Early stopping is per fact: once loss_i < early_stop_loss at a forward
pass, δᵢ is frozen (Adam's momentum would still move it, so its old value is restored after each step)
and its rows leave the batch. ``steps`` counts forward passes as the reference's ``v_num_grad_steps``
does: the last pass only measures, so at most ``steps - 1`` updates are made.

Only what δ can change is computed. δ enters at the subject's last token s of block ``layer``, so nothing
before s, and nothing below block ``layer + 1`` anywhere, depends on it. Each chunk of rows is split once
at s: the prefix (tokens before s) runs through the model once, keeping every layer's keys and values;
the suffix (s onwards) runs through the whole model once at δ = 0, which records block ``layer``'s output
over the suffix, the unedited NLL and the KL reference. Every Adam step then runs blocks ``layer + 1``…
over the suffix only, attending to the cached prefix, with blocks 0…``layer`` replaced by the recorded
output plus δ, and the logits only at the columns that predict target tokens. The first chunk checks that
this reproduces the full forward (NLL to 1e-3, δ = 0); a model where it does not (an architecture whose
blocks take or return something else) falls back to the full forward every step, with a warning.
``reuse_prefix=False`` asks for the full forward (the reference the tests compare against).

Quirks:

* Rows are left-padded (prefix and suffix separately; the mask has a hole between them) with position ids
  counted over real tokens, so every row ends at the same column and the logits of the last few columns
  (``logits_to_keep``) are all that is computed: memory is rows × (longest target) × vocab.
* Facts are chunked once, in order of their longest row, so rows of similar length share a forward; a
  chunk whose facts have partly stopped runs its remaining rows only.
* ``max_rows`` bounds the rows of one forward; a fact's rows (prompts × templates + 1) always share a
  chunk, so one chunk can exceed it when a single (merged) fact has more rows.
* ``max_facts`` bounds the facts optimised in one loop: larger batches run as consecutive groups (same
  targets, by the argument above), so the reference distributions (facts × vocab floats, 256 MiB for 256
  facts of a 262k vocabulary), the prefix caches and Adam's state stay bounded however many facts are
  edited.
* The model runs in its own dtype; δ, the logits' softmax and the losses are float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from covedit.pipeline.errors import DataError
from covedit.pipeline.hooks import capture_outputs, edit_output, run_until, skip_blocks
from covedit.pipeline.hparams import TargetHParams
from covedit.pipeline.keys import encode_with_subject, pad_rows, target_token_ids
from covedit.pipeline.models import LoadedModel
from covedit.pipeline.tokens import pad_id

log = logging.getLogger(__name__)

KL_PROMPT = "{} is a"


@dataclass
class TargetResult:
    """Per fact: the target value z at the subject's last token after block ``layer``, and how it went."""

    z: torch.Tensor  # (n, d_model) float32, the block output the edit should produce there
    h: torch.Tensor  # (n, d_model) float32, the block output there before editing (bare rewrite prompt)
    nll_before: torch.Tensor  # (n,) mean NLL of target_new over its (merged) prompts × templates, δ = 0
    nll_after: torch.Tensor  # (n,) the same with the final δ
    steps_taken: torch.Tensor  # (n,) Adam updates applied to each δ

    @property
    def delta(self) -> torch.Tensor:
        return self.z - self.h

    def select(self, index: list[int]) -> TargetResult:
        """The results of some facts (a fact's target depends on no other fact of its batch but those it
        was merged with)."""
        return TargetResult(self.z[index], self.h[index], self.nll_before[index], self.nll_after[index],
                            self.steps_taken[index])

    @staticmethod
    def concat(parts: list[TargetResult]) -> TargetResult:
        return TargetResult(*(torch.cat([getattr(p, f) for p in parts]) for f in
                              ("z", "h", "nll_before", "nll_after", "steps_taken")))


@dataclass
class _FactRows:
    """The token rows of one (merged) fact: one per prompt and template (prompt + target[:-1]), the KL row."""

    rows: list[list[int]]  # rewrite rows first, KL row last
    subject_pos: list[int]  # subject's last token in each row
    target: list[int]  # target_new token ids


def fact_groups(facts: list, merge: bool = True) -> list[list[int]]:
    """Indices of the facts that share one δ, in order of first appearance: those with the same subject and
    target_new when ``merge``, else each fact alone."""
    if not merge:
        return [[i] for i in range(len(facts))]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, f in enumerate(facts):
        groups.setdefault((f.subject, f.target_new.strip()), []).append(i)
    return list(groups.values())


@dataclass
class _Chunk:
    """Every row of some facts, each split at its subject's last token: prefix (before it), suffix (from it)."""

    facts: torch.Tensor  # (c,) global fact indices
    row_fact: torch.Tensor  # (R,) global fact index of each row
    prefixes: list[list[int]]
    suffixes: list[list[int]]
    labels: torch.Tensor  # (R, keep) target ids over the last `keep` columns; -100 elsewhere and on KL rows
    is_kl: torch.Tensor  # (R,) bool
    keep: int  # columns at the end whose logits are computed
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer, the prefix's keys and values
    base: torch.Tensor | None = None  # (R, S, d_model) block `layer`'s output over the suffix at δ = 0
    mlp: torch.Tensor | None = None  # (R, d_model) its MLP output at the subject (behind a post-MLP norm)


def _fact_rows(tokenizer, groups: list[list], templates: list[str]) -> list[_FactRows]:
    """Tokenise every rewrite and KL prompt once (subject located by keys.encode_with_subject); one entry per
    group of facts (a group shares its subject and target)."""
    prompts, subjects = [], []
    for group in groups:
        prompts += [t.replace("{}", f.prompt) for f in group for t in templates] + [KL_PROMPT]
        subjects += [group[0].subject] * (len(group) * len(templates) + 1)
    enc = encode_with_subject(tokenizer, prompts, subjects, padding_side="right")
    out, r = [], 0
    for group in groups:
        target = target_token_ids(tokenizer, group[0].target_new)
        rows, pos = [], []
        for _ in range(len(group) * len(templates)):  # rewrite rows: teacher-force the target
            rows.append(enc.input_ids[r, : int(enc.last[r]) + 1].tolist() + target[:-1])
            pos.append(int(enc.subject_last[r]))
            r += 1
        subject_last = int(enc.subject_last[r])  # the KL row ends at the subject: its distribution is read there
        rows.append(enc.input_ids[r, : subject_last + 1].tolist())
        pos.append(subject_last)
        r += 1
        out.append(_FactRows(rows, pos, target))
    return out


def _make_chunk(fact_rows: list[_FactRows], facts: list[int], device: torch.device) -> _Chunk:
    row_fact, prefixes, suffixes, targets, is_kl = [], [], [], [], []
    for i in facts:
        fr = fact_rows[i]
        for j, (ids, pos) in enumerate(zip(fr.rows, fr.subject_pos)):
            kl = j == len(fr.rows) - 1
            row_fact.append(i)
            prefixes.append(ids[:pos])
            suffixes.append(ids[pos:])
            targets.append([] if kl else fr.target)
            is_kl.append(kl)
    keep = max(len(t) for t in targets)
    labels = torch.full((len(targets), keep), -100, dtype=torch.long)
    for r, t in enumerate(targets):  # the last len(t) columns predict the target's tokens
        if t:
            labels[r, keep - len(t):] = torch.tensor(t, dtype=torch.long)

    def as_long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return _Chunk(as_long(facts), as_long(row_fact), prefixes, suffixes, labels.to(device),
                  torch.tensor(is_kl, device=device), keep)


def _chunks(fact_rows: list[_FactRows], max_rows: int, device: torch.device) -> list[_Chunk]:
    """Facts in order of their longest row, so a chunk holds rows of similar length (less left padding), as
    many whole facts as fit in ``max_rows`` rows (at least one)."""
    order = sorted(range(len(fact_rows)), key=lambda i: max(len(r) for r in fact_rows[i].rows))
    parts: list[list[int]] = [[]]
    rows = 0
    for i in order:
        n = len(fact_rows[i].rows)
        if parts[-1] and rows + n > max_rows:
            parts.append([])
            rows = 0
        parts[-1].append(i)
        rows += n
    return [_make_chunk(fact_rows, part, device) for part in parts if part]


def _positions(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids counted over real tokens (so left padding shifts nothing), starting at ``offset``."""
    return ((mask.cumsum(-1) - 1).clamp(min=0) + (offset.unsqueeze(1) if torch.is_tensor(offset) else offset))


def _logits(loaded: LoadedModel, keep: int, **inputs) -> torch.Tensor:
    """The model's own logits over the last ``keep`` columns (r, keep, V), float32."""
    return loaded.logits(keep, **inputs).float()


def _picks(chunk: _Chunk, rows: torch.Tensor) -> torch.Tensor:
    """(r, keep) bool: the columns whose logits a loss reads: target tokens, and a KL row's last column."""
    at = chunk.labels.device
    rows = rows.to(at)
    picked = chunk.labels[rows] != -100
    picked[chunk.is_kl[rows], -1] = True
    return picked


class _Runner:
    """Forward passes over (some rows of) a chunk with δ in place: the full rows, or the suffix only.

    Both return the logits of the picked columns only (N, V), float32, in row-major order of ``_picks``."""

    def __init__(self, loaded: LoadedModel, layer: int, pad_id: int):
        self.loaded, self.layer, self.pad_id = loaded, layer, pad_id
        self.norm = loaded.post_mlp_norm(layer)
        self.softcap = getattr(loaded.model.config.get_text_config(), "final_logit_softcapping", None)

    def _change(self, chunk: _Chunk, rows: torch.Tensor, delta_rows: torch.Tensor) -> torch.Tensor:
        """What δ does to the block output at the subject: δ, or N(m + δ) − N(m) behind a post-MLP norm."""
        if self.norm is None:
            return delta_rows
        m = chunk.mlp[rows.to(chunk.mlp.device)].float()
        return (self.norm(m + delta_rows.to(m.device)) - self.norm(m)).float()

    def full(self, chunk: _Chunk, rows: torch.Tensor, delta_rows: torch.Tensor) -> torch.Tensor:
        """The whole rows through the whole model, δ added to the MLP output at each row's subject."""
        loaded = self.loaded
        seqs = [chunk.prefixes[r] + chunk.suffixes[r] for r in rows.tolist()]
        ids, mask = pad_rows(seqs, self.pad_id, "left")
        subject_col = torch.tensor([ids.shape[1] - len(chunk.suffixes[r]) for r in rows.tolist()],
                                   device=delta_rows.device)
        index = (torch.arange(len(rows), device=delta_rows.device), subject_col)

        def add_delta(m: torch.Tensor) -> torch.Tensor:
            return m.index_put(index, delta_rows.to(m.dtype), accumulate=True)

        with edit_output(loaded.down_proj(self.layer), add_delta):
            logits = _logits(loaded, chunk.keep, input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                             position_ids=_positions(mask).to(loaded.device), use_cache=False)
        return logits[_picks(chunk, rows).to(logits.device)]

    def _suffix_inputs(self, chunk: _Chunk, rows: torch.Tensor) -> dict:
        loaded = self.loaded
        r = rows.tolist()  # padded to the whole chunk's widths, which its cached prefix and block output have
        prefix_mask = pad_rows([chunk.prefixes[i] for i in r], self.pad_id, "left", max(map(len, chunk.prefixes)))[1]
        ids, mask = pad_rows([chunk.suffixes[i] for i in r], self.pad_id, "left", max(map(len, chunk.suffixes)))
        inputs = dict(input_ids=ids, attention_mask=torch.cat([prefix_mask, mask], 1),
                      position_ids=_positions(mask, prefix_mask.sum(1)))
        inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
        if chunk.kv is not None:
            cache = DynamicCache(config=loaded.model.config)
            for i, (k, v) in enumerate(chunk.kv):
                cache.update(k[rows.to(k.device)], v[rows.to(v.device)], i)
            inputs["cache"] = cache
        return inputs

    def suffix(self, chunk: _Chunk, rows: torch.Tensor, delta_rows: torch.Tensor) -> torch.Tensor:
        """Blocks ``layer + 1``… over the suffix only, on the cached prefix and the recorded block output
        (blocks 0…``layer`` do not run); the output head only at the picked columns."""
        at = chunk.base.device
        base = chunk.base[rows.to(at)]
        subject_col = torch.tensor([base.shape[1] - len(chunk.suffixes[r]) for r in rows.tolist()], device=at)
        change = self._change(chunk, rows, delta_rows).to(at, base.dtype)
        start = base.index_put((torch.arange(len(rows), device=at), subject_col), change, accumulate=True)
        with skip_blocks(list(self.loaded.blocks)[:self.layer + 1], start):
            hidden = self.loaded.model.base_model(use_cache=True, **self._suffix_inputs(chunk, rows)).last_hidden_state
        hidden = hidden[:, -chunk.keep:][_picks(chunk, rows).to(hidden.device)]
        logits = self.loaded.model.get_output_embeddings()(hidden).float()
        return logits if not self.softcap else torch.tanh(logits / self.softcap) * self.softcap

    @torch.no_grad()
    def prepare(self, chunk: _Chunk) -> torch.Tensor:
        """Cache the prefix's keys and values and the suffix's block output; return the picked logits at δ = 0
        (the model's own forward and head, which the suffix path is checked against)."""
        loaded = self.loaded
        ids, mask = pad_rows(chunk.prefixes, self.pad_id, "left")
        if ids.shape[1]:
            out = loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                               position_ids=_positions(mask).to(loaded.device), use_cache=True,
                               **({"logits_to_keep": 1} if loaded.takes_logits_to_keep else {}))
            chunk.kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        rows = torch.arange(len(chunk.suffixes))
        watched = [loaded.block(self.layer)] + ([loaded.down_proj(self.layer)] if self.norm is not None else [])
        with capture_outputs(watched) as seen:
            logits = _logits(loaded, chunk.keep, use_cache=True, **self._suffix_inputs(chunk, rows))
        chunk.base = seen[0].detach()
        if self.norm is not None:
            subject_col = torch.tensor([seen[1].shape[1] - len(s) for s in chunk.suffixes], device=seen[1].device)
            chunk.mlp = seen[1][torch.arange(len(rows), device=seen[1].device), subject_col].detach()
        return logits[_picks(chunk, rows).to(logits.device)]


def _picked_tokens(chunk: _Chunk, rows: torch.Tensor, at: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each picked logit (``_picks`` order) of ``rows``: which of them it belongs to, the token it must
    predict (-100 on KL rows) and whether it is the KL prompt's."""
    picked = _picks(chunk, rows).to(at)
    row_of = torch.arange(len(rows), device=at).unsqueeze(1).expand_as(picked)[picked]
    label = chunk.labels.to(at)[rows.to(at)][picked]
    return row_of, label, chunk.is_kl.to(at)[rows.to(at)][row_of]


def _losses(logits: torch.Tensor, chunk: _Chunk, rows: torch.Tensor, local_fact: torch.Tensor, n_facts: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-fact NLL (c,) and KL-prompt next-token log-probs (c, vocab) on δ's device, from the picked logits
    (N, V) of ``rows`` (``_picks`` order); ``local_fact`` numbers each row's fact within the c facts."""
    at = logits.device
    row_of, label, kl_pick = _picked_tokens(chunk, rows, at)
    local = local_fact.to(at)
    token_nll = F.cross_entropy(logits[~kl_pick], label[~kl_pick], reduction="none")
    rewrite_row = row_of[~kl_pick]
    row_sum = torch.zeros(len(rows), device=at).index_add(0, rewrite_row, token_nll)
    row_len = torch.zeros(len(rows), device=at).index_add(0, rewrite_row, torch.ones_like(token_nll))
    is_rewrite = row_len > 0
    nll = torch.zeros(n_facts, device=at).index_add(0, local[is_rewrite], row_sum[is_rewrite] / row_len[is_rewrite])
    n_rows = torch.zeros(n_facts, device=at).index_add(0, local[is_rewrite], torch.ones_like(row_sum[is_rewrite]))
    kl_logprobs = torch.empty(n_facts, logits.shape[-1], device=at)
    kl_logprobs[local[row_of[kl_pick]]] = F.log_softmax(logits[kl_pick], dim=-1)
    return (nll / n_rows.clamp(min=1)).to(device), kl_logprobs.to(device)


def _all_top1(logits: torch.Tensor, chunk: _Chunk, rows: torch.Tensor, local_fact: torch.Tensor, n_facts: int,
              device: torch.device) -> torch.Tensor:
    """Per fact (c,) bool: is every target token of every one of its rewrite rows the most probable token?
    Same arguments as ``_losses``; computed only when ``stop_when_top1`` asks for it (an argmax over the
    vocabulary per target token)."""
    at = logits.device
    row_of, label, kl_pick = _picked_tokens(chunk, rows, at)
    rewrite = ~kl_pick
    missed = (logits[rewrite].argmax(-1) != label[rewrite]).float()  # a target token not ranked first
    per_fact = torch.zeros(n_facts, device=at).index_add(0, local_fact.to(at)[row_of[rewrite]], missed)
    return (per_fact == 0).to(device)


def subject_outputs(loaded: LoadedModel, facts: list, modules: list[torch.nn.Module],
                    batch_rows: int) -> list[torch.Tensor]:
    """The output of each module at the subject's last token of each bare rewrite prompt, float32 (n, ·).
    The forward stops once every module has run: the blocks above them and the output head never do."""
    out: list[list[torch.Tensor]] = [[] for _ in modules]
    for lo in range(0, len(facts), batch_rows):
        chunk = facts[lo:lo + batch_rows]
        enc = encode_with_subject(loaded.tokenizer, [f.prompt for f in chunk], [f.subject for f in chunk],
                                  padding_side="left").to(loaded.device)
        with torch.no_grad(), capture_outputs(modules, stop=True) as seen:
            run_until(loaded.model, **enc.model_inputs())
        for i, s in enumerate(seen):
            at = s.device  # the module's device
            out[i].append(s[torch.arange(len(chunk), device=at), enc.subject_last.to(at)].float())
    return [torch.cat(o) if o else torch.zeros(0, loaded.d_model) for o in out]


def block_outputs(loaded: LoadedModel, facts: list, layer: int, batch_rows: int) -> torch.Tensor:
    """h: output of block ``layer`` at the subject's last token of each bare rewrite prompt, float32."""
    return subject_outputs(loaded, facts, [loaded.block(layer)], batch_rows)[0]



def compute_targets(loaded: LoadedModel, facts: list, layer: int, hp: TargetHParams, templates: list[str],
                    max_rows: int = 128, max_facts: int = 256, reuse_prefix: bool = True, merge: bool = True,
                    relative_to: str = "block", trace: list | None = None) -> TargetResult:
    """Optimise one δ per fact (per group of facts with one subject and target when ``merge``), all in shared
    forward passes; see the module docstring for the loss. Results come back in the order of ``facts``.

    ``facts`` need ``.subject``, ``.prompt`` (with ``{}``) and ``.target_new``; ``templates``
    are context templates such as ``["{}", "Prefix. {}"]``; ``max_rows`` bounds the rows of one forward,
    ``max_facts`` the (merged) facts of one optimisation loop; ``reuse_prefix=False`` runs the full forward
    each step; ``relative_to`` is where the clamp and weight decay take their scale: "block" (MEMIT) or
    "mlp" (ROME). ``trace``, if given, receives one dict per forward pass of each optimisation loop (of ``max_facts``
    groups): the whole loss and the NLL of each of its groups, NaN once a group has stopped.
    """
    loaded.check_layers([layer])
    if not templates:
        raise ValueError("at least one context template is needed ('{}' alone means no context)")
    if relative_to not in ("block", "mlp"):
        raise ValueError(f"relative_to must be 'block' or 'mlp', got {relative_to!r}")
    for t in templates:
        if t.count("{}") != 1:
            raise DataError(f"Context template {t!r} must contain exactly one '{{}}'.")
    if len(facts) == 0:
        empty = torch.zeros(0, loaded.d_model, device=loaded.layer_device(layer))
        return TargetResult(empty, empty.clone(), torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    groups = fact_groups(facts, merge)
    step = max(1, max_facts)
    parts = [_optimise(loaded, [[facts[i] for i in g] for g in groups[lo:lo + step]], layer, hp, templates,
                       max_rows, reuse_prefix, relative_to, trace) for lo in range(0, len(groups), step)]
    order = [i for g in groups for i in g]  # the facts in the order the parts hold them
    return TargetResult.concat(parts).select(sorted(range(len(order)), key=order.__getitem__))


def _optimise(loaded: LoadedModel, groups: list[list], layer: int, hp: TargetHParams, templates: list[str],
              max_rows: int, reuse_prefix: bool, relative_to: str, trace: list | None = None) -> TargetResult:
    """compute_targets for some groups of facts: one δ per group; results per fact, group after group."""
    device, n, d = loaded.layer_device(layer), len(groups), loaded.d_model  # δ lives with its layer
    fact_rows = _fact_rows(loaded.tokenizer, groups, templates)
    runner = _Runner(loaded, layer, pad_id(loaded.tokenizer))
    records = [f for g in groups for f in g]
    owner = torch.tensor([gi for gi, g in enumerate(groups) for _ in g], device=device)  # each fact's group
    h, m = (t.to(device) for t in subject_outputs(loaded, records, [loaded.block(layer), loaded.down_proj(layer)],
                                                   max_rows))
    # the scale of a merged fact: the mean over its facts (independent of their order)
    per_fact = (h if relative_to == "block" and runner.norm is None else m).norm(dim=1)
    scale = torch.zeros(n, device=device).index_add(0, owner, per_fact) / torch.bincount(owner, minlength=n)
    max_norm = hp.clamp_norm_factor * scale

    chunks = _chunks(fact_rows, max_rows, device)
    nll_before = torch.zeros(n, device=device)
    kl_start: torch.Tensor | None = None  # (n, vocab) log-probs with δ = 0
    forward: Callable = runner.full
    if reuse_prefix:
        for c, chunk in enumerate(chunks):
            nll, kl_logprobs = _losses(runner.prepare(chunk), chunk, torch.arange(len(chunk.suffixes)),
                                       _local(chunk.row_fact, chunk.facts, n), len(chunk.facts), device)
            if kl_start is None:
                kl_start = torch.empty(n, kl_logprobs.shape[-1], device=device)
            nll_before[chunk.facts], kl_start[chunk.facts] = nll, kl_logprobs
            if c == 0 and not _suffix_path_agrees(runner, chunk, nll, n, device):
                break
        else:
            forward = runner.suffix

    delta = torch.zeros(n, d, dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    frozen = torch.zeros(n, dtype=torch.bool, device=device)
    steps_taken = torch.zeros(n, dtype=torch.long, device=device)
    nll_now = torch.zeros(n, device=device)
    for it in range(hp.steps):
        measuring_only = it == hp.steps - 1
        if frozen.all():
            break
        opt.zero_grad(set_to_none=False)
        loss_now = torch.full((n,), float("nan"), device=device)
        for chunk in chunks:
            rows = (~frozen[chunk.row_fact]).nonzero()[:, 0]
            if len(rows) == 0:
                continue
            idx = chunk.facts[~frozen[chunk.facts]]
            with torch.set_grad_enabled(not measuring_only):
                logits = forward(chunk, rows, delta[chunk.row_fact[rows]])
                local = _local(chunk.row_fact[rows], idx, n)
                nll, kl_logprobs = _losses(logits, chunk, rows, local, len(idx), device)
                if kl_start is None:  # the full forward: its first pass is at δ = 0 for every fact
                    kl_start = torch.empty(n, kl_logprobs.shape[-1], device=device)
                if it == 0 and forward == runner.full:
                    kl_start[idx] = kl_logprobs.detach()
                    nll_before[idx] = nll.detach()
                kl = (kl_logprobs.exp() * (kl_logprobs - kl_start[idx])).sum(-1)
                loss = nll + hp.kl_factor * kl + hp.weight_decay * delta[idx].norm(dim=1) / scale[idx] ** 2
            nll_now[idx], loss_now[idx] = nll.detach(), loss.detach()
            done = loss.detach() < hp.early_stop_loss
            if hp.stop_when_top1:
                done |= _all_top1(logits.detach(), chunk, rows, local, len(idx), device)
            frozen[idx[done]] = True
            if not measuring_only and not done.all():
                loss[~done].sum().backward()
        if trace is not None:
            trace.append({"pass": it, "loss": loss_now.tolist(),
                          "nll": torch.where(loss_now.isnan(), loss_now, nll_now).tolist()})
        training = (~frozen).nonzero()[:, 0]
        if measuring_only or len(training) == 0:
            break
        with torch.no_grad():
            delta.grad[frozen] = 0
            kept = delta[frozen].clone()
            if it == 0 and hp.first_step > 0:  # straight out along the steepest descent (Adam starts after)
                g = delta.grad
                delta.copy_(-hp.first_step * max_norm.unsqueeze(1) * g / g.norm(dim=1, keepdim=True).clamp(min=1e-30))
            else:
                opt.step()
            delta[frozen] = kept  # Adam's momentum moves rows even with zero gradient
            norms = delta.norm(dim=1)
            factor = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-30), torch.ones_like(norms))
            delta.mul_(factor.unsqueeze(1))
        steps_taken[training] += 1
        log.debug("targets step %d: %d facts training, mean NLL %.4f", it, len(training), float(nll_now.mean()))

    with torch.no_grad():
        delta_each = delta.detach()[owner]
        change = delta_each if runner.norm is None else (runner.norm(m + delta_each) - runner.norm(m)).float()
    z = (h + change).float()
    log.info("targets at layer %d for %d facts (%d after merging): NLL %.3f -> %.3f, %.1f steps on average, "
             "%d stopped early", layer, len(records), n, float(nll_before.mean()), float(nll_now.mean()),
             float(steps_taken.float().mean()), int(frozen.sum()))
    return TargetResult(z, h, nll_before[owner].cpu(), nll_now[owner].cpu(), steps_taken[owner].cpu())


def _local(row_fact: torch.Tensor, facts: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's position among ``facts`` (global fact indices < n), for per-fact sums over rows."""
    local = torch.full((n,), -1, dtype=torch.long, device=facts.device)
    local[facts] = torch.arange(len(facts), device=facts.device)
    return local[row_fact.to(facts.device)]


def _suffix_path_agrees(runner: _Runner, chunk: _Chunk, nll_full: torch.Tensor, n: int, device: torch.device) -> bool:
    """Does the suffix-only forward reproduce the full one at δ = 0 on this chunk? Warn and say no if not."""
    rows = torch.arange(len(chunk.suffixes))
    try:
        with torch.no_grad():
            logits = runner.suffix(chunk, rows, torch.zeros(len(rows), runner.loaded.d_model, device=device))
        nll, _ = _losses(logits, chunk, rows, _local(chunk.row_fact, chunk.facts, n), len(chunk.facts), device)
        gap = float((nll - nll_full).abs().max())
    except Exception as e:  # noqa: BLE001 (any failure means: use the full forward)
        gap, why = float("nan"), f"{type(e).__name__}: {e}"
    else:
        why = f"max |ΔNLL| {gap:.3g}"
    if gap <= 1e-3:
        return True
    log.warning("skipping the unchanged prefix and lower blocks does not reproduce this model's forward (%s); "
                "targets use the full forward every step (slower, same result)", why)
    return False
