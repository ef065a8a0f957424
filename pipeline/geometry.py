"""Where concepts sit: centroids of subjects' and targets' hidden states, their cosine similarities, and how an
edit moved them (``covedit geometry``).

The study behind covedit started from the hypothesis that concepts whose representations sit close together
("semantic sinks", high centroid similarity) are where edits leak and errors route. This module measures the
geometry; ``benchmarks/semantic_sinks.py`` tests the hypothesis against measured leakage.

    concepts = concepts_of(facts)                         # subjects, then targets (new and true), each once
    cents = centroids(loaded, concepts, [4, 8, 29])       # {layer: (n_concepts, d_model) float64}
    result = build_result(concepts, facts, cents, threshold=0.9)
    write_geometry(report_dir, result)                    # geometry.json + heatmap_layer{L}.png, atomically

What a concept's centroid is (per layer: the output of that transformer block, i.e. the residual stream, at
one token of each of the concept's texts, averaged):

* **A subject**: at the subject's last token (found on characters, ``keys.encode_with_subject``, as the edit
  finds it) of each of its facts' prompts: the rewrite prompt and every paraphrase that contains the subject
  verbatim (its first occurrence; a paraphrase that does not contain it is left out and counted in
  ``prompts_skipped``). This is the residual the edit writes into at the top edited layer, so it is the
  representation an edit of that subject acts on.
* **A target** (``target_new``, and ``target_true`` where given): at the target's last token, the target put in
  as text at the end of each of ``TARGET_TEMPLATES``, short neutral lead-ins ("Let me tell you about {}").
  Why this and not the fact's prompt with the target teacher-forced after it: the state there also carries the
  prompt and its subject, which would make a fact's own subject and targets similar by construction, and the
  new and true target of one fact share all of that context. Why not the bare target: SmolLM2's tokenizer adds
  no BOS, so a one-token target would be read at position 0, the attention-sink position, whose state is
  nearly the same for every token. Neutral lead-ins give each object one representation, independent of the
  edited relation and comparable across facts, read by the same rule as a subject (its last token, where a
  model gathers what it knows about an entity: Meng et al. 2022, Geva et al. 2023). Several lead-ins average
  out the lead-in's own contribution.

Concepts are deduplicated by kind and text: a subject edited by two facts is one concept over both facts'
prompts; a target that is one fact's new object and another's true one is one concept (its texts are the same
neutral templates either way). Labels are ``"subject: Eiffel Tower"`` and ``"target: Rome"``.

Quirks:

* The last layer's centroid is the residual stream before the final norm (the block output), as for every
  other layer; Hugging Face's ``hidden_states[-1]`` has that norm applied, its other entries do not.
* Raw cosines between residual-stream vectors are high across the board (a few large shared directions, the
  anisotropy of transformer representations), so the JSON also has ``centred``: cosines after subtracting the
  mean of the layer's centroids, which show the relative geometry of this set of concepts. ``--threshold``
  flags pairs on the raw cosine, as the question was posed.
* A subject whose last token is the first token of its text (a one-token subject opening a paraphrase, with
  a tokenizer that adds no BOS) would be read at the attention-sink position: that text is left out of the
  centroid when the concept has others (``at_first_token`` counts them; see ``centroids``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from covedit.pipeline.atomic import replace_folder
from covedit.pipeline.errors import DataError, UsageError
from covedit.pipeline.hooks import capture_outputs
from covedit.pipeline.keys import encode_with_subject
from covedit.pipeline.models import LoadedModel

log = logging.getLogger(__name__)

GEOMETRY_JSON = "geometry.json"
DEFAULT_THRESHOLD = 0.9
TARGET_TEMPLATES = ("Let me tell you about {}", "Here is a word: {}", "I was just thinking of {}",
                    "The next topic is {}")
MAX_TICK_LABELS = 60  # a heatmap with more concepts than this has no tick labels (unreadable)


@dataclass
class Concept:
    """A subject or a target, and the texts its centroid is averaged over."""

    kind: str  # "subject" or "target"
    text: str
    texts: list[tuple[str, str]] = field(default_factory=list)  # (template with one "{}", what goes there)
    facts: list[str] = field(default_factory=list)  # ids of the facts it belongs to
    roles: list[str] = field(default_factory=list)  # "subject", "new", "true"
    prompts_skipped: int = 0  # paraphrases that do not contain the subject verbatim
    at_first_token: int = 0  # texts whose concept ends on the text's first token (set by ``centroids``)

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.text}"


def subject_template(text: str, subject: str) -> str | None:
    """``text`` with the first occurrence of ``subject`` (exact, else ignoring case) replaced by ``{}``; None if
    it does not occur, or if the text holds a brace of its own (it could not be a template then)."""
    if "{" in text or "}" in text or not subject.strip():
        return None
    at = text.find(subject)
    if at < 0 and len(text.lower()) == len(text) and len(subject.lower()) == len(subject):
        at = text.lower().find(subject.lower())
    if at < 0:
        return None
    return text[:at] + "{}" + text[at + len(subject):]


def concepts_of(facts: list) -> list[Concept]:
    """The subjects of ``facts`` (in fact order), then their targets (new, then true, in fact order), each once."""
    subjects: dict[str, Concept] = {}
    targets: dict[str, Concept] = {}
    for f in facts:
        subject = f.subject.strip()
        c = subjects.setdefault(subject, Concept("subject", subject))
        if f.id not in c.facts:
            c.facts.append(f.id)
            if "subject" not in c.roles:
                c.roles.append("subject")
        c.texts.append((f.prompt, f.subject))
        for p in f.paraphrases:
            template = subject_template(p, f.subject)
            if template is None:
                c.prompts_skipped += 1
            else:
                c.texts.append((template, f.subject))
        for role, target in (("new", f.target_new), ("true", f.target_true)):
            if target is None or not target.strip():
                continue
            t = targets.setdefault(target.strip(), Concept("target", target.strip(),
                                                           [(tpl, target.strip()) for tpl in TARGET_TEMPLATES]))
            if f.id not in t.facts:
                t.facts.append(f.id)
            if role not in t.roles:
                t.roles.append(role)
    for c in subjects.values():  # the same text twice (two facts, one prompt) counts once
        c.texts = list(dict.fromkeys(c.texts))
    return list(subjects.values()) + list(targets.values())


@torch.no_grad()
def states_at(loaded: LoadedModel, texts: list[tuple[str, str]], layers: list[int], batch_size: int = 64
              ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The output of each block in ``layers`` at the last token of what is put into each (template, text),
    float64 on the CPU, ``{layer: (len(texts), d_model)}``; and which of them were read at the text's first
    token (bool, (len(texts),))."""
    layers = sorted(set(layers))
    loaded.check_layers(layers)
    blocks = [loaded.block(layer) for layer in layers]
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    first = []
    for lo in range(0, len(texts), batch_size):
        chunk = texts[lo:lo + batch_size]
        enc = encode_with_subject(loaded.tokenizer, [t for t, _ in chunk], [s for _, s in chunk], "right")
        first.append(enc.subject_last == 0)  # right padding: every row starts at column 0
        enc = enc.to(loaded.device)
        with capture_outputs(blocks) as seen:
            loaded.logits(1, **enc.model_inputs())  # only the hooked states are read
        for layer, h in zip(layers, seen):
            rows = torch.arange(len(chunk), device=h.device)
            out[layer].append(h[rows, enc.subject_last.to(h.device)].double().cpu())
    return {layer: torch.cat(v) for layer, v in out.items()}, torch.cat(first).cpu()


