"""Where an edit loses its facts: the targets, writing them at the subject, or what the update does elsewhere.

For each fact, teacher-forced top-1 token accuracy of target_new after its rewrite prompt and its
paraphrase, in four models:

* unedited;
* unedited + z: the unedited model with only the top edited layer's output at the subject's last token set
  to the target z (what a perfect write of the target alone would give);
* edited (MEMIT with the given λ and μ, the same cached targets);
* edited + z: the edited model with that one state forced to z as well.

Reading it: "unedited + z" bounds what the targets can do. If "edited + z" is close to it, the update's
effects on the other tokens and layers do not hurt, and what the edit lacks is the write at the subject
(the realised share); if "edited + z" falls below "unedited + z", the update damages the prompt elsewhere
(the collateral on other tokens that issue 14 suspected).

With ``--sites`` it also splits the edit by where it acts: the model keeps its original weights and a hook
adds ΔW k_t to each edited layer's down-projection output only at chosen positions t of the teacher-forced
prompt (benchmarks.common.delta_at): every position (the edited model up to rounding; reported), the subject's
tokens, the subject's last token alone, the prompt's other tokens (question words, "?"), the teacher-forced
answer tokens, and everything but the subject. If "subject tokens" keeps what "unedited + z" promises while
"everything but the subject" costs the points, the collateral is the update answering ordinary tokens' keys.

With ``--sizes`` it measures how large the update's output ΔW k is at each of those sites and on ordinary
questions (the facts' neighbourhood prompts), per layer, against the layer's own output W k: if the answer
tokens get a much larger ΔW k than the question's tokens or ordinary text, their keys lie near the edited
subjects' (the entity-key reading of the answer tokens' harm); if not, the harm is not the update's size there.
Given alone, ``--sizes`` skips the accuracy scores (four scoring passes: about 20 minutes at 1,000 facts).

    python benchmarks/diagnose_writes.py --facts 100 --heldout-after 1000 \\
        --json benchmarks/results/diagnose_writes100_cpu.json
    python benchmarks/diagnose_writes.py --facts 1000 --sites --json benchmarks/results/diagnose_sites1000_tuning_cpu.json
    python benchmarks/diagnose_writes.py --facts 1000 --sizes --json benchmarks/results/diagnose_sizes1000_tuning_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import DEFAULT_DATA, TargetCache, covariances, delta_at, delta_hooks  # noqa: E402
from benchmarks.common import add_override_argument, fact_slice, keep_weights  # noqa: E402
from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.memit import run_memit  # noqa: E402
from covedit.pipeline.errors import DataError  # noqa: E402
from covedit.pipeline.hooks import edit_output  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.keys import encode_with_subject, target_token_ids  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402


SITES = ("everywhere", "subject tokens", "subject's last token", "prompt's other tokens", "answer tokens",
         "all but the subject")


@dataclasses.dataclass
class Forced:
    """One teacher-forced prompt: the input (prompt + target[:-1]), where the target's tokens are predicted,
    the subject's last position and, per site, which positions an edit applied only there touches."""

    inputs: torch.Tensor
    prompt_len: int
    ids: list[int]
    subject_last: int
    sites: dict[str, list[bool]]


def forced(loaded, template: str, subject: str, target: str) -> Forced:
    enc = encode_with_subject(loaded.tokenizer, [template], [subject])
    prompt = enc.input_ids[0, : int(enc.last[0]) + 1].tolist()
    ids = target_token_ids(loaded.tokenizer, target)
    first, last = int(enc.subject_first[0]), int(enc.subject_last[0])
    n_prompt, n = len(prompt), len(prompt) + len(ids) - 1
    in_subject = [first <= i <= last for i in range(n)]
    in_answer = [i >= n_prompt for i in range(n)]
    sites = {"everywhere": [True] * n, "subject tokens": in_subject,
             "subject's last token": [i == last for i in range(n)],
             "prompt's other tokens": [not s and not a for s, a in zip(in_subject, in_answer)],
             "answer tokens": in_answer, "all but the subject": [not s for s in in_subject]}
    return Forced(torch.tensor([prompt + ids[:-1]], device=loaded.device), n_prompt, ids, last, sites)


