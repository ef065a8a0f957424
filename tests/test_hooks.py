"""Forward hooks (pipeline/hooks.py): what they capture is exactly what the module computed, an edited output
is what the rest of the model sees, a stopped forward runs nothing after the stop, skipped blocks hand on
the given hidden state, and no hook or replaced forward outlives its block, even when the block raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covedit.pipeline.hooks import capture_inputs, capture_outputs, edit_output, run_until, skip_blocks


class Pair(nn.Module):
    """A block that returns a tuple (hidden state, something else)."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(x), "extra"


class Chain(nn.Module):
    """Three blocks in a row, the middle one returning a tuple; ``ran`` counts each block's completed runs."""

    def __init__(self, d: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(d, d), Pair(d), nn.Linear(d, d)])
        self.ran = [0, 0, 0]

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(x)
            x = x[0] if isinstance(x, tuple) else x
            self.ran[i] += 1
        return x


@pytest.fixture
def chain():
    return Chain().eval().requires_grad_(False)


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


def by_hand(chain, x, h0=None):
    """Each block's output, computed without the model's forward (h0 replaces the first block's)."""
    b0, b1, b2 = chain.blocks
    h0 = b0(x) if h0 is None else h0
    h1 = b1.lin(h0)
    return h0, h1, b2(h1)


def no_hooks(*modules) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__ for m in modules)


def hook_counts(*modules) -> list[tuple[int, int]]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]


def test_capture_outputs_records_each_modules_exact_output(chain):
    with capture_outputs(list(chain.blocks)) as seen:
        out = chain(X)
    h0, h1, h2 = by_hand(chain, X)
    assert torch.equal(seen[0], h0) and torch.equal(seen[1], h1) and torch.equal(seen[2], h2)  # a tuple's first
    assert torch.equal(out, h2) and no_hooks(*chain.blocks)


def test_capture_outputs_keeps_the_last_forward(chain):
    with capture_outputs([chain.blocks[2]]) as seen:
        chain(X)
        chain(2 * X)
    assert torch.equal(seen[0], by_hand(chain, 2 * X)[2])


def test_a_tiny_models_down_projection_and_block_outputs_are_captured_exactly(tiny):
    """One forward of a tiny llama / GPT-2: the captured down-projection output is that module applied to its
    captured input, and the captured block output is the hidden state the model reports after that block."""
    ids = tiny.tokenizer("The Eiffel Tower is in Paris", return_tensors="pt").input_ids
    down, block = tiny.down_proj(1), tiny.block(1)
    with torch.no_grad():
        hidden = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
    own = hook_counts(down, block)  # transformers hooks blocks itself to record hidden states, and keeps them
    with torch.no_grad(), capture_inputs([down]) as ins, capture_outputs([down, block]) as outs:
        tiny.model(input_ids=ids)
    assert ins[0].shape == (1, ids.shape[1], tiny.d_ff) and outs[0].shape == (1, ids.shape[1], tiny.d_model)
    with torch.no_grad():
        assert torch.equal(outs[0], down(ins[0]))
    assert torch.equal(outs[1], hidden[2])  # hidden_states[0] is the embeddings
    assert hook_counts(down, block) == own


def test_stop_after_runs_nothing_from_that_module_on(chain):
    b0, b1, b2 = chain.blocks
    with capture_inputs([b0, b1], stop_after=b1) as seen:
        assert run_until(chain, x=X) is None
    assert chain.ran == [1, 0, 0]  # block 1 and block 2 never ran
    assert torch.equal(seen[0], X) and torch.equal(seen[1], by_hand(chain, X)[0])
    assert no_hooks(*chain.blocks)
    assert torch.equal(run_until(chain, x=X), by_hand(chain, X)[2]) and chain.ran == [2, 1, 1]


def test_capture_outputs_with_stop_ends_the_forward_once_every_module_has_run(chain):
    """In any order, and with a module that runs inside another watched one (here b1.lin inside b1)."""
    b0, b1, b2 = chain.blocks
    with capture_outputs([b1, b1.lin, b0], stop=True) as seen:
        assert run_until(chain, x=X) is None
    assert chain.ran == [1, 0, 0]  # block 1 finished its output, then nothing else ran
    h0, h1, _ = by_hand(chain, X)
    assert torch.equal(seen[0], h1) and torch.equal(seen[1], h1) and torch.equal(seen[2], h0)
    assert no_hooks(*chain.blocks, b1.lin)


def test_skip_blocks_puts_back_a_forward_the_instance_had(chain):
    """A device map's wrapper (accelerate sets ``forward`` on the block itself) survives skipping the block."""
    b0 = chain.blocks[0]
    wrapped = b0.forward  # a bound method, set on the instance as accelerate does
    b0.forward = wrapped
    with skip_blocks([b0], X):
        assert b0.forward is not wrapped
    assert b0.__dict__["forward"] is wrapped
    assert torch.equal(chain(X), by_hand(chain, X)[2])


def test_edit_output_is_what_the_rest_of_the_model_sees(chain):
    b0, b1, _ = chain.blocks
    with edit_output(b0, lambda h: 2 * h):
        out = chain(X)
    assert torch.equal(out, by_hand(chain, X, h0=2 * b0(X))[2]) and no_hooks(b0)
    with edit_output(b1, lambda h: h + 1):  # a tuple: only its first element is replaced
        h, extra = b1(X)
    assert torch.equal(h, b1.lin(X) + 1) and extra == "extra" and no_hooks(b1)


def test_skip_blocks_hands_the_given_hidden_state_on_and_restores_the_blocks(chain):
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    with skip_blocks(list(chain.blocks[:2]), z):
        assert torch.equal(chain(X), chain.blocks[2](z))
        assert torch.equal(chain(5 * X), chain.blocks[2](z))  # the input no longer matters
    assert no_hooks(*chain.blocks)
    assert torch.equal(chain(X), by_hand(chain, X)[2])


@pytest.mark.parametrize("context", ["capture_inputs", "capture_outputs", "edit_output", "skip_blocks"])
def test_nothing_outlives_a_failing_block(chain, context):
    b0, b1, b2 = chain.blocks
    contexts = {"capture_inputs": lambda: capture_inputs([b0, b1, b2], stop_after=b2),
                "capture_outputs": lambda: capture_outputs([b0, b1, b2]),
                "edit_output": lambda: edit_output(b1, lambda h: h),
                "skip_blocks": lambda: skip_blocks([b0, b1], X)}
    with pytest.raises(RuntimeError, match="inside"):
        with contexts[context]():
            chain(X) if context != "capture_inputs" else run_until(chain, x=X)
            raise RuntimeError("inside")
    assert no_hooks(*chain.blocks)
    assert torch.equal(chain(X), by_hand(chain, X)[2])