def centroids(loaded: LoadedModel, concepts: list[Concept], layers: list[int], batch_size: int = 64
              ) -> dict[int, torch.Tensor]:
    """Each concept's centroid at each layer: ``{layer: (n_concepts, d_model) float64}`` (CPU).

    A text that puts its concept's last token first (a one-token subject opening a prompt, with a tokenizer
    that adds no BOS) is read where the model keeps its attention sink, a state nearly the same for every
    token: it is left out of the mean when the concept has other texts, kept (with a warning) when it has
    none. ``Concept.at_first_token`` counts them.
    """
    flat = [(i, t) for i, c in enumerate(concepts) for t in c.texts]
    if not flat:
        raise DataError("No concept has a text to read its hidden states from.")
    try:
        states, first = states_at(loaded, [t for _, t in flat], layers, batch_size)
    except DataError as e:
        raise DataError(f"Cannot place a concept in its text: {e}") from e
    index = torch.tensor([i for i, _ in flat], dtype=torch.long)
    n_first = torch.bincount(index[first], minlength=len(concepts))
    n_all = torch.bincount(index, minlength=len(concepts))
    weight = torch.ones(len(flat), dtype=torch.float64)
    for k, c in enumerate(concepts):
        c.at_first_token = int(n_first[k])
        if n_first[k]:
            if n_first[k] < n_all[k]:
                weight[first & (index == k)] = 0.0
                log.info("%s: %d of its texts open with it (read at the attention-sink position): left out",
                         c.label, int(n_first[k]))
            else:
                log.warning("%s: every text opens with it, so it is read at the attention-sink position, whose "
                            "state is nearly the same for every token", c.label)
    count = torch.zeros(len(concepts), dtype=torch.float64).index_add_(0, index, weight).unsqueeze(1)
    result = {}
    for layer, h in states.items():
        sums = torch.zeros(len(concepts), h.shape[1], dtype=torch.float64).index_add_(0, index, h * weight[:, None])
        result[layer] = sums / count
    return result


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the rows of ``x`` (n, n), float64, symmetric, with an exact unit diagonal."""
    x = x.double()
    unit = x / x.norm(dim=1, keepdim=True).clamp(min=1e-300)
    m = unit @ unit.T
    m = (m + m.T) / 2
    m.fill_diagonal_(1.0)
    return m.clamp(-1.0, 1.0)


def flag_pairs(labels: list[str], matrix: torch.Tensor, threshold: float) -> list[dict]:
    """Pairs of different concepts whose cosine is above ``threshold``, most similar first."""
    pairs = [{"a": labels[i], "b": labels[j], "cosine": float(matrix[i, j])}
             for i in range(len(labels)) for j in range(i + 1, len(labels)) if float(matrix[i, j]) > threshold]
    return sorted(pairs, key=lambda p: -p["cosine"])


def _rows(matrix: torch.Tensor, digits: int = 6) -> list[list[float]]:
    return [[round(float(v), digits) for v in row] for row in matrix]


def _offdiag_mean(m: torch.Tensor) -> float | None:
    n = m.shape[0]
    return None if n < 2 else float((m.sum() - m.diagonal().sum()) / (n * n - n))


def build_result(concepts: list[Concept], facts: list, cents: dict[int, torch.Tensor], threshold: float,
                 base: dict[int, torch.Tensor] | None = None, meta: dict | None = None) -> dict:
    """Everything ``geometry.json`` holds: per layer the labels, the cosine matrix (raw and centred), the pairs
    above ``threshold``; with ``base`` (the unedited model's centroids of the same concepts) also the base
    matrix, each concept's cosine between its base and edited centroid, and per fact how the similarity of its
    subject to its new and true target changed."""
    labels = [c.label for c in concepts]
    where = {(c.kind, c.text): i for i, c in enumerate(concepts)}
    layers = sorted(cents)
    out = {"meta": meta or {}, "threshold": threshold, "layers": layers, "labels": labels,
           "concepts": [{"label": c.label, "kind": c.kind, "text": c.text, "roles": c.roles, "facts": c.facts,
                         "n_texts": len(c.texts), "prompts_skipped": c.prompts_skipped,
                         "at_first_token": c.at_first_token} for c in concepts],
           "target_templates": list(TARGET_TEMPLATES), "per_layer": {}}
    for layer in layers:
        m = cosine_matrix(cents[layer])
        centred = cosine_matrix(cents[layer] - cents[layer].mean(0, keepdim=True)) if len(concepts) > 1 else m
        entry = {"matrix": _rows(m), "centred": _rows(centred), "flagged": flag_pairs(labels, m, threshold),
                 "mean_offdiag": _offdiag_mean(m), "centroid_norms": [round(float(v), 4) for v in cents[layer].norm(dim=1)]}
        if base is not None:
            b = cosine_matrix(base[layer])
            moved = torch.nn.functional.cosine_similarity(base[layer], cents[layer], dim=1)
            entry["base_matrix"] = _rows(b)
            entry["base_flagged"] = flag_pairs(labels, b, threshold)
            entry["moved"] = [{"label": lab, "cosine_base_edited": round(float(v), 6)} for lab, v in zip(labels, moved)]
            per_fact = []
            for f in facts:
                s = where[("subject", f.subject.strip())]
                row = {"id": f.id, "subject": f.subject.strip(), "target_new": f.target_new.strip(),
                       "target_true": f.target_true.strip() if f.target_true else None}
                for role, target in (("new", f.target_new), ("true", f.target_true)):
                    if target is None or not target.strip():
                        continue
                    t = where[("target", target.strip())]
                    row[f"sim_{role}_base"] = float(b[s, t])
                    row[f"sim_{role}_edited"] = float(m[s, t])
                    row[f"sim_{role}_change"] = float(m[s, t] - b[s, t])
                per_fact.append(row)
            entry["facts"] = per_fact
        out["per_layer"][str(layer)] = entry
    return out


# ------------------------------------------------------------------------------------------ writing

def check_report_dir(report_dir: Path | str) -> None:
    """Refuse, before any work is done, a report path that is a file or a folder of other files (CannotWrite)."""
    from covedit.pipeline.report import check_report_dir as check_any_report  # noqa: PLC0415 (imports matplotlib)

    check_any_report(report_dir, GEOMETRY_JSON, "covedit geometry report")


def _short(label: str, width: int = 28) -> str:
    return label if len(label) <= width else label[:width - 1] + "…"


def plot_heatmap(result: dict, layer: int, path: Path) -> None:
    """The cosine matrix of ``layer`` as a heatmap, flagged pairs marked; with a base model a second panel shows
    the change (edited − base)."""
    from matplotlib.figure import Figure  # noqa: PLC0415 (only writing a report needs it)

    entry = result["per_layer"][str(layer)]
    labels = result["labels"]
    n = len(labels)
    m = torch.tensor(entry["matrix"])
    panels = [("cosine similarity", m, "viridis", None)]
    if "base_matrix" in entry:
        change = m - torch.tensor(entry["base_matrix"])
        top = max(float(change.abs().max()), 1e-6)
        panels.append(("change from the base model", change, "RdBu_r", (-top, top)))
    side = min(16.0, 3.0 + 0.28 * n)
    fig = Figure(figsize=(side * len(panels) + 1.0, side), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    index = {lab: i for i, lab in enumerate(labels)}
    for ax, (title, values, cmap, limits) in zip(axes, panels):
        if limits is None:
            off = values[~torch.eye(n, dtype=torch.bool)] if n > 1 else values.flatten()
            limits = (min(float(off.min()), result["threshold"]), 1.0)
        image = ax.imshow(values.numpy(), cmap=cmap, vmin=limits[0], vmax=limits[1], interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        if n <= MAX_TICK_LABELS:
            ticks = list(range(n))
            ax.set_xticks(ticks, [_short(x) for x in labels], rotation=90, fontsize=7)
            ax.set_yticks(ticks, [_short(x) for x in labels], fontsize=7)
        if title == "cosine similarity":
            for p in entry["flagged"]:
                i, j = index[p["a"]], index[p["b"]]
                ax.plot([j, i], [i, j], "x", color="red", markersize=4 if n > 30 else 6)
        ax.set_title(f"layer {layer}: {title}", fontsize=9)
    if entry["flagged"]:
        fig.suptitle(f"x: cosine > {result['threshold']:g}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _write_files(folder: Path, result: dict) -> None:
    (folder / GEOMETRY_JSON).write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    for layer in result["layers"]:
        plot_heatmap(result, layer, folder / f"heatmap_layer{layer}.png")


def write_geometry(report_dir: Path | str, result: dict) -> Path:
    """``geometry.json`` and one ``heatmap_layer{L}.png`` per layer into ``report_dir``, all or nothing."""
    report_dir = Path(report_dir).expanduser()
    check_report_dir(report_dir)
    replace_folder(report_dir, lambda tmp: _write_files(tmp, result), "the geometry report")
    return report_dir


# ------------------------------------------------------------------------------------------ the command

def default_geometry_layers(loaded: LoadedModel) -> list[int]:
    """The model's MEMIT edit layers (hparams defaults) and its last layer."""
    from covedit.pipeline.hparams import defaults_for  # noqa: PLC0415

    hp = defaults_for("memit", loaded.model.config.model_type, loaded.num_layers)
    return sorted(set(hp.layers) | {loaded.num_layers - 1})


def check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
        raise UsageError(f"--threshold must be a cosine between -1 and 1, got {threshold}.")


def check_same_shape(model: LoadedModel, base: LoadedModel) -> None:
    """The base model must have the edited model's tokenizer, width and depth (UsageError otherwise)."""
    if model.num_layers != base.num_layers or model.d_model != base.d_model:
        raise UsageError(f"--base-model has {base.num_layers} layers of width {base.d_model}, the model "
                         f"{model.num_layers} of width {model.d_model}: it must be the model the edit started from.")
    if model.tokenizer.get_vocab() != base.tokenizer.get_vocab():
        raise UsageError("--base-model has another tokenizer than the model: it must be the model the edit started from.")


def run_geometry(model: str, facts_path: Path, report: Path, base_model: str | None = None,
                 threshold: float = DEFAULT_THRESHOLD, layers: list[int] | None = None, fmt: str = "auto",
                 dtype: str = "float32", device: str = "cpu", module_template: str | None = None,
                 batch_size: int = 64) -> dict:
    """``covedit geometry``: read the facts, measure the model (and the base model), write ``report``.

    Everything that can be refused is refused before the first forward pass, and nothing is written unless
    everything was computed.
    """
    from covedit.pipeline.errors import MissingInput  # noqa: PLC0415
    from covedit.pipeline.facts import read_facts  # noqa: PLC0415
    from covedit.pipeline.models import describe_model, load_model  # noqa: PLC0415

    check_threshold(threshold)
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1.")
    if not Path(facts_path).is_file():
        raise MissingInput(f"Facts file {facts_path} does not exist.")
    check_report_dir(report)
    loaded = load_model(model, dtype, device, module_template)
    facts = read_facts(facts_path, fmt, loaded.tokenizer)
    chosen = default_geometry_layers(loaded) if layers is None else sorted(set(layers))
    loaded.check_layers(chosen)
    if base_model is not None:  # checked on its config and tokenizer alone, before any work
        check_same_shape(loaded, describe_model(base_model, module_template=module_template, tokenizer=True))
    concepts = concepts_of(facts)
    cents = centroids(loaded, concepts, chosen, batch_size)
    base_cents = None
    if base_model is not None:
        del loaded  # one model in memory at a time
        base_cents = centroids(load_model(base_model, dtype, device, module_template), concepts, chosen, batch_size)
    meta = {"model": model, "base_model": base_model, "facts_file": str(facts_path), "n_facts": len(facts),
            "n_concepts": len(concepts), "dtype": dtype}
    result = build_result(concepts, facts, cents, threshold, base_cents, meta)
    write_geometry(report, result)
    return result


def render_text(result: dict, top: int = 5) -> str:
    """What ``covedit geometry`` prints: per layer the flagged pairs; with a base model how each fact moved."""
    lines = [f"{result['meta'].get('n_concepts')} concepts from {result['meta'].get('n_facts')} facts; "
             f"cosine of centroids, pairs above {result['threshold']:g} flagged"]
    for layer in result["layers"]:
        e = result["per_layer"][str(layer)]
        mean = e["mean_offdiag"]
        lines.append(f"\nlayer {layer}: mean cosine between different concepts "
                     f"{'-' if mean is None else f'{mean:.3f}'}; {len(e['flagged'])} pair(s) above the threshold")
        for p in e["flagged"][:top]:
            lines.append(f"  {p['cosine']:.3f}  {p['a']}  ~  {p['b']}")
        if len(e["flagged"]) > top:
            lines.append(f"  ... and {len(e['flagged']) - top} more (geometry.json has them all)")
        if "facts" in e:
            lines.append(f"  {'fact':<24} {'subject~new':>22} {'subject~true':>22}")
            for r in e["facts"][:top * 4]:
                def cell(role: str) -> str:
                    if f"sim_{role}_base" not in r:
                        return "-"
                    return f"{r[f'sim_{role}_base']:.3f}->{r[f'sim_{role}_edited']:.3f} ({r[f'sim_{role}_change']:+.3f})"
                lines.append(f"  {r['id'][:24]:<24} {cell('new'):>22} {cell('true'):>22}")
            least = min(e["moved"], key=lambda m: m["cosine_base_edited"])
            lines.append(f"  most moved centroid: {least['label']} (cosine base/edited {least['cosine_base_edited']:.4f})")
    return "\n".join(lines)
