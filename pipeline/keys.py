"""Key vectors k: where the subject's last token is, the context templates, and the MLP inputs there.

A fact's key at layer L is the input of that layer's MLP down-projection at the subject's last token,
averaged over the rewrite prompt placed after a few short context prefixes (MEMIT's ``compute_ks``)::

    templates = context_templates(loaded)                  # ["{}", "The first thing. {}", ...]
    keys = compute_keys(loaded, [4, 5], ["The {} is in"], ["Eiffel Tower"], templates)
    keys[4].shape                                          # (1, d_ff)

Quirks:

* The subject is located on characters, not by re-tokenising pieces: the whole text is tokenised once
  with an offset mapping and the subject's last token is the last token whose character span overlaps
  the subject's (surrounding spaces ignored). Special tokens (BOS) have empty spans and never match, so
  this works for tokenizers that add BOS, with left or right padding. If the subject ends inside a
  token (``"Canada"`` in ``"Canadan"``), that token is used and a warning is logged.
* Left padding shifts positions; ``Encoded.model_inputs()`` passes position ids counted over real
  tokens only, so keys do not depend on the padding side (GPT-2 has absolute position embeddings).
* The average is weighted. MEMIT's ``compute_ks`` averages within each group of templates (the bare
  ``"{}"``; the prefixes of one generated length) and then over the groups, so with one prefix length the
  bare prompt's key weighs 1/2 and each of the 5 prefixed ones 1/10 (``memit_key_weights``); ROME's
  ``compute_u`` takes the plain mean over all its templates (``weights=None``).
* Context templates are deterministic: sampled like MEMIT's (top 5 tokens) but from a seeded CPU
  generator, so a model gets the same templates on every run (up to the logits' own rounding on a
  different device). They are cached on the loaded model (``LoadedModel.template_cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from importlib import resources

import torch

from covedit.pipeline.atomic import replace_file
from covedit.pipeline.errors import CannotWrite, DataError
from covedit.pipeline.hooks import capture_inputs, run_until, skip_blocks
from covedit.pipeline.models import LoadedModel, ModelError, cache_root
from covedit.pipeline.tokens import pad_id

log = logging.getLogger(__name__)

STARTERS = ("The", "Therefore", "Because", "I", "You")


@dataclass
class Encoded:
    """A padded batch of prompts with the position of each row's subject."""

    input_ids: torch.LongTensor  # (B, T)
    attention_mask: torch.LongTensor  # (B, T)
    subject_last: torch.LongTensor  # (B,) index of the subject's last token in each row
    last: torch.LongTensor  # (B,) index of the last real token of each row
    subject_first: torch.LongTensor  # (B,) index of the subject's first token in each row

    @property
    def position_ids(self) -> torch.LongTensor:
        """Positions counted over real tokens, so left padding does not shift them."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "use_cache": False}

    def to(self, device: torch.device | str) -> Encoded:
        return Encoded(self.input_ids.to(device), self.attention_mask.to(device),
                       self.subject_last.to(device), self.last.to(device), self.subject_first.to(device))


def _fill(prompt: str, subject: str) -> tuple[str, int, int]:
    """The prompt with the subject put in, and the character span of the subject without its outer spaces."""
    if prompt.count("{}") != 1:
        raise DataError(f"Prompt {prompt!r} must contain exactly one '{{}}' where the subject goes.")
    before, after = prompt.split("{}")
    start = len(before) + len(subject) - len(subject.lstrip())
    end = len(before) + len(subject.rstrip())
    return before + subject + after, start, end


def pad_rows(rows: list[list[int]], pad: int, side: str = "right", width: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as (ids, mask) of ``width`` columns (default: the longest row), padded on ``side``."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            lo = width - len(r) if side == "left" else 0
            ids[i, lo:lo + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, lo:lo + len(r)] = 1
    return ids, mask


def encode_with_subject(tokenizer, prompts: list[str], subjects: list[str], padding_side: str = "right") -> Encoded:
    """Put each subject into its prompt's ``{}``, tokenise once, and find the subject's first and last token.

    Raises DataError when a prompt lacks exactly one ``{}`` or a subject covers no token.
    """
    if len(prompts) != len(subjects):
        raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError("This model's tokenizer has no fast (Rust) version, which covedit needs for offsets.")
    filled = [_fill(p, s) for p, s in zip(prompts, subjects)]
    enc = tokenizer([text for text, _, _ in filled], add_special_tokens=True, return_offsets_mapping=True)
    rows, subject_first, subject_last = [], [], []
    for (text, start, end), subject, ids, offsets in zip(filled, subjects, enc["input_ids"], enc["offset_mapping"]):
        hits = [j for j, (a, b) in enumerate(offsets) if a < b and a < end and b > start]
        if start >= end or not hits:
            raise DataError(f"Subject {subject!r} covers no token of {text!r}.")
        j = hits[-1]
        if offsets[j][1] > end:
            log.warning("subject %r ends inside the token %r of %r; using that token",
                        subject, text[offsets[j][0]:offsets[j][1]], text)
        rows.append(list(ids))
        subject_first.append(hits[0])
        subject_last.append(j)
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    shift = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        lo = width - len(r) if padding_side == "left" else 0
        input_ids[i, lo:lo + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, lo:lo + len(r)] = 1
        shift[i] = lo
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return Encoded(input_ids, attention_mask, torch.tensor(subject_last, dtype=torch.long) + shift,
                   shift + lengths - 1, torch.tensor(subject_first, dtype=torch.long) + shift)


def target_token_ids(tokenizer, target: str) -> list[int]:
    """Tokens of ``" " + target`` as it follows a prompt; never special tokens (no BOS inside a target)."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not target.strip() or not ids:
        raise DataError(f"Target {target!r} has no tokens.")
    return list(ids)


