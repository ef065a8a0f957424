"""Forward hooks: read a module's input or output, change a module's output, stop the forward early.

Everything here is a context manager that removes its hooks on exit, so a failed step never leaves a
model with a stray hook attached.

    with capture_inputs([mlp4, mlp8]) as seen:
        run_until(model, mlp8, input_ids=ids)   # the blocks above layer 8 never run
    keys4, keys8 = seen
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a hook to end the forward pass once everything needed has been seen."""


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def capture_inputs(modules: Sequence[nn.Module], stop_after: nn.Module | None = None) -> Iterator[list]:
    """Record the first positional input of each module (in order) on every forward.

    With ``stop_after``, raise StopForward as soon as that module's input has been recorded: the module
    itself and everything after it do not run. ``run_until`` catches it.
    """
    seen: list = [None] * len(modules)
    handles = []

    def make(i: int, module: nn.Module):
        def hook(_mod, args):
            seen[i] = args[0]
            if module is stop_after:
                raise StopForward
        return hook

    try:
        for i, m in enumerate(modules):
            handles.append(m.register_forward_pre_hook(make(i, m)))
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_outputs(modules: Sequence[nn.Module], stop: bool = False) -> Iterator[list]:
    """Record the output (first element if a tuple) of each module on every forward.

    With ``stop``, raise StopForward as soon as every module has recorded an output since the context
    was entered: nothing after the last of them runs (``run_until`` catches it). Meant for one forward
    per context, whatever order the modules run in (a block and a module inside it, say).
    """
    seen: list = [None] * len(modules)
    handles = []

    def make(i: int):
        def hook(_mod, _args, out):
            seen[i] = _first(out)
            if stop and all(s is not None for s in seen):
                raise StopForward
        return hook

    try:
        for i, m in enumerate(modules):
            handles.append(m.register_forward_hook(make(i)))
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's output h (the first element, if it returns a tuple) by ``fn(h)``."""

    def hook(_mod, _args, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def skip_blocks(blocks: Sequence[nn.Module], output: torch.Tensor) -> Iterator[None]:
    """Run none of ``blocks`` (consecutive transformer blocks from the first): each passes its input
    through unchanged and the last returns ``output`` instead, so the forward starts above them from a
    hidden state computed elsewhere. Blocks are called as ``block(hidden_states, ...)`` and return the new
    hidden state (transformers 5); target optimisation checks the result against a full forward."""

    def passthrough(hidden_states, *_args, **_kwargs):
        return hidden_states

    def replaced(*_args, **_kwargs):
        return output

    # A forward set on the instance already (accelerate's device-placement wrapper under a device map) is
    # put back afterwards, not dropped.
    own = {id(b): b.__dict__["forward"] for b in blocks if "forward" in b.__dict__}
    try:
        for b in blocks[:-1]:
            b.forward = passthrough
        if blocks:
            blocks[-1].forward = replaced
        yield
    finally:
        for b in blocks:
            if id(b) in own:
                b.forward = own[id(b)]
            else:
                b.__dict__.pop("forward", None)


def run_until(model: nn.Module, **inputs) -> object | None:
    """Run ``model(**inputs)``; return its output, or None if a hook stopped it early."""
    try:
        return model(**inputs)
    except StopForward:
        return None
