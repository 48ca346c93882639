"""The train/validation split: whole documents, and documents that share a passage on one side.

    train_docs, val_docs = split_documents(docs)  # BEFORE tokenization
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import deque
from collections.abc import Iterable, Iterator

from zoo.corpus import DataError

# Bump whenever a change to this module moves documents between the splits: a run resumed across it would
# score val/loss on another validation set and train on former validation text. Recorded with the run
# (RUN_DIR/split.json, and the data state in each checkpoint); a run that recorded none used version 1.
# 1: passages of raw text, sampled windows, groups ranked by their smallest member's hash.
# 2: passages of whitespace-normalised text, winnowed windows, groups ranked by one member.
SPLIT_VERSION = 2
UNVERSIONED_SPLIT = 1  # the version of a run that recorded none


def check_split_version(recorded: int) -> None:
    """Refuse to continue a run whose data was split by another version of this module."""
    if recorded != SPLIT_VERSION:
        raise DataError(f"--resume: the zoo's train/validation split changed since the run started (split version "
                        f"{recorded} -> {SPLIT_VERSION}): the run cannot continue on the same validation set; "
                        "start a new run (another --out)")

# Documents that share a passage go to the same split: a window of SHARED_CHARS characters starting
# at a word start, found in two documents, joins them. Exact duplicates alone are not enough: pydoc's
# `specialnames` topic quotes other topics whole, docstrings repeat boilerplate, LAMBADA holds
# near-copies. With a split by distinct document, 31% of the builtin corpus' validation 100-character
# windows (seed 0) were also in training text; with the grouping, none are (tests/test_data_split.py).
# Windows are read on whitespace-normalised text (runs of whitespace as one space): a docstring
# re-wrapped at another width is the same passage (on raw text, 4-8 of 93 validation documents of the
# builtin corpus, seeds 0-3, repeated a training passage with other line breaks). Case is kept: a
# casefolded window would join documents that differ in case alone, and none of the builtin corpus'
# validation documents shares a passage with training text that way once whitespace is normalised.
SHARED_CHARS = 64
_SPACE = re.compile(" ")  # word starts in normalised text: position 0 and after each space
# Above this many characters (in all) a document keeps only the smallest hash of every `run` consecutive
# windows (winnowing, Schleimer, Wilkerson & Aiken, SIGMOD 2003), run = 2 * ceil(chars / this) - 1:
# ~2 / (run + 1) = 1 / ceil(chars / this) of the windows, so memory stays ~0.5 GB on a 100k-document hub
# set. A passage holding `run` windows (SHARED_CHARS characters and run - 1 more words) is still always
# found; a shorter one may not be. At or below it (the builtin corpus, Shakespeare) run = 1: every window, exact.
_EXACT_GROUPING_CHARS = 32_000_000
# The validation share is counted in documents; a group that would take validation past this many
# times val_fraction of the characters is left in training. pydoc's quoting topics form one group of
# 26 long documents, 28% of the builtin corpus' text (21 and 17% on raw text): drawn for validation
# (seeds 0 and 1, raw text) it held out 25% of the text instead of the 5-10% a split by document gave.
VAL_CHARS_CAP = 2


def _normalised(doc: str) -> str:
    """`doc` with every run of whitespace as one space and none at either end."""
    return " ".join(doc.split())


def _window_hashes(text: str) -> Iterator[int]:
    """A 64-bit hash of each SHARED_CHARS-character window of normalised `text` that starts at a word
    start (position 0 or after a space); of the whole text when it is shorter, so that short documents
    equal up to whitespace are grouped too. A generator: a list would hold ~7.5 bytes a character of the
    document (a window a word, ~40 bytes a Python int and its slot) before winnowing."""
    if len(text) < SHARED_CHARS:
        starts: Iterable[int] = [0] if text else []
        width = len(text)
    else:
        last = len(text) - SHARED_CHARS
        starts = itertools.chain([0], (match.end() for match in _SPACE.finditer(text, 0, last)))
        width = SHARED_CHARS
    # blake2b, not hash(): str hashes differ between processes, and every rank must split alike
    for start in starts:
        yield int.from_bytes(hashlib.blake2b(text[start:start + width].encode(), digest_size=8).digest())


def _winnowed(hashes: Iterable[int], run: int) -> Iterator[int]:
    """The smallest hash of every `run` consecutive ones (of all of them when there are fewer), in order,
    holding only the current run. Two documents with `run` consecutive windows in common both keep the
    smallest of those windows' hashes."""
    if run == 1:
        yield from hashes
        return
    candidates: deque[tuple[int, int]] = deque()  # (index, hash) in the current run, hashes increasing
    last_kept, i = None, -1
    for i, value in enumerate(hashes):
        while candidates and candidates[-1][1] >= value:
            candidates.pop()
        candidates.append((i, value))
        if candidates[0][0] <= i - run:
            candidates.popleft()
        if i >= run - 1 and candidates[0][1] != last_kept:
            last_kept = candidates[0][1]
            yield last_kept
    if 0 <= i < run - 1:  # fewer hashes than one run: their minimum
        yield candidates[0][1]