@torch.no_grad()
def _generate_prefixes(loaded: LoadedModel, starter: str, n: int, length: int, generator: torch.Generator,
                       top_k: int = 5) -> list[str]:
    """n continuations of ``starter``, sampled from the top ``top_k`` tokens with a seeded CPU generator."""
    tok, model = loaded.tokenizer, loaded.model
    start = tok(starter, add_special_tokens=True)["input_ids"]
    n_words = len(tok(starter, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([start] * n, dtype=torch.long, device=loaded.device)
    generated = []
    past, step_input = None, ids
    for _ in range(max(1, length - n_words)):
        out = model(input_ids=step_input, cache=past, use_cache=True)
        past = out.cache
        top = out.logits[:, -1, :].float().topk(top_k, dim=-1)
        pick = torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=generator).to(top.indices.device)
        step_input = top.indices.gather(1, pick)
        generated.append(step_input)
    texts = []
    for row in torch.cat(generated, dim=1).tolist():
        if tok.eos_token_id is not None and tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id)]
        words = starter + tok.decode(row, skip_special_tokens=True)
        texts.append(" ".join(words.replace("{", " ").replace("}", " ").split()))
    return texts


def context_templates(loaded: LoadedModel, n_per_starter: int = 2, length: int = 10, seed: int = 0) -> list[str]:
    """``["{}"]`` plus short generated prefixes ending in ``". {}"``; deterministic, cached on ``loaded`` and
    in the cache folder (``templates/``, by the model's fingerprint: an edited model gets its own).

    As MEMIT's ``generate_fast``: top-5 sampling, ``length`` tokens per prefix with the starter word
    (``max_out_len``), but from a seeded generator so the same model always gets the same templates.
    """
    cache = loaded.template_cache
    key = (n_per_starter, length, seed)
    if key not in cache:
        path = cache_root() / "templates" / (hashlib.sha256(json.dumps(
            [loaded.fingerprint(), STARTERS, n_per_starter, length, seed]).encode()).hexdigest()[:24] + ".json")
        try:
            cache[key] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache[key] = _generate_templates(loaded, n_per_starter, length, seed)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                replace_file(path, json.dumps(cache[key]), "the context templates")
            except (OSError, CannotWrite) as e:  # a cache that cannot be written only costs generating again
                log.warning("%s", e)
    return list(cache[key])


def _generate_templates(loaded: LoadedModel, n_per_starter: int, length: int, seed: int) -> list[str]:
    """Generate what context_templates returns (about 50 sampled tokens: seconds on a CPU, so it is kept
    on disk, keyed by the model's fingerprint and the settings)."""
    templates = ["{}"]
    generator = torch.Generator().manual_seed(seed)
    for starter in STARTERS:
        for prefix in _generate_prefixes(loaded, starter, n_per_starter, length, generator):
            template = f"{prefix}. {{}}"
            if template not in templates:
                templates.append(template)
    log.debug("context templates for %s: %s", loaded.model_id, templates)
    return templates


