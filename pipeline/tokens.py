"""What covedit asks of a tokenizer's special tokens, in one place for both stages.

``pad_id`` is the id that fills padding (the edit stage's batches and the statistics stage's batches alike);
``BOS_POLICIES`` are the values of ``--bos``: whether the statistics count the key at a BOS position the
tokenizer prepends (``keep``) or leave it out (``skip``). How a BOS is detected and where it goes lives with
the sequences that use it (``covedit.stats.corpus``). This module imports no torch and no transformers, so
the statistics store can validate a cache key without them.
"""

from __future__ import annotations

from covedit.pipeline.errors import UsageError

BOS_POLICIES = ("skip", "keep")


def pad_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS, else 0 (padding is masked out)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def check_bos_policy(bos: str, name: str = "The BOS policy") -> None:
    """UsageError unless ``bos`` is one of :data:`BOS_POLICIES`; ``name`` is what the message calls it."""
    if bos not in BOS_POLICIES:
        raise UsageError(f"{name} must be 'skip' or 'keep', not {bos!r}.")
