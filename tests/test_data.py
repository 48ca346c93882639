"""training/data.py on real text from ../shared/data and the builtin corpus; CPU, no network, seconds."""

import os

# Tests never reach the hub; make any accidental attempt fail fast instead of waiting on a socket.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import string  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import training.data as data_module  # noqa: E402
import training.split as split_module  # noqa: E402
from zoo.corpus import builtin_documents, load_documents, parse_hub_source  # noqa: E402
from training.data import (  # noqa: E402
    DataError,
    Tokenizer,
    TokenizerError,
    TrainBatches,
    load_or_train_tokenizer,
    pack,
    prepare_data,
)
from training.split import split_documents  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORKS = DATA / "shakespeare_works.txt"
LAMBADA = DATA / "lambada_openai_test.jsonl"
# A slice of the works (~4000 paragraphs, ~0.5 MB) keeps every test to a second or two.
SMALL = dict(source=str(WORKS), max_documents=4000, seq_len=64, vocab_size=512, val_fraction=0.1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def works(cache_dir):
    return prepare_data(**SMALL, seed=0, cache_dir=cache_dir)


def documents_in(blocks_NT, tokenizer):
    """Decode a split's blocks back into (complete documents, trailing partial document). Blocks are
    consecutive slices of the split's EOS-terminated stream, so flattening them rebuilds the stream."""
    stream = blocks_NT.flatten().tolist()
    segments, current = [], []
    for token in stream:
        if token == tokenizer.eos_id:
            segments.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return segments, tokenizer.decode(current)


# ------------------------------------------------------------------------------------- no leakage

def test_no_validation_document_in_training_windows(works, cache_dir):
    docs = load_documents(SMALL["source"], max_documents=SMALL["max_documents"], cache_dir=cache_dir)
    train_docs, val_docs = split_documents(docs, val_fraction=SMALL["val_fraction"], seed=0)
    assert set(train_docs).isdisjoint(val_docs)
    assert works.n_documents == {"train": len(train_docs), "val": len(val_docs)}

    for blocks, own, other in [(works.train_blocks, train_docs, val_docs), (works.val_blocks, val_docs, train_docs)]:
        complete, partial = documents_in(blocks, works.tokenizer)
        assert len(complete) > 10
        # Each split's blocks are exactly its own documents, in order, and nothing else.
        assert complete == own[:len(complete)]
        assert own[len(complete)].startswith(partial)
        assert set(complete).isdisjoint(other)

    # Window level: no val block reappears among train blocks.
    train_windows = {tuple(block) for block in works.train_blocks.tolist()}
    assert not any(tuple(block) in train_windows for block in works.val_blocks.tolist())


def test_leak_check_catches_a_leak(works, cache_dir):
    """The check above can fail: pack one val document into the train stream and it is found."""
    docs = load_documents(SMALL["source"], max_documents=SMALL["max_documents"], cache_dir=cache_dir)
    train_docs, val_docs = split_documents(docs, val_fraction=SMALL["val_fraction"], seed=0)
    leaky, _ = pack([val_docs[0], *train_docs], works.tokenizer, seq_len=SMALL["seq_len"])
    complete, _ = documents_in(leaky, works.tokenizer)
    assert not set(complete).isdisjoint(val_docs)


def _shared_windows(train_docs, val_docs, width=100):
    """Validation windows of `width` characters (every offset) found verbatim in a training document."""
    train_windows = {d[i:i + width] for d in train_docs for i in range(len(d) - width + 1)}
    return sum(d[i:i + width] in train_windows for d in val_docs for i in range(len(d) - width + 1))


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_no_validation_passage_in_training_text_of_the_builtin_corpus(seed, monkeypatch):
    """pydoc's `specialnames` topic quotes other topics whole, and docstrings share boilerplate: a split
    by distinct document put 31% (seed 0) and 49% (seed 3) of the validation 100-character windows in
    training text. Grouping documents that share a passage leaves none; without it the check fails."""
    docs = builtin_documents()
    train_docs, val_docs = split_documents(docs, seed=seed)
    assert len(set(val_docs)) == round(0.05 * len(set(docs))) and not set(train_docs) & set(val_docs)
    assert _shared_windows(train_docs, val_docs) == 0
    # pydoc's quoting topics (17% of the text, one group) stay in training: at most 2 x 5% is held out.
    assert sum(map(len, val_docs)) <= 0.10 * sum(map(len, docs))

    monkeypatch.setattr(split_module, "SHARED_CHARS", 10**9)  # no window fits: one group per document
    leaky_train, leaky_val = split_documents(docs, seed=seed)
    assert _shared_windows(leaky_train, leaky_val) > 1000


def test_documents_sharing_a_passage_stay_in_one_split():
    passage = "Now is the winter of our discontent made glorious summer by this sun of York; "
    docs = [f"{passage}(play {i})" for i in range(6)] + [f"Speech {i}: " + passage[::-1] for i in range(3)]
    docs += [f"a short unrelated line {i}" for i in range(40)]
    for seed in range(8):
        train, val = split_documents(docs, val_fraction=0.2, seed=seed)
        shared = [d for d in val if passage in d]
        assert len(shared) in (0, 6) and len([d for d in val if passage[::-1] in d]) in (0, 3)
        assert len(val) == round(0.2 * len(docs))


def test_split_refuses_when_every_document_shares_a_passage():
    header = "Copyright (c) the authors. Licensed under the Apache License, Version 2.0. "
    with pytest.raises(DataError, match="shares a passage"):
        split_documents([f"{header}file {i}" for i in range(30)], seed=0)


def test_duplicates_stay_in_one_split():
    docs = ["Exeunt."] * 5 + [f"speech {i}" for i in range(40)]
    for seed in range(5):
        train, val = split_documents(docs, val_fraction=0.5, seed=seed)
        assert train.count("Exeunt.") in (0, 5) and val.count("Exeunt.") in (0, 5)


def _random_text(rng, n_words):
    """n_words made-up words: no SHARED_CHARS-character passage in common with any other call's."""
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(n_words))