@torch.no_grad()
def prompt_token_moment(loaded: LoadedModel, layer: int, prompts: list[str], subjects: list[str],
                        targets: list[str], batch_size: int = 64) -> torch.Tensor:
    """Σ k kᵀ (d_ff × d_ff, float64, on the layer's device) of the down-projection inputs at every token of
    each rewrite prompt with its target teacher-forced (all target tokens but the last), except the
    subject's last token: the tokens an edit should leave alone (MEMIT's ``preserve_prompts``)."""
    at = loaded.layer_device(layer)
    total = torch.zeros(loaded.d_ff, loaded.d_ff, dtype=torch.float64, device=at)
    module = loaded.down_proj(layer)
    for lo in range(0, len(prompts), batch_size):
        enc = encode_with_subject(loaded.tokenizer, prompts[lo:lo + batch_size], subjects[lo:lo + batch_size])
        rows = [enc.input_ids[r, : int(enc.last[r]) + 1].tolist() + target_token_ids(loaded.tokenizer, t)[:-1]
                for r, t in enumerate(targets[lo:lo + batch_size])]
        ids, mask = pad_rows(rows, pad_id(loaded.tokenizer))  # right padding: positions are the real ones
        keep = mask.bool()
        keep[torch.arange(len(rows)), enc.subject_last] = False
        with capture_inputs([module], stop_after=module) as seen:
            run_until(loaded.model, input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                      use_cache=False)
        k = seen[0].to(at)[keep.to(at)].double()  # (tokens, d_ff)
        total += k.T @ k
    return total


PRESERVE_SUBJECTS = "preserve_subjects.txt"


@cache
def preserve_subjects() -> tuple[str, ...]:
    """The shipped ordinary entity names (pipeline/data/preserve_subjects.txt, in its fixed shuffled order)."""
    text = resources.files("covedit.pipeline").joinpath("data", PRESERVE_SUBJECTS).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def relation_key_moment(loaded: LoadedModel, layer: int, prompts: list[str], edited_subjects: list[str],
                        n_subjects: int, batch_size: int = 64) -> torch.Tensor:
    """Σ over the edited facts of the mean k kᵀ (d_ff × d_ff, float64, on the layer's device) at the
    subject's last token of the fact's rewrite prompt with each of ``n_subjects`` ordinary entity names in
    place of its subject (``preserve_subjects``, less any edited subject): the keys that the same
    relation's prompts about other subjects produce, whose outputs the edit should leave alone (MEMIT's
    ``preserve_relation``). A prompt shared by several facts weighs as many times as it is shared."""
    edited = {s.casefold() for s in edited_subjects}
    pool = [s for s in preserve_subjects() if s.casefold() not in edited][:n_subjects]
    counts = Counter(prompts)
    unique = sorted(counts)
    rows = [(p, s) for p in unique for s in pool]
    keys = compute_keys(loaded, [layer], [p for p, _ in rows], [s for _, s in rows], ["{}"], batch_size)[layer]
    at = loaded.layer_device(layer)
    k = keys.to(at).double()
    w = torch.tensor([counts[p] / len(pool) for p, _ in rows], dtype=torch.float64, device=at)
    return (k * w[:, None]).T @ k


def memit_key_weights(groups: list[list[str]]) -> list[float]:
    """Weights of the flattened ``groups`` for MEMIT's key average: each group weighs the same, and within a
    group each template. ``[["{}"], [five prefixes]]`` gives ``[1/2, 1/10, 1/10, 1/10, 1/10, 1/10]``."""
    groups = [g for g in groups if g]
    return [1.0 / (len(groups) * len(g)) for g in groups for _ in g]


@dataclass
class _KeyBatch:
    """One forward's worth of (fact, template) rows and, in a KeyWalk, the hidden state to resume from."""

    enc: Encoded  # on the model's device
    fact_index: torch.Tensor  # (B,) the fact each row's key belongs to
    weight: torch.Tensor  # (B,) float32, its weight in that fact's average
    state: torch.Tensor | None = None  # the hidden state entering block ``start`` (None: run from the embeddings)
    start: int = 0


