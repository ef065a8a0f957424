"""The cost of MEMIT's solve (everything after the targets) against recomputing from scratch at every layer, on
the same facts and targets, side by side in one process.

(a) covedit's ``run_memit`` on cached targets: each layer's keys from a KeyWalk (resumed from the hidden state
    that entered the previous edited block: the blocks below it cannot have changed), the residual z − h
    from a forward that stops at the top edited block, and the realised share (one more such forward);
(b) from scratch at every layer: the keys from the embeddings up to the layer (covedit's code before the
    KeyWalk, with its current batching by length), and h from a forward through the whole model and its
    output head at every position (as kmeng01/memit reads it, through a trace of the model's forward; covedit
    before read the head at one position). No realised share.

Both write the same update; the benchmark checks it (relative difference of each layer's ΔW) and restores
the original weights between the two. The work each does, in block passes over the key rows (n facts ×
templates) and over the n bare prompts, is printed beside the times: it is what (a) saves, and what is left.

    python benchmarks/bench_solve.py --facts 1000 --json benchmarks/results/bench_solve1000_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import TargetCache, add_slice_arguments, covariances, fact_slice, keep_weights  # noqa: E402
from covedit.pipeline.edit import apply_update, key_weights_for, templates_for  # noqa: E402
from covedit.pipeline.hooks import capture_outputs  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.keys import compute_keys, encode_with_subject  # noqa: E402
from covedit.pipeline.memit import memit_solve, run_memit  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402


@torch.no_grad()
def whole_forward_h(loaded, facts: list, top: int, batch_rows: int = 64) -> torch.Tensor:
    """h: block ``top``'s output at each bare prompt's subject, read from a forward through the whole model."""
    out = []
    for lo in range(0, len(facts), batch_rows):
        chunk = facts[lo:lo + batch_rows]
        enc = encode_with_subject(loaded.tokenizer, [f.prompt for f in chunk], [f.subject for f in chunk],
                                  "left").to(loaded.device)
        with capture_outputs([loaded.block(top)]) as seen:
            loaded.model(**enc.model_inputs())
        at = seen[0].device
        out.append(seen[0][torch.arange(len(chunk), device=at), enc.subject_last.to(at)].float().cpu())
    return torch.cat(out)


def from_scratch_solve(loaded, facts: list, layers: list[int], covs: dict, lam: float, templates: list[str],
                    weights: list[float], z: torch.Tensor) -> dict:
    """MEMIT's layer loop with the keys and h recomputed from scratch at every layer (see the module docstring)."""
    if loaded.post_mlp_norm(layers[0]) is not None:
        raise SystemExit("the from-scratch solve here is written for blocks without a post-MLP norm")
    factors = {}
    for i, layer in enumerate(layers):
        K = compute_keys(loaded, [layer], [f.prompt for f in facts], [f.subject for f in facts], templates,
                         weights=weights)[layer].double().T
        R = ((z.double() - whole_forward_h(loaded, facts, layers[-1]).double()) / (len(layers) - i)).T
        factors[layer] = apply_update(loaded, layer, *memit_solve(K, R, covs[layer], lam))
    return factors


def block_passes(layers: list[int], num_layers: int) -> dict:
    """Blocks each strategy runs over the key rows and over the bare prompts (per row, summed over layers)."""
    keys_ref = sum(layer + 1 for layer in layers)
    keys_walk = layers[0] + 1 + sum(b - a + 1 for a, b in zip(layers, layers[1:]))
    return {"key_rows": {"covedit": keys_walk, "reference": keys_ref},
            "bare_prompts": {"covedit": (len(layers) + 1) * (layers[-1] + 1),  # + 1: the realised share
                             "reference": len(layers) * num_layers}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_slice_arguments(ap, facts=1000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    loaded = load_model(args.model)
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers)
    templates, weights = templates_for(loaded, hp), key_weights_for(loaded, hp)
    facts = fact_slice(args.data, args.facts, args.heldout_after)
    targets = TargetCache(loaded, hp.layers[-1], hp.target, templates).get(facts)
    covs = covariances(loaded, hp.layers)
    restore = keep_weights(loaded, hp.layers)
    t0 = time.perf_counter()
    ours = run_memit(loaded, facts, hp.layers, covs, hp.lam, hp.target, templates, time.perf_counter,
                     targets=targets, key_weights=weights).factors
    t_ours = time.perf_counter() - t0
    restore()
    t0 = time.perf_counter()
    ref = from_scratch_solve(loaded, facts, hp.layers, covs, hp.lam, templates, weights, targets.z)
    t_ref = time.perf_counter() - t0
    restore()
    gaps = {}
    for layer in hp.layers:
        a, b = (f[0].double() @ f[1].double() for f in (ours[layer], ref[layer]))
        gaps[layer] = float((a - b).norm() / b.norm())
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "model": loaded.model_id, "layers": hp.layers, "facts": len(facts), "heldout_after": args.heldout_after,
              "templates": len(templates), "covedit_s": t_ours, "reference_s": t_ref, "speedup": t_ref / t_ours,
              "covedit_s_includes": "the realised share (one more forward over the bare prompts)",
              "block_passes_per_row": block_passes(hp.layers, loaded.num_layers),
              "delta_w_relative_difference": gaps}
    print(f"MEMIT's solve, {len(facts)} facts, layers {hp.layers}: covedit {t_ours:.1f} s, from scratch at every layer "
          f"{t_ref:.1f} s ({t_ref / t_ours:.2f}x); ΔW relative difference ≤ {max(gaps.values()):.2g}")
    print(f"block passes per row: {result['block_passes_per_row']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