def _winnowing_run(total_chars: int) -> int:
    """How many consecutive windows share one kept hash for a corpus of `total_chars`: 1 (all kept) up to
    _EXACT_GROUPING_CHARS, then 2 * keep_one_in - 1 so that ~1 / keep_one_in of the windows is kept, with
    keep_one_in = ceil(total_chars / _EXACT_GROUPING_CHARS): 2 from one character above it."""
    keep_one_in = max(1, -(-total_chars // _EXACT_GROUPING_CHARS))
    return 2 * keep_one_in - 1


def _shared_passage_groups(distinct: list[str]) -> list[list[int]]:
    """Indices of `distinct` in groups (union-find): two documents whose normalised texts have a kept
    window in common are in one group. Up to _EXACT_GROUPING_CHARS every window is kept, so any common
    passage of SHARED_CHARS characters starting at a word start in both joins them. Above, two
    documents with `run` (`_winnowing_run`) consecutive windows in common always are joined: a common
    passage whose run-th word start (in both) is followed by SHARED_CHARS characters still inside it,
    about SHARED_CHARS characters and run - 1 more words. Each group in index order, groups in the
    order of their first index."""
    parent = list(range(len(distinct)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    run = _winnowing_run(sum(map(len, distinct)))
    owner: dict[int, int] = {}  # a kept window's hash -> the first document that has it
    for index, doc in enumerate(distinct):
        for key in _winnowed(_window_hashes(_normalised(doc)), run):
            first = owner.setdefault(key, index)
            if first != index:
                parent[root(index)] = root(first)
    groups: dict[int, list[int]] = {}
    for index in range(len(distinct)):
        groups.setdefault(root(index), []).append(index)
    return list(groups.values())


def split_documents(docs: list[str], *, val_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split whole documents into (train, val), each in corpus order.

    Distinct texts are grouped with every text they share a passage with, whitespace aside
    (`_shared_passage_groups`; exact duplicates are one text), groups are ranked by a seeded hash of
    one member (the smallest text), so a group's rank is uniform whatever its size, and groups go to
    validation in that order while they fit in round(val_fraction * distinct texts) and keep
    validation under VAL_CHARS_CAP times val_fraction of the characters. So no validation document
    repeats a training passage of SHARED_CHARS characters starting at a word start, once runs of
    whitespace are one space (above _EXACT_GROUPING_CHARS: of SHARED_CHARS characters and
    `_winnowing_run` - 1 more words), and the split is independent of corpus order and reproducible
    from the seed alone."""
    check_val_fraction(val_fraction)
    distinct = list(dict.fromkeys(docs))
    if len(distinct) < 2:
        raise DataError(f"docs holds {len(distinct)} distinct document(s), need >= 2 to split into train and "
                        "validation; use a larger corpus")
    n_val = min(max(1, round(val_fraction * len(distinct))), len(distinct) - 1)

    def rank(group: list[int]) -> bytes:
        # One member's hash (the smallest text's: independent of corpus order), not the smallest over the
        # members, which gave a group of k documents ~k draws at an early rank: 35% of the builtin
        # corpus' validation documents were in multi-document groups, against 16% of its documents.
        canonical = min(distinct[i] for i in group)
        return hashlib.blake2b(f"{seed}\0{canonical}".encode(), digest_size=8).digest()

    max_val_chars = VAL_CHARS_CAP * val_fraction * sum(map(len, distinct))
    val_set: set[str] = set()
    val_chars = 0
    for group in sorted(_shared_passage_groups(distinct), key=rank):
        group_chars = sum(len(distinct[i]) for i in group)
        if len(val_set) + len(group) <= n_val and val_chars + group_chars <= max_val_chars:
            val_set.update(distinct[i] for i in group)
            val_chars += group_chars
        if len(val_set) == n_val:
            break
    if not val_set:
        raise DataError(f"every document shares a passage of {SHARED_CHARS}+ characters with more than "
                        f"val_fraction={val_fraction} of the corpus ({n_val} documents), so no validation "
                        "document can be kept apart from training text; raise val_fraction or deduplicate")
    return [doc for doc in docs if doc not in val_set], [doc for doc in docs if doc in val_set]


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 1); 0.05 is typical")


# ------------------------------------------------------------------------------------------- tokenizer