def _key_batches(loaded: LoadedModel, prompts: list[str], subjects: list[str], templates: list[str],
                 weights: list[float] | None, batch_size: int, padding_side: str) -> list[_KeyBatch]:
    """Every (fact, template) row, tokenised once and batched by length.

    A causal model's key at the subject's last token does not depend on the tokens after it, so rows are
    ordered by where their subject ends and, right-padded, each batch is cut after its last subject token:
    a batch pads little and runs no token that cannot matter. (Left-padded, rows are ordered by length and
    only all-padding columns are dropped; both sides give the same keys, which a test checks.)
    """
    if len(prompts) != len(subjects):
        raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    if not templates:
        raise ValueError("at least one context template is needed ('{}' alone means no context)")
    for t in templates:
        if t.count("{}") != 1:
            raise DataError(f"Context template {t!r} must contain exactly one '{{}}'.")
    if weights is None:
        weights = [1.0 / len(templates)] * len(templates)
    if len(weights) != len(templates) or abs(sum(weights) - 1.0) > 1e-6 or min(weights) < 0:
        raise ValueError(f"{len(weights)} key weights for {len(templates)} templates; they must be ≥ 0 and sum to 1")
    if not prompts:
        return []
    rows = [(i, t.replace("{}", prompts[i]), subjects[i], w) for i in range(len(prompts))
            for t, w in zip(templates, weights)]
    enc = encode_with_subject(loaded.tokenizer, [r[1] for r in rows], [r[2] for r in rows], padding_side)
    lengths = enc.attention_mask.sum(1)
    order = torch.argsort(enc.subject_last if padding_side == "right" else lengths, stable=True)
    fact_index = torch.tensor([r[0] for r in rows], dtype=torch.long)
    weight = torch.tensor([r[3] for r in rows], dtype=torch.float32)
    width = enc.input_ids.shape[1]
    batches = []
    for lo in range(0, len(rows), batch_size):
        pick = order[lo:lo + batch_size]
        if padding_side == "right":
            a, b = 0, int(enc.subject_last[pick].max()) + 1
        else:
            a, b = int((width - lengths[pick]).min()), width
        cut = Encoded(enc.input_ids[pick, a:b], enc.attention_mask[pick, a:b], enc.subject_last[pick] - a,
                      (enc.last[pick] - a).clamp(max=b - a - 1),  # the last token kept, after a cut
                      enc.subject_first[pick] - a)
        batches.append(_KeyBatch(cut.to(loaded.device), fact_index[pick], weight[pick]))
    return batches


def _add_keys(sums: torch.Tensor, batch: _KeyBatch, k: torch.Tensor) -> None:
    """Add each row's weighted key (``k``: the captured down-projection inputs) to its fact's sum."""
    at = k.device
    picked = k[torch.arange(len(batch.fact_index), device=at), batch.enc.subject_last.to(at)].float()
    to = sums.device
    sums.index_add_(0, batch.fact_index.to(to), picked.to(to) * batch.weight.to(to).unsqueeze(1))


@torch.no_grad()
def compute_keys(loaded: LoadedModel, layers: list[int], prompts: list[str], subjects: list[str],
                 templates: list[str], batch_size: int = 64, padding_side: str = "right",
                 weights: list[float] | None = None) -> dict[int, torch.Tensor]:
    """For each fact and layer, the down-projection input at the subject's last token, averaged over templates.

    ``weights`` (one per template, summing to 1) weigh the average; None is the plain mean. One forward
    per batch serves every layer and stops after the deepest one. Returns ``{layer: (n_facts, d_ff)
    float32}``, each on its layer's device.
    """
    batches = _key_batches(loaded, prompts, subjects, templates, weights, batch_size, padding_side)
    layers = sorted(set(layers))
    loaded.check_layers(layers)
    modules = [loaded.down_proj(layer) for layer in layers]
    sums = {layer: torch.zeros(len(prompts), loaded.d_ff, dtype=torch.float32, device=loaded.layer_device(layer))
            for layer in layers}
    for batch in batches:
        with capture_inputs(modules, stop_after=modules[-1]) as seen:
            run_until(loaded.model, **batch.enc.model_inputs())
        for layer, k in zip(layers, seen):
            _add_keys(sums[layer], batch, k)
    return sums


