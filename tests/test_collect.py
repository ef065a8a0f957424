"""The one-pass collector equals brute force: every key collected by hand and multiplied out in float64."""

import numpy as np
import pytest
import torch

from covedit.pipeline.hooks import capture_inputs
from covedit.stats.collect import SecondMoment, batch_keys

TEXTS = ["The Eiffel Tower is in Paris.", "Rome is the capital of Italy and has many old buildings.",
         "Short.", "Water boils at one hundred degrees Celsius at sea level, which is a fact."]


def padded_batch(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask, enc.attention_mask.bool()


def all_keys(loaded, layer, ids, attn):
    """Every key at every real position, from a full (untruncated) forward of the same padded batch."""
    with torch.no_grad(), capture_inputs([loaded.down_proj(layer)]) as seen:
        loaded.model(input_ids=ids, attention_mask=attn)
    return seen[0][attn.bool()].double()


def unpadded_keys(loaded, layer, texts):
    """Every key of every text, one unpadded forward per text."""
    keys = []
    for t in texts:
        ids = loaded.tokenizer(t, return_tensors="pt").input_ids
        with torch.no_grad(), capture_inputs([loaded.down_proj(layer)]) as seen:
            loaded.model(input_ids=ids)
        keys.append(seen[0][0].double())
    return torch.cat(keys)


@pytest.mark.parametrize("accumulate,rtol", [("float64", 1e-12), ("mixed", 1e-5), ("float32", 1e-5)])
def test_collector_equals_brute_force(tiny, accumulate, rtol):
    """Linear (llama) and Conv1D (gpt2), padding excluded, all layers from one truncated forward."""
    layers = [1, 2]
    ids, attn, count = padded_batch(tiny.tokenizer, TEXTS)
    moments = {L: SecondMoment(tiny.d_ff, accumulate) for L in layers}
    got = batch_keys(tiny, layers, ids, attn, count)
    for L in layers:
        moments[L].add(got.keys[L])
    for L in layers:
        k = all_keys(tiny, L, ids, attn)
        expected = (k.T @ k).numpy()
        total, count_seen = moments[L].state()
        assert count_seen == k.shape[0] == int(attn.sum())
        np.testing.assert_allclose(total, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
        assert np.array_equal(total, total.T)


def test_padding_changes_no_key(tiny):
    """Keys read from a padded batch are the keys of each text alone (to float32 rounding of the model)."""
    ids, attn, _ = padded_batch(tiny.tokenizer, TEXTS)
    torch.testing.assert_close(all_keys(tiny, 2, ids, attn), unpadded_keys(tiny, 2, TEXTS), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("panels", [1, 3, 8])
@pytest.mark.parametrize("accumulate", ["float64", "mixed"])
def test_row_panels_of_the_upper_triangle_equal_the_full_product(panels, accumulate):
    """The panels (uneven when d is not a multiple) cover the upper triangle once; state() mirrors it."""
    torch.manual_seed(0)
    k = torch.randn(300, 1000, dtype=torch.float64)
    m = SecondMoment(1000, accumulate, panels=panels)
    m.add(k[:150])
    m.add(k[150:])
    total, count = m.state()
    rtol = 1e-13 if accumulate == "float64" else 1e-6
    np.testing.assert_allclose(total, (k.T @ k).numpy(), rtol=rtol, atol=rtol * 300)
    assert count == 300 and np.array_equal(total, total.T)


def test_state_load_continues_bitwise():
    torch.manual_seed(1)
    chunks = [torch.randn(64, 512) for _ in range(4)]
    unbroken = SecondMoment(512)
    for c in chunks:
        unbroken.add(c)
    first = SecondMoment(512)
    for c in chunks[:2]:
        first.add(c)
    resumed = SecondMoment(512)
    resumed.load(*first.state())
    for c in chunks[2:]:
        resumed.add(c)
    a, b = unbroken.state(), resumed.state()
    assert a[1] == b[1] and np.array_equal(a[0], b[0])
