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

    python benchmarks/diagnose_writes.py --facts 100 --heldout-after 1000 \\
        --json benchmarks/results/diagnose_writes100_cpu.json
    python benchmarks/diagnose_writes.py --facts 1000 --sites --json benchmarks/results/diagnose_sites1000_tuning_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import DEFAULT_DATA, TargetCache, covariances, delta_at  # noqa: E402
from benchmarks.common import fact_slice  # noqa: E402
from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.memit import run_memit  # noqa: E402
from covedit.pipeline.errors import DataError  # noqa: E402
from covedit.pipeline.hooks import edit_output  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.keys import _fill as fill_subject  # noqa: E402  (the subject's span as the keys find it)
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
    text, start, end = fill_subject(template, subject)
    offsets = loaded.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    subj = [a < b and a < end and b > start for a, b in offsets][: len(prompt)]
    subj += [False] * (len(prompt) - len(subj))
    n_answer = len(ids) - 1
    in_subject = subj + [False] * n_answer
    in_answer = [False] * len(prompt) + [True] * n_answer
    last = int(enc.subject_last[0])
    sites = {"everywhere": [True] * len(in_subject), "subject tokens": in_subject,
             "subject's last token": [i == last for i in range(len(in_subject))],
             "prompt's other tokens": [not s and not a for s, a in zip(in_subject, in_answer)],
             "answer tokens": in_answer, "all but the subject": [not s for s in in_subject]}
    return Forced(torch.tensor([prompt + ids[:-1]], device=loaded.device), len(prompt), ids, last, sites)


@torch.no_grad()
def accuracy(loaded, f: Forced) -> float:
    """Share of the target's tokens that are the top-1 prediction, with whatever hooks are active."""
    logits = loaded.model(input_ids=f.inputs).logits[0]
    predicted = logits[f.prompt_len - 1: f.prompt_len - 1 + len(f.ids)].argmax(-1).tolist()
    return sum(int(p == t) for p, t in zip(predicted, f.ids)) / len(f.ids)


def token_accuracy(loaded, layer: int, template: str, subject: str, target: str, z: torch.Tensor | None) -> float:
    """Share of target tokens that are the top-1 prediction, teacher-forced, with block ``layer``'s output
    at the subject's last token set to z (None: left alone)."""
    f = forced(loaded, template, subject, target)
    if z is None:
        return accuracy(loaded, f)

    def force(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[0, f.subject_last] = z.to(out.dtype)
        return out

    with edit_output(loaded.block(layer), force):
        return accuracy(loaded, f)


def paraphrase_template(fact) -> str | None:
    """The fact's first paraphrase with its subject as ``{}``, or None if the subject is not in it."""
    if not fact.paraphrases or fact.subject not in fact.paraphrases[0]:
        return None
    return fact.paraphrases[0].replace(fact.subject, "{}", 1)


def measure(loaded, layer, facts, z) -> dict:
    out = {}
    for name, use_z in (("", False), ("+z", True)):
        rewrite, para = [], []
        for i, f in enumerate(facts):
            zi = z[i] if use_z else None
            rewrite.append(token_accuracy(loaded, layer, f.prompt, f.subject, f.target_new, zi))
            template = paraphrase_template(f)
            if template is not None:
                try:
                    para.append(token_accuracy(loaded, layer, template, f.subject, f.target_new, zi))
                except DataError:
                    pass
        out[f"efficacy{name}"] = 100.0 * sum(rewrite) / len(rewrite)
        out[f"paraphrase{name}"] = 100.0 * sum(para) / max(1, len(para))
        out[f"n_paraphrases{name}"] = len(para)
    return out


def measure_sites(loaded, facts, factors: dict) -> dict:
    """Efficacy and paraphrase with the edit applied only at each site (weights must be the original ones)."""
    scores = {site: {"rewrite": [], "para": []} for site in SITES}
    for f in facts:
        prompts = [("rewrite", f.prompt)]
        template = paraphrase_template(f)
        if template is not None:
            prompts.append(("para", template))
        for kind, t in prompts:
            try:
                one = forced(loaded, t, f.subject, f.target_new)
            except DataError:
                if kind == "rewrite":  # as measure(): a rewrite prompt always scores
                    raise
                continue
            for site in SITES:
                mask = torch.tensor([one.sites[site]], device=loaded.device)
                with delta_at(loaded, factors, mask):
                    scores[site][kind].append(accuracy(loaded, one))
    return {site: {"efficacy": 100.0 * sum(v["rewrite"]) / len(v["rewrite"]),
                   "paraphrase": 100.0 * sum(v["para"]) / max(1, len(v["para"])), "n_paraphrases": len(v["para"])}
            for site, v in scores.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--heldout-after", type=int, default=0)
    ap.add_argument("--lam", type=float)
    ap.add_argument("--mu", type=float, default=0.0, help="preserve_prompts")
    ap.add_argument("--sites", action="store_true", help="also split the edit by the positions it acts at")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    loaded = load_model(args.model)
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, [])
    lam = hp.lam if args.lam is None else args.lam
    templates = templates_for(loaded, hp)
    facts = fact_slice(args.data, args.facts, args.heldout_after)
    top = hp.layers[-1]
    targets = TargetCache(loaded, top, hp.target, templates).get(facts)
    covs = covariances(loaded, hp.layers)
    result = {"model": loaded.model_id, "facts": len(facts), "subjects": len({f.subject for f in facts}),
              "heldout_after": args.heldout_after, "lam": lam,
              "mu": args.mu, "layer": top, "unedited": measure(loaded, top, facts, targets.z)}
    print("unedited", result["unedited"], flush=True)
    originals = {layer: loaded.down_weight(layer).detach().clone() for layer in hp.layers}
    out = run_memit(loaded, facts, hp.layers, covs, lam, hp.target, templates, lambda: 0.0, targets=targets,
                    preserve_prompts=args.mu)
    result["edited"] = measure(loaded, top, facts, targets.z)
    result["realised_mean"] = sum(out.target_info["realised"]) / len(facts)
    print("edited", result["edited"], "realised", round(result["realised_mean"], 3), flush=True)
    if args.sites:
        with torch.no_grad():
            for layer, W in originals.items():
                loaded.down_weight(layer).copy_(W)
        result["sites"] = measure_sites(loaded, facts, out.factors)
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