class KeyWalk:
    """The same facts' keys at layers l₁ < l₂ < … read one after another while the caller updates the
    down-projections in between: MEMIT's bottom-up loop, where layer lᵢ's keys must see the updates of
    the layers below it.

    ``compute_keys`` at each layer would run blocks 0…lᵢ again every time. An update of lᵢ₋₁'s
    down-projection changes what comes out of block lᵢ₋₁, not what enters it, so each batch keeps the
    hidden state that entered the previous call's block, and the next call runs only the blocks from there
    up: on SmolLM2's layers 4-8, 13 block passes instead of 35. The keys are compute_keys' (to float
    rounding; a test compares them after real updates). Guards: a call for a lower layer than the last, or
    after a down-projection below the kept states changed, raises (the kept states would be stale); a call
    that fails keeps no state; and the first batch that resumes is checked against a forward from the
    embeddings, so an architecture where starting from a kept state does not reproduce the model (its
    blocks take or return something else) runs from the embeddings every time, with a warning. Kept states
    cost rows × tokens × d_model floats; past ``keep_bytes``, further batches keep none and run from the
    embeddings each time (same keys, more work).
    """

    def __init__(self, loaded: LoadedModel, prompts: list[str], subjects: list[str], templates: list[str],
                 weights: list[float] | None = None, batch_size: int = 64, keep_bytes: int = 1 << 30):
        self.loaded, self.n, self.keep_bytes = loaded, len(prompts), keep_bytes
        self.batches = _key_batches(loaded, prompts, subjects, templates, weights, batch_size, "right")
        self.last_layer: int | None = None
        self.versions: list[int] = []  # every down-projection's version when the states were kept
        self.resume = True  # False once a kept state failed to reproduce the model's own forward
        self.checked = False  # whether that was checked (on the first batch that resumes above block 0)

    @torch.no_grad()
    def __call__(self, layer: int) -> torch.Tensor:
        """The facts' keys at ``layer`` (n, d_ff, float32, on the layer's device), as compute_keys gives them."""
        loaded = self.loaded
        loaded.check_layers([layer])
        if self.last_layer is not None and layer < self.last_layer:
            raise ValueError(f"A KeyWalk goes up the layers: layer {layer} was asked for after layer {self.last_layer}.")
        if any(loaded.down_weight(i)._version != v for i, v in enumerate(self.versions[:self.last_layer])):
            raise RuntimeError("A down-projection below the KeyWalk's kept hidden states changed: they are stale.")
        block, module = loaded.block(layer), loaded.down_proj(layer)
        sums = torch.zeros(self.n, loaded.d_ff, dtype=torch.float32, device=loaded.layer_device(layer))
        kept = 0
        try:
            for batch in self.batches:
                resumed = self.resume and batch.state is not None and batch.start > 0
                if resumed and not self.checked:
                    self.checked = True
                    resumed = self.resume = self._resuming_agrees(batch, block, module)
                entering, k = self._run(batch, block, module, resumed)
                _add_keys(sums, batch, k)
                size = entering.numel() * entering.element_size()
                if self.resume and kept + size <= self.keep_bytes:
                    batch.state, batch.start, kept = entering, layer, kept + size
                else:
                    batch.state, batch.start = None, 0
        except BaseException:  # some batches would hold states of this layer, the rest of the last: keep none
            for batch in self.batches:
                batch.state, batch.start = None, 0
            raise
        self.last_layer = layer
        self.versions = [loaded.down_weight(i)._version for i in range(loaded.num_layers)]
        return sums

    def _run(self, batch: _KeyBatch, block, module, resumed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(the hidden state entering ``block``, the input of ``module``, its down-projection)."""
        loaded = self.loaded
        skip = skip_blocks(list(loaded.blocks)[:batch.start], batch.state) if resumed else nullcontext()
        with capture_inputs([block, module], stop_after=module) as seen, skip:
            run_until(loaded.model, **batch.enc.model_inputs())
        return seen[0], seen[1]

    def _resuming_agrees(self, batch: _KeyBatch, block, module) -> bool:
        """Does resuming from a kept state give the keys the forward from the embeddings gives? Warn if not
        (an architecture whose blocks take or return something else than the kept state)."""
        _, full = self._run(batch, block, module, False)
        try:
            _, k = self._run(batch, block, module, True)
            gap, why = float((k - full).abs().max()) / (float(full.abs().max()) or 1.0), ""
        except Exception as e:  # noqa: BLE001 (any failure means: run from the embeddings)
            gap, why = float("inf"), f": {type(e).__name__}: {e}"
        if gap <= 1e-4:
            return True
        log.warning("resuming the key forward from a kept hidden state does not reproduce this model's forward "
                    "(relative gap %.3g%s); keys run from the embeddings at every layer (slower, same keys)", gap, why)
        return False