def test_documents_differing_only_in_whitespace_stay_in_one_split():
    """Windows are hashed over whitespace-normalised text, so re-wrapped or re-indented copies are grouped.
    On raw text the builtin corpus put 4-8 of 93 validation docstrings (seeds 0-3) that repeat a training
    passage with other line breaks (`logging`'s root-logger helpers) in validation."""
    paragraph = ("Log a message with severity 'CRITICAL' on the root logger. If the logger has no handlers, "
                 "call basicConfig() to add a console handler with a pre-defined format.")
    copies = [textwrap.fill(paragraph, width) for width in (30, 47, 72)]
    copies += [textwrap.indent(textwrap.fill(paragraph, 60), "\t  ").replace(". ", ".  ") + "\n"]
    short = ["Exeunt all but Hamlet.", "Exeunt all\n    but Hamlet."]  # under SHARED_CHARS: whole texts compare
    rng = random.Random(0)
    docs = copies + short + [_random_text(rng, 10) for _ in range(40)]
    groups = [sorted(docs[i] for i in group) for group in split_module._shared_passage_groups(docs)]
    assert sorted(copies) in groups and sorted(short) in groups and len(groups) == 40 + 2
    in_val = 0
    for seed in range(20):
        _, val = split_documents(docs, val_fraction=0.2, seed=seed)
        assert sum(d in val for d in copies) in (0, len(copies)) and sum(d in val for d in short) in (0, 2)
        in_val += copies[0] in val
    assert in_val > 0