@torch.no_grad()
def accuracy(loaded, f: Forced) -> float:
    """Share of the target's tokens that are the top-1 prediction, with whatever hooks are active."""
    logits = loaded.model(input_ids=f.inputs).logits[0]
    predicted = logits[f.prompt_len - 1: f.prompt_len - 1 + len(f.ids)].argmax(-1).tolist()
    return sum(int(p == t) for p, t in zip(predicted, f.ids)) / len(f.ids)


def force_z(loaded, layer: int, f: Forced, z: torch.Tensor):
    """Block ``layer``'s output at the subject's last token set to z, while the context is open."""
    def force(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[0, f.subject_last] = z.to(out.dtype)
        return out

    return edit_output(loaded.block(layer), force)


def paraphrase_template(fact) -> str | None:
    """The fact's first paraphrase with its subject as ``{}``, or None if the subject is not in it."""
    if not fact.paraphrases or fact.subject not in fact.paraphrases[0]:
        return None
    return fact.paraphrases[0].replace(fact.subject, "{}", 1)


def teacher_forced(loaded, facts) -> list[tuple[Forced, Forced | None]]:
    """Per fact, its rewrite prompt and its first paraphrase (None when the subject is not found in it), each
    tokenised once for every condition scored on it."""
    out = []
    for f in facts:
        para = None
        template = paraphrase_template(f)
        if template is not None:
            try:
                para = forced(loaded, template, f.subject, f.target_new)
            except DataError:
                pass
        out.append((forced(loaded, f.prompt, f.subject, f.target_new), para))
    return out


def score(loaded, prompts: list, condition) -> dict:
    """Efficacy and paraphrase (%) with the context ``condition(i, forced)`` open around each fact's forwards."""
    rewrite, para = [], []
    for i, (r, p) in enumerate(prompts):
        with condition(i, r):
            rewrite.append(accuracy(loaded, r))
        if p is not None:
            with condition(i, p):
                para.append(accuracy(loaded, p))
    return {"efficacy": 100.0 * sum(rewrite) / len(rewrite), "paraphrase": 100.0 * sum(para) / max(1, len(para)),
            "n_paraphrases": len(para)}


def measure(loaded, layer: int, prompts: list, z: torch.Tensor) -> dict:
    """The model as it is, and with each fact's target z forced at the subject ("+z" keys)."""
    plain = score(loaded, prompts, lambda i, f: contextlib.nullcontext())
    with_z = score(loaded, prompts, lambda i, f: force_z(loaded, layer, f, z[i]))
    return {**plain, **{f"{k}+z": v for k, v in with_z.items()}}


def measure_sites(loaded, prompts: list, factors: dict) -> dict:
    """Efficacy and paraphrase with the edit applied only at each site (weights must be the original ones)."""
    return {site: score(loaded, prompts, lambda i, f, site=site: delta_at(
                loaded, factors, torch.tensor([f.sites[site]], device=loaded.device)))
            for site in SITES}


@torch.no_grad()
def update_sizes(loaded, prompts: list, factors: dict, neighbourhood: list[str]) -> dict:
    """How large the update's output ΔW k is at each site, per edited layer, against the layer's own W k:
    mean ‖ΔW k‖ and mean ‖ΔW k‖ / ‖W k‖ over the positions of each site of the rewrite prompts, and over
    every position of the facts' neighbourhood prompts (ordinary questions: what the update does to text
    it was not given). Keys are the unedited model's (weights must be the original ones), so this is the
    update's first-order reach, before one layer's change moves the next layer's keys. The first position
    of every input is left out: with no BOS it is an ordinary token whose activations are the model's
    outliers (the attention sink), and it would dominate the means. Medians are recorded beside the means."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (‖ΔW k‖, ‖W k‖) per position

    def record(layer, delta, out):
        seen[layer] = delta[0].norm(dim=-1), out[0].double().norm(dim=-1)

    values: dict = {}  # layer -> where -> ([‖ΔW k‖], [‖ΔW k‖ / ‖W k‖])

    def add(where: str, mask: list[bool]) -> None:
        at = torch.tensor(mask)
        at[0] = False
        for layer, (delta, own) in seen.items():
            sizes, ratios = values.setdefault(layer, {}).setdefault(where, ([], []))
            sizes.append(delta[at].cpu())
            ratios.append((delta[at] / own[at].clamp(min=1e-12)).cpu())

    with delta_hooks(loaded, factors, record):
        for rewrite, _ in prompts:
            loaded.model(input_ids=rewrite.inputs)
            for site in SITES[1:-1]:  # the three sites that partition the input, and the subject's last token
                add(site, rewrite.sites[site])
        for text in neighbourhood:
            ids = loaded.tokenizer(text, return_tensors="pt").input_ids.to(loaded.device)
            loaded.model(input_ids=ids)
            add("neighbourhood prompts", [True] * ids.shape[1])

    def stats(parts: list[torch.Tensor]) -> tuple[float, float]:
        x = torch.cat(parts)
        return (float(x.mean()), float(x.median())) if len(x) else (float("nan"), float("nan"))

    out = {}
    for layer, by_site in sorted(values.items()):
        out[str(layer)] = {}
        for where, (sizes, ratios) in by_site.items():
            (d_mean, d_median), (r_mean, r_median) = stats(sizes), stats(ratios)
            out[str(layer)][where] = {"delta_norm": d_mean, "delta_norm_median": d_median, "delta_over_wk": r_mean,
                                      "delta_over_wk_median": r_median, "positions": sum(len(p) for p in sizes)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--heldout-after", type=int, default=0)
    ap.add_argument("--lam", type=float)
    ap.add_argument("--mu", type=float, default=0.0, help="preserve_prompts")
    ap.add_argument("--sites", action="store_true", help="also split the edit by the positions it acts at")
    ap.add_argument("--sizes", action="store_true",
                    help="measure how large ΔW k is at each site and on the neighbourhood prompts (alone, without "
                         "the accuracy scores)")
    add_override_argument(ap)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    loaded = load_model(args.model)
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, args.overrides)
    lam = hp.lam if args.lam is None else args.lam
    templates = templates_for(loaded, hp)
    facts = fact_slice(args.data, args.facts, args.heldout_after)
    top = hp.layers[-1]
    targets = TargetCache(loaded, top, hp.target, templates).get(facts)
    covs = covariances(loaded, hp.layers)
    result = {"model": loaded.model_id, "facts": len(facts), "subjects": len({f.subject for f in facts}),
              "heldout_after": args.heldout_after, "lam": lam,
              "mu": args.mu, "layer": top, "overrides": args.overrides}
    prompts = teacher_forced(loaded, facts)
    scores = not args.sizes or args.sites  # --sizes alone measures the update's size only
    if scores:
        result["unedited"] = measure(loaded, top, prompts, targets.z)
        print("unedited", result["unedited"], flush=True)
    restore = keep_weights(loaded, hp.layers)
    out = run_memit(loaded, facts, hp.layers, covs, lam, hp.target, templates, lambda: 0.0, targets=targets,
                    preserve_prompts=args.mu)
    result["realised_mean"] = sum(out.target_info["realised"]) / len(facts)
    if scores:
        result["edited"] = measure(loaded, top, prompts, targets.z)
        print("edited", result["edited"], flush=True)
    print("realised", round(result["realised_mean"], 3), flush=True)
    if args.sites or args.sizes:
        restore()
    if args.sizes:
        result["sizes"] = update_sizes(loaded, prompts, out.factors,
                                       [n.prompt for f in facts for n in f.neighborhood])
        print("| layer | where | ‖ΔW k‖ mean / median | ‖ΔW k‖ / ‖W k‖ mean / median | positions |\n"
              "|---|---|---:|---:|---:|")
        for layer, by_site in result["sizes"].items():
            for where, r in by_site.items():
                print(f"| {layer} | {where} | {r['delta_norm']:.3f} / {r['delta_norm_median']:.3f} | "
                      f"{r['delta_over_wk']:.3f} / {r['delta_over_wk_median']:.3f} | {r['positions']} |", flush=True)
    if args.sites:
        result["sites"] = measure_sites(loaded, prompts, out.factors)
        # the hook adds ΔW k in float64 where the edited weights hold W + ΔW in float32: equal up to rounding
        result["everywhere_minus_edited"] = {m: result["sites"]["everywhere"][m] - result["edited"][m]
                                             for m in ("efficacy", "paraphrase")}
        print("hooked everywhere minus edited:", result["everywhere_minus_edited"], flush=True)
        print("| Δ applied at | efficacy | paraphrase |\n|---|---:|---:|")
        for site, r in result["sites"].items():
            print(f"| {site} | {r['efficacy']:.1f} | {r['paraphrase']:.1f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
