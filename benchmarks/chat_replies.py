"""Why an edit rarely shows in chat replies: does it not reach the subject there, or does the reply not use it?

The locality study found MEMIT's edit named in 83 % of greedy continuations of the rewrite prompt but in
only 27 % of the replies when the same prompt is the user's turn of the model's chat template. Two
explanations predict different things, and this script measures both on the same facts and targets:

* **the write does not reach the subject in the chat form** (the targets and keys were only ever computed
  in the completion form behind sampled text prefixes). Measured by the *share of δ that arrives*: with
  δ = z − h (the target minus the unedited top-layer state at the subject's last token of the bare
  prompt), (h_edited − h_unedited) · δ / ‖δ‖² at the subject's last token, in the completion form and in the
  chat form. Equal shares refute this explanation.
* **the reply does not read it**: with the target's δ added to the top edited layer's state at the
  subject's last token in the unedited model (a perfect write of that one state), how many chat replies
  name the new object, against how many completions do. If forcing z moves completions but not chat replies, the chat form does not read the
  subject's state the way the completion does, whatever the update writes.

And what the edited model's chat replies say instead, counted: the new object (as a whole word), a
derived form of it (a word sharing its first letters: "Roman" for "Rome", "Italian" for "Italy"; this also
catches fragments such as "Elie" for "Eliel Saarinen"), the unedited model's reply unchanged, or something
else; and how many replies restate the subject intact (the unedited model's chat replies begin by
repeating the question), with and without naming the new object. Replies are cut at the evaluation's budget (the
question's tokens + the target's + 8) and, to see whether the answer comes later, at 48 tokens.

    python benchmarks/chat_replies.py --facts 100 --json benchmarks/results/chat_replies_cpu.json

The facts are the locality study's (the first 100 zsRE records; ``--heldout-after N`` takes held-out ones);
statistics and targets come from the benchmarks' caches (``covedit build-stats`` first).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks  # noqa: E402, F401  (runs this checkout as the package covedit: see benchmarks/__init__.py)

from benchmarks.common import TargetCache, add_slice_arguments, covariances, fact_slice  # noqa: E402
from covedit.pipeline.edit import templates_for  # noqa: E402
from covedit.pipeline.evaluate import generation_jobs, greedy_continuations, says  # noqa: E402
from covedit.pipeline.hooks import capture_outputs, edit_output  # noqa: E402
from covedit.pipeline.hparams import load_hparams  # noqa: E402
from covedit.pipeline.memit import run_memit  # noqa: E402
from covedit.pipeline.models import load_model  # noqa: E402

LONG_REPLY = 48  # tokens: does the answer come after the evaluation's budget?


class Form:
    """One way of asking a fact: its token ids and the index of the subject's last token in them."""

    def __init__(self, ids: list[int], subject_last: int):
        self.ids, self.subject_last = ids, subject_last


def subject_last_token(tok, text: str, subject_end: int, add_special_tokens: bool) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the token holding character ``subject_end - 1``."""
    enc = tok(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    for i, (start, end) in enumerate(enc.offset_mapping):
        if start <= subject_end - 1 < end:
            return list(enc.input_ids), i
    raise ValueError(f"no token ends the subject in {text!r}")


def forms(tok, fact) -> tuple[Form, Form]:
    """The completion form (the bare rewrite prompt, as the evaluation generates from it) and the chat form
    (the same prompt as the user's turn of the chat template, as the evaluation's chat measure asks it)."""
    prompt = fact.rewrite_prompt()
    at = prompt.index(fact.subject) + len(fact.subject)
    completion = Form(*subject_last_token(tok, prompt, at, add_special_tokens=True))
    chat_text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                        add_generation_prompt=True)
    offset = chat_text.index(prompt)
    chat = Form(*subject_last_token(tok, chat_text, offset + at, add_special_tokens=False))
    return completion, chat


@torch.no_grad()
def states_at_subject(loaded, layer: int, items: list[Form]) -> torch.Tensor:
    """Block ``layer``'s output at each form's subject's last token, (n, d_model)."""
    out = []
    for form in items:
        with capture_outputs([loaded.block(layer)]) as seen:
            loaded.model(input_ids=torch.tensor([form.ids], device=loaded.device))
        out.append(seen[0][0, form.subject_last].float().cpu())
    return torch.stack(out)


