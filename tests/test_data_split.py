"""The train/validation split (training/split.py) on real text from ../shared/data and the builtin
corpus: no validation document or passage in any training window, documents that share a passage
(duplicates, whitespace variants) kept in one split, and the winnowing that finds those passages."""

import os

# Tests never reach the hub; make any accidental attempt fail fast instead of waiting on a socket.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import random  # noqa: E402
import statistics  # noqa: E402
import string  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

import training.split as split_module  # noqa: E402
from training.data import DataError, pack  # noqa: E402
from training.split import split_documents  # noqa: E402
from zoo.corpus import builtin_documents, load_documents  # noqa: E402

from _data import SMALL, cache_dir, works  # noqa: E402, F401  (fixtures)


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
    Hashed on raw text, the builtin corpus would put 4-8 of 93 validation docstrings (seeds 0-3) that
    repeat a training passage with other line breaks (`logging`'s root-logger helpers) in validation."""
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
    k documents would have ~k draws at an early rank: the builtin corpus' validation would hold 35%
    documents from multi-document groups (mean over seeds 0-19) against 16% of the corpus."""
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
    # errors with probability ~3e-5. Ranked by the minimum over members, the mean would be 0.48.
    mean, sd = statistics.fmean(shares), statistics.stdev(shares)
    assert mean <= len(grouped) / len(docs) + 4 * sd / len(shares) ** 0.5, (mean, sd)