def test_winnowed_grouping_finds_every_passage_of_the_guaranteed_length(monkeypatch):
    """Above _EXACT_GROUPING_CHARS only the smallest hash of every `run` consecutive windows of a document
    is kept, so a passage holding `run` windows (SHARED_CHARS characters from its run-th word start) is
    always found, by the minimum of its windows' hashes. Keeping windows whose hash is 0 modulo
    keep_one_in (the sampling before) missed each such passage with probability (1 - 1/keep_one_in)**run,
    13% here: it grouped 54 of these 60 pairs."""
    rng = random.Random(0)
    keep_one_in, n_pairs = 8, 60
    run = 2 * keep_one_in - 1
    pairs = []
    for _ in range(n_pairs):
        text = _random_text(rng, run + 20)
        last_window = len(" ".join(text.split()[:run - 1])) + 1  # where the run-th word starts
        passage = text[:last_window + split_module.SHARED_CHARS]  # the shortest holding `run` windows
        pairs.append([f"{_random_text(rng, 80)} {passage} X{_random_text(rng, 80)}",
                      f"{_random_text(rng, 90)}\n{passage}\n  Y{_random_text(rng, 70)}"])
    docs = [_random_text(rng, 200) for _ in range(40)] + [doc for pair in pairs for doc in pair]
    total = sum(map(len, docs))
    monkeypatch.setattr(split_module, "_EXACT_GROUPING_CHARS", -(-total // keep_one_in))  # ceil(total / threshold) = 8
    assert split_module._winnowing_run(total) == run

    groups = {frozenset(docs[i] for i in group) for group in split_module._shared_passage_groups(docs)}
    assert all(frozenset(pair) in groups for pair in pairs)
    assert len(groups) == len(docs) - n_pairs  # nothing else is grouped
    # Memory: winnowing keeps ~2 / (run + 1) = 1 / keep_one_in of the windows, as the sampling did.
    hashes = [list(split_module._window_hashes(split_module._normalised(doc))) for doc in docs]
    kept = sum(len(set(split_module._winnowed(h, run))) for h in hashes)
    assert kept <= 1.2 * sum(map(len, hashes)) / keep_one_in
    # _winnowed against its definition, the minimum of every run of `run` hashes (with ties).
    for n in (1, run - 1, run, run + 1, 200):
        hashes = [rng.randrange(50) for _ in range(n)]
        runs = [hashes[i:i + run] for i in range(max(1, n - run + 1))]
        assert set(split_module._winnowed(hashes, run)) == {min(r) for r in runs}


def test_winnowing_starts_one_character_above_the_threshold_and_streams(monkeypatch):
    """keep_one_in = ceil(chars / _EXACT_GROUPING_CHARS): chars // threshold kept every window up to twice
    the threshold. And a document's hashes are winnowed as they are made, never held in a list."""
    monkeypatch.setattr(split_module, "_EXACT_GROUPING_CHARS", 1000)
    assert [split_module._winnowing_run(n) for n in (0, 1000, 1001, 2000, 2001)] == [1, 1, 3, 3, 5]

    read = []

    def hashes():
        for i in range(10**9):  # far more than a list could hold
            read.append(i)
            yield (i * 7919) % 101

    kept = split_module._winnowed(hashes(), 3)
    assert next(kept) == 0 and len(read) == 3  # the first run's minimum, after reading that run alone
    windows = split_module._window_hashes("word " * 10**6)
    assert next(windows) == next(split_module._window_hashes("word " * 13))  # the same first window, lazily


def test_a_groups_chance_of_validation_does_not_grow_with_its_size(monkeypatch):
    """Groups are ranked by the seeded hash of one member. Ranked by the minimum over members, a group of
    k documents had ~k draws at an early rank: the builtin corpus' validation held 35% documents from
    multi-document groups (mean over seeds 0-19) against 16% of the corpus."""
    rng = random.Random(0)
    grouped = [f"{passage} (copy {i})" for passage in (_random_text(rng, 20) for _ in range(20)) for i in range(5)]
    docs = grouped + [f"a single document {i}" for i in range(400)]
    groups = split_module._shared_passage_groups(docs)
    assert sorted(map(len, groups)) == [1] * 400 + [5] * 20
    monkeypatch.setattr(split_module, "_shared_passage_groups", lambda distinct: groups)  # the same each seed
    shares = []
    for seed in range(200):
        _, val = split_documents(docs, val_fraction=0.1, seed=seed)
        shares.append(sum(doc in grouped for doc in val) / len(val))
    # A group's rank is uniform whatever its size, so the expected share of grouped documents in
    # validation is at most their share of the corpus, 0.2 (less, as a group that no longer fits is
    # skipped). The seeds give independent shares, so a fair split's mean exceeds 0.2 by 4 standard
    # errors with probability ~3e-5. Ranked by the minimum over members, the mean was 0.48.
    mean, sd = statistics.fmean(shares), statistics.stdev(shares)
    assert mean <= len(grouped) / len(docs) + 4 * sd / len(shares) ** 0.5, (mean, sd)


# ---------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_on_real_text(works, cache_dir):
    tok = works.tokenizer
    assert tok.vocab_size == SMALL["vocab_size"]
    docs = load_documents(SMALL["source"], max_documents=SMALL["max_documents"], cache_dir=cache_dir)
    # Train text, val text (never seen by the trainer) and whole files with their newlines and indents.
    texts = docs + [WORKS.read_text()[:200_000], LAMBADA.read_text()[:50_000]]
    texts += ["  two leading spaces\n\n\n\tindented\t\ttabs  trailing ", "x\r\ny 12345 é 中文 🙂 \x00", "\n", " "]
    assert sum("\n" in t for t in texts) > 1000 and any("   " in t for t in docs)
    failures = [t for t in texts if tok.decode(tok.encode(t)) != t]
    assert failures == []
    assert max(max(tok.encode(t), default=0) for t in texts) < tok.vocab_size


def test_tokenizer_cache_hit_is_not_retrained(tmp_path):
    sample = load_documents(str(WORKS), max_documents=1500, cache_dir=tmp_path)
    tok, cached = load_or_train_tokenizer(sample, vocab_size=400, cache_dir=tmp_path)
    [path] = (tmp_path / "tokenizers").glob("*.model")
    mtime = path.stat().st_mtime_ns
    again, cached_again = load_or_train_tokenizer(sample, vocab_size=400, cache_dir=tmp_path)
    assert (cached, cached_again) == (False, True)
    assert path.stat().st_mtime_ns == mtime and again.model_proto == tok.model_proto
    # A different vocab size or sample is a different key: trained anew, next to the first.
    _, cached_other = load_or_train_tokenizer(sample, vocab_size=420, cache_dir=tmp_path)
    _, cached_fewer = load_or_train_tokenizer(sample[:-1], vocab_size=400, cache_dir=tmp_path)
    assert (cached_other, cached_fewer) == (False, False)
    assert len(list((tmp_path / "tokenizers").glob("*.model"))) == 3


def test_prepare_data_second_call_uses_cache(works, cache_dir):
    again = prepare_data(**SMALL, seed=0, cache_dir=cache_dir)
    assert not works.tokenizer_from_cache and again.tokenizer_from_cache


def test_tokenizer_saves_into_run_folder(works, tmp_path):
    path = works.tokenizer.save(tmp_path / "run")
    assert path.name == "tokenizer.model"
    for loaded in (Tokenizer.load(tmp_path / "run"), Tokenizer.load(path)):
        text = "To be, or not to be, that is the question:\n"
        assert loaded.encode(text) == works.tokenizer.encode(text)
        assert (loaded.vocab_size, loaded.eos_id) == (works.tokenizer.vocab_size, works.tokenizer.eos_id)


# -------------------------------------------------------------------------------------- determinism

def take(batches, n):
    return [next(batches) for _ in range(n)]


def test_same_seed_same_blocks_and_order(works, cache_dir):
    again = prepare_data(**SMALL, seed=0, cache_dir=cache_dir)
    assert torch.equal(again.train_blocks, works.train_blocks) and torch.equal(again.val_blocks, works.val_blocks)
    for a, b in zip(take(works.train_batches(8), 30), take(again.train_batches(8), 30)):
        assert a.shape == (8, SMALL["seq_len"]) and a.dtype == torch.long
        assert torch.equal(a, b)


def test_different_seed_different_split_and_order(works, cache_dir):
    docs = load_documents(SMALL["source"], max_documents=SMALL["max_documents"], cache_dir=cache_dir)
    assert set(split_documents(docs, seed=0)[1]) != set(split_documents(docs, seed=1)[1])
    # Same blocks, another seed: another order.
    a = take(TrainBatches(works.train_blocks, batch_size=8, seed=0), 5)
    b = take(TrainBatches(works.train_blocks, batch_size=8, seed=1), 5)
    assert not any(torch.equal(x, y) for x, y in zip(a, b))


def test_epochs_reshuffle_and_cover_every_block(works):
    blocks = works.train_blocks[:50]
    batches = TrainBatches(blocks, batch_size=8, seed=0)  # 6 batches an epoch, 2 blocks left out
    epoch0, epoch1 = torch.cat(take(batches, 6)), torch.cat(take(batches, 6))
    assert batches.state_dict()["epoch"] == 2 and not torch.equal(epoch0, epoch1)
    assert len({tuple(block) for block in epoch0.tolist()}) == 48


def test_resume_gives_identical_next_batches(works):
    batches = works.train_batches(8)
    n_per_epoch = batches.batches_per_epoch
    take(batches, n_per_epoch - 3)  # stop just before an epoch boundary, so resuming crosses it
    state = batches.state_dict()
    expected = take(batches, 6)
    resumed = works.train_batches(8)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, take(resumed, 6)))
    with pytest.raises(DataError, match="batch_size"):
        works.train_batches(4).load_state_dict(state)


