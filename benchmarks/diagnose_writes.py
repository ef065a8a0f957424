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

    python benchmarks/diagnose_writes.py --facts 100 --heldout-after 1000 \\
        --json benchmarks/results/diagnose_writes100_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import DEFAULT_DATA, TargetCache, covariances  # noqa: E402
from benchmarks.common import fact_slice  # noqa: E402
from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.memit import run_memit  # noqa: E402
from covedit.pipeline.errors import DataError  # noqa: E402
from covedit.pipeline.hooks import edit_output  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.keys import encode_with_subject, target_token_ids  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402


@torch.no_grad()
def token_accuracy(loaded, layer: int, template: str, subject: str, target: str, z: torch.Tensor | None) -> float:
    """Share of target tokens that are the top-1 prediction, teacher-forced, with block ``layer``'s output
    at the subject's last token set to z (None: left alone)."""
    enc = encode_with_subject(loaded.tokenizer, [template], [subject])
    prompt = enc.input_ids[0, : int(enc.last[0]) + 1].tolist()
    ids = target_token_ids(loaded.tokenizer, target)
    at = int(enc.subject_last[0])

    def force(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[0, at] = z.to(out.dtype)
        return out

    inputs = torch.tensor([prompt + ids[:-1]], device=loaded.device)
    if z is None:
        logits = loaded.model(input_ids=inputs).logits[0]
    else:
        with edit_output(loaded.block(layer), force):
            logits = loaded.model(input_ids=inputs).logits[0]
    predicted = logits[len(prompt) - 1: len(prompt) - 1 + len(ids)].argmax(-1).tolist()
    return sum(int(p == t) for p, t in zip(predicted, ids)) / len(ids)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--heldout-after", type=int, default=0)
    ap.add_argument("--lam", type=float)
    ap.add_argument("--mu", type=float, default=0.0, help="preserve_prompts")
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
    result = {"model": loaded.model_id, "facts": len(facts), "heldout_after": args.heldout_after, "lam": lam,
              "mu": args.mu, "layer": top, "unedited": measure(loaded, top, facts, targets.z)}
    print("unedited", result["unedited"], flush=True)
    out = run_memit(loaded, facts, hp.layers, covs, lam, hp.target, templates, lambda: 0.0, targets=targets,
                    preserve_prompts=args.mu)
    result["edited"] = measure(loaded, top, facts, targets.z)
    result["realised_mean"] = sum(out.target_info["realised"]) / len(facts)
    print("edited", result["edited"], "realised", round(result["realised_mean"], 3), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