@torch.no_grad()
def replies(loaded, items: list[Form], budgets: list[int], layer: int | None = None,
            delta: torch.Tensor | None = None, batch_size: int = 16) -> list[str]:
    """Greedy continuations of the forms; with ``delta``, its row is added to block ``layer``'s output at each
    subject's last token on the prompt's forward (the generated tokens come after it and are left alone).
    Adding δ = z − h, not setting the state to z, keeps what the form's own context put there: in the bare
    prompt the two are the same (its state is h), in the chat form setting z would also erase the chat
    context's part of the state."""
    texts: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk, chunk_budgets = items[start:start + batch_size], budgets[start:start + batch_size]
        if delta is None:
            texts += greedy_continuations(loaded, [f.ids for f in chunk], chunk_budgets, batch_size=len(chunk))
            continue
        width = max(len(f.ids) for f in chunk)  # greedy_continuations pads on the left to the longest
        rows = torch.arange(len(chunk))
        cols = torch.tensor([width - len(f.ids) + f.subject_last for f in chunk])
        values = delta[start:start + len(chunk)]

        def force(h: torch.Tensor) -> torch.Tensor:
            if h.shape[1] != width:  # a decoding step: nothing of the prompt is in it
                return h
            h = h.clone()
            h[rows, cols] += values.to(h.dtype).to(h.device)
            return h

        with edit_output(loaded.block(layer), force):
            texts += greedy_continuations(loaded, [f.ids for f in chunk], chunk_budgets, batch_size=len(chunk))
    return texts


def derived(text: str, target: str, already: str) -> bool:
    """A word of ``text`` sharing the first letters of one of the target's words (at least 3, and all but one
    of a short word's, at most 5 of a long one's): "Roman" for "Rome", "Elie" for "Eliel". Words that are in
    ``already`` (the question and the unedited reply) do not count, nor do the target's numbers. Not the
    target itself (count that first)."""
    seen = {w.casefold().strip(".,()\"'?!:;") for w in already.replace("-", " ").split()}
    words = [w for w in (w.casefold().strip(".,()\"'?!:;") for w in text.replace("-", " ").split()) if w not in seen]
    for part in target.split():
        part = part.casefold().strip(".,()")
        if len(part) < 4 or any(c.isdigit() for c in part):
            continue
        n = min(len(part) - 1, 5)
        if any(w.startswith(part[:n]) for w in words):
            return True
    return False


def classify(edited: list[str], unedited: list[str], facts: list) -> dict:
    """Counts of what the edited replies say: new, unchanged (the unedited reply), derived, other."""
    counts = {"new": 0, "unchanged": 0, "derived": 0, "other": 0}
    for e, u, f in zip(edited, unedited, facts, strict=True):
        if says(e, f.target_new):
            counts["new"] += 1
        elif e.strip() == u.strip():
            counts["unchanged"] += 1
        elif derived(e, f.target_new, f.rewrite_prompt() + " " + u):
            counts["derived"] += 1
        else:
            counts["other"] += 1
    return counts


def named(texts: list[str], facts: list) -> float:
    return 100.0 * sum(says(t, f.target_new) for t, f in zip(texts, facts)) / len(facts)