def test_resume_refuses_a_data_state_from_another_split_version(works):
    """A checkpoint's data state records the split version; one without it (saved before versions) is
    version 1, and resuming it on today's split would score val/loss on another validation set."""
    state = works.train_batches(8).state_dict()
    assert state["split_version"] == split_module.SPLIT_VERSION == 2
    works.train_batches(8).load_state_dict(state)
    for old in ({k: v for k, v in state.items() if k != "split_version"}, {**state, "split_version": 1}):
        with pytest.raises(DataError, match=r"train/validation split changed since the run started \(split "
                                            r"version 1 -> 2\).*same validation set; start a new run"):
            works.train_batches(8).load_state_dict({**old, "n_blocks": -1})  # the split version is named first


def test_ranks_split_the_global_batch(works):
    whole = take(works.train_batches(8), 3)
    ranks = [take(works.train_batches(4, rank=r, world_size=2), 3) for r in range(2)]
    for step in range(3):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), whole[step])


def test_val_batches_fixed_and_capped(works):
    batches = works.val_batches(8, max_blocks=20)
    assert [len(b) for b in batches] == [8, 8, 4] and all(b.shape[1] == SMALL["seq_len"] for b in batches)
    assert torch.equal(torch.cat(batches), works.val_blocks[:20])
    assert sum(len(b) for b in works.val_batches(8)) == len(works.val_blocks)


def test_the_validation_set_does_not_grow_with_the_batch_size(works):
    """A cap in batches scored 40,960 validation tokens at micro-batch 8 and 81,920 at 16 (Shakespeare)."""
    for batch_size in (1, 3, 8, 16):
        assert torch.equal(torch.cat(works.val_batches(batch_size, max_blocks=20)), works.val_blocks[:20])


# -------------------------------------------------------------------------------------------- sources

def test_builtin_corpus_needs_no_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("network used in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    docs = builtin_documents()
    # Measured on CPython 3.11: 2,014 documents, 1.05M characters (79 pydoc topics are 0.46M of them).
    assert len(docs) > 1000 and sum(map(len, docs)) > 500_000
    assert docs == builtin_documents()
    data = prepare_data(source="builtin", seq_len=128, vocab_size=512, cache_dir=tmp_path)
    assert len(data.train_blocks) > 1000 and len(data.val_blocks) > 20


def test_local_txt_jsonl_parquet_and_glob(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph,\ntwo lines.\n\n\n  Second, indented.\n\n")
    (tmp_path / "b.txt").write_text("Third.\n \nFourth.")
    assert load_documents(str(tmp_path / "a.txt"), cache_dir=tmp_path) == [
        "First paragraph,\ntwo lines.", "  Second, indented."]
    assert load_documents(str(tmp_path / "*.txt"), cache_dir=tmp_path)[2:] == ["Third.", "Fourth."]
    assert len(load_documents(str(tmp_path / "*.txt"), doc_separator=None, cache_dir=tmp_path)) == 2

    rows = [json.loads(line) for line in LAMBADA.read_text().splitlines()[:300]]
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"body": row["text"], "id": i}) + "\n" for i, row in enumerate(rows))
    jsonl = load_documents(str(tmp_path / "docs.jsonl"), text_field="body", cache_dir=tmp_path)
    assert jsonl == [row["text"] for row in rows]

    datasets.Dataset.from_dict({"text": jsonl}).to_parquet(str(tmp_path / "docs.parquet"))
    assert load_documents(str(tmp_path / "*.parquet"), max_documents=50, cache_dir=tmp_path) == jsonl[:50]

    data = prepare_data(source=str(tmp_path / "docs.jsonl"), text_field="body", seq_len=32, vocab_size=400,
                        cache_dir=tmp_path)
    assert data.n_documents["train"] + data.n_documents["val"] == len(jsonl)