def subject_restated(texts: list[str], facts: list) -> dict:
    """How many replies repeat the subject intact (chat replies restate the question), and how many name the
    new object with and without it."""
    intact = [says(t, f.subject) for t, f in zip(texts, facts)]
    new = [says(t, f.target_new) for t, f in zip(texts, facts)]
    return {"subject_intact": sum(intact), "new_with_subject": sum(i and n for i, n in zip(intact, new)),
            "new_without_subject": sum(n and not i for i, n in zip(intact, new))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_slice_arguments(ap, facts=100)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    loaded = load_model(args.model)
    tok = loaded.tokenizer
    if not getattr(tok, "chat_template", None):
        raise SystemExit(f"{loaded.model_id} has no chat template: nothing to compare")
    hp = load_hparams("memit", loaded.model.config.model_type, loaded.num_layers, None, [])
    templates = templates_for(loaded, hp)
    facts = fact_slice(args.data, args.facts, args.heldout_after)
    top = hp.layers[-1]
    targets = TargetCache(loaded, top, hp.target, templates).get(facts)
    covs = covariances(loaded, hp.layers)
    completions, chats = zip(*(forms(tok, f) for f in facts))
    completions, chats = list(completions), list(chats)
    # The subject's last token must be the same token in both forms (found by character offsets in each).
    same = sum(c.ids[c.subject_last] == h.ids[h.subject_last] for c, h in zip(completions, chats))
    if same != len(facts):
        print(f"warning: the subject's last token differs between the forms for {len(facts) - same} facts")
    # The evaluation's own budgets (its generation family), so the counts here are the reports' counts.
    budget = {(i, kind): b for _, b, i, kind in generation_jobs(loaded, facts) if kind in ("rewrite", "chat")}
    completion_budget = [budget[i, "rewrite"] for i in range(len(facts))]
    chat_budget = [budget[i, "chat"] for i in range(len(facts))]
    long_budget = [LONG_REPLY] * len(facts)

    result: dict = {"model": loaded.model_id, "facts": len(facts), "subjects": len({f.subject for f in facts}),
                    "layer": top, "lam": hp.lam, "subject_token_same_in_both_forms": same}
    h_completion = states_at_subject(loaded, top, completions)
    h_chat = states_at_subject(loaded, top, chats)
    # The completion form is the targets' own bare prompt: its state must be the one they started from.
    result["completion_state_vs_targets_h_max_rel"] = float(((h_completion - targets.h).norm(dim=-1)
                                                              / targets.h.norm(dim=-1)).max())
    text = {
        "unedited_completion": replies(loaded, completions, completion_budget),
        "unedited_chat": replies(loaded, chats, chat_budget),
        "unedited_chat_long": replies(loaded, chats, long_budget),
        "forced_z_completion": replies(loaded, completions, completion_budget, top, targets.delta),
        "forced_z_chat": replies(loaded, chats, chat_budget, top, targets.delta),
        "forced_z_chat_long": replies(loaded, chats, long_budget, top, targets.delta),
    }
    print({k: round(named(v, facts), 1) for k, v in text.items()}, flush=True)

    out = run_memit(loaded, facts, hp.layers, covs, hp.lam, hp.target, templates, lambda: 0.0, targets=targets)
    result["realised_mean"] = sum(out.target_info["realised"]) / len(facts)
    delta = targets.z - targets.h
    norm2 = (delta * delta).sum(-1)
    for name, items, before in (("completion", completions, h_completion), ("chat", chats, h_chat)):
        moved = states_at_subject(loaded, top, items) - before
        share = ((moved * delta).sum(-1) / norm2).tolist()
        result[f"share_of_delta_{name}"] = {"mean": sum(share) / len(share), "per_fact": share}
    text["edited_completion"] = replies(loaded, completions, completion_budget)
    text["edited_chat"] = replies(loaded, chats, chat_budget)
    text["edited_chat_long"] = replies(loaded, chats, long_budget)

    result["names_new_pct"] = {k: named(v, facts) for k, v in text.items()}
    result["edited_chat_replies"] = classify(text["edited_chat"], text["unedited_chat"], facts)
    result["edited_chat_replies_long"] = classify(text["edited_chat_long"], text["unedited_chat_long"], facts)
    result["subject_restated"] = {k: subject_restated(v, facts) for k, v in text.items() if "chat" in k}
    result["texts"] = [{"subject": f.subject, "prompt": f.rewrite_prompt(), "target_new": f.target_new,
                        **{k: v[i] for k, v in text.items()}} for i, f in enumerate(facts)]
    print("realised", round(result["realised_mean"], 3),
          "share of δ at the subject: completion", round(result["share_of_delta_completion"]["mean"], 3),
          "chat", round(result["share_of_delta_chat"]["mean"], 3))
    print("names the new object (%):", {k: round(v, 1) for k, v in result["names_new_pct"].items()})
    print("edited chat replies:", result["edited_chat_replies"], "long:", result["edited_chat_replies_long"])
    print("chat replies restating the subject intact:", result["subject_restated"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