def test_lambada_jsonl_prepares(tmp_path):
    data = prepare_data(source=str(LAMBADA), max_documents=1000, seq_len=128, vocab_size=512, cache_dir=tmp_path)
    assert data.n_documents == {"train": 950, "val": 50}
    assert data.train_blocks.shape[1] == 128 and len(data.val_blocks) > 0


def test_hub_source_parsing():
    assert parse_hub_source("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None)
    assert parse_hub_source("hf:Salesforce/wikitext:wikitext-103-raw-v1") == ("Salesforce/wikitext",
                                                                               "wikitext-103-raw-v1")
    assert parse_hub_source("hf:wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1")
    for bad in ("hf:", "hf:a/b/c", "hf:owner/", "hf:owner/name:", "owner/name"):
        with pytest.raises(DataError, match="source"):
            parse_hub_source(bad)


# --------------------------------------------------------------------------------------------- errors

WORKS_300 = dict(source=str(WORKS), max_documents=300)
BAD_INPUTS = {  # case: (field the message must name, prepare_data arguments; {tmp} is a fresh folder)
    "no file": ("source", dict(source="{tmp}/missing*.txt", seq_len=32, vocab_size=512)),
    "empty": ("source", dict(source="{tmp}/blank.txt", seq_len=32, vocab_size=512)),
    "one document": ("source", dict(source="{tmp}/one.txt", seq_len=32, vocab_size=512)),
    "too small": ("seq_len", dict(**WORKS_300, seq_len=4096, vocab_size=512)),
    "no text_field": ("text_field", dict(source="{tmp}/rows.jsonl", seq_len=32, vocab_size=512)),
    "vocab below bytes": ("vocab_size", dict(**WORKS_300, seq_len=32, vocab_size=100)),
    "vocab below chars": ("vocab_size", dict(**WORKS_300, seq_len=32, vocab_size=270)),
    "vocab too large": ("vocab_size", dict(**WORKS_300, seq_len=32, vocab_size=60_000)),
    "val_fraction 0": ("val_fraction", dict(**WORKS_300, seq_len=32, vocab_size=512, val_fraction=0.0)),
    "val_fraction 1": ("val_fraction", dict(**WORKS_300, seq_len=32, vocab_size=512, val_fraction=1.0)),
    "val_fraction < 0": ("val_fraction", dict(**WORKS_300, seq_len=32, vocab_size=512, val_fraction=-0.1)),
    "seq_len 1": ("seq_len", dict(**WORKS_300, seq_len=1, vocab_size=512)),
    "max_documents 0": ("max_documents", dict(**WORKS_300 | {"max_documents": 0}, seq_len=32, vocab_size=512)),
    "hub name": ("source", dict(source="hf:", seq_len=32, vocab_size=512)),
    "unknown format": ("source", dict(source="{tmp}/rows.csv", seq_len=32, vocab_size=512)),
    "bad separator": ("doc_separator", dict(**WORKS_300, seq_len=32, vocab_size=512, doc_separator="(")),
    "broken jsonl": ("source", dict(source="{tmp}/broken.jsonl", seq_len=32, vocab_size=512)),
    "not utf-8": ("source", dict(source="{tmp}/latin1.txt", seq_len=32, vocab_size=512)),
}


def test_a_file_rewritten_with_its_old_mtime_is_read_again(tmp_path):
    """datasets keys its cache on path and mtime; cp -p, rsync -a and tar keep the mtime of new text."""
    path = tmp_path / "c.txt"
    path.write_text("alpha one\n\nbeta two\n")
    stat = path.stat()
    assert load_documents(str(path), cache_dir=tmp_path) == ["alpha one", "beta two"]
    path.write_text("gamma three, longer\n\ndelta four\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_documents(str(path), cache_dir=tmp_path) == ["gamma three, longer", "delta four"]


def test_a_file_whose_name_looks_like_a_glob_is_read_as_named(tmp_path):
    (tmp_path / "act[1].txt").write_text("Enter Hamlet.\n\nExit Hamlet.\n")
    assert load_documents(str(tmp_path / "act[1].txt"), cache_dir=tmp_path) == ["Enter Hamlet.", "Exit Hamlet."]


def test_tokenizer_bytes_do_not_depend_on_the_core_count(tmp_path, monkeypatch):
    """SentencePiece records its thread count in the model: the same corpus on a 1-core and a 2-core
    machine gave different files, and --resume on the other machine refused the run."""
    sample = load_documents(str(WORKS), max_documents=1500, cache_dir=tmp_path)
    protos = []
    for threads in (1, 2):
        monkeypatch.setattr(data_module, "sentencepiece_threads", lambda threads=threads: threads)
        tok, cached = load_or_train_tokenizer(sample, vocab_size=400, cache_dir=tmp_path / f"cache{threads}")
        assert not cached
        protos.append(tok.model_proto)
    assert protos[0] == protos[1]
    assert Tokenizer(protos[0]).same_model(Tokenizer(protos[1]))


def test_a_corrupt_tokenizer_file_is_one_line(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="is not a SentencePiece model") as error:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_data_error_naming_the_field(case, tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n\n")
    (tmp_path / "one.txt").write_text("A single paragraph, nothing to hold out.\n")
    (tmp_path / "rows.jsonl").write_text('{"body": "text"}\n{"body": "more"}\n')
    (tmp_path / "rows.csv").write_text("text\nhello\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n\nd\xe9j\xe0 vu\n".encode("latin-1"))
    field, kwargs = BAD_INPUTS[case]
    kwargs = {key: value.format(tmp=tmp_path) if key == "source" else value for key, value in kwargs.items()}
    with pytest.raises(DataError) as error:
        prepare_data(**kwargs, cache_dir=tmp_path)
    message = str(error.value)
    assert f"{field}=" in message and "\n" not in message, message
