"""The train/validation split: whole documents, and documents that share a passage on one side.

    train_docs, val_docs = split_documents(docs)  # BEFORE tokenization
"""

from __future__ import annotations

import hashlib
import re

from training.corpus import DataError

# Documents that share a passage go to the same split: a window of SHARED_CHARS characters starting
# at a word start, found in two documents, joins them. Exact duplicates alone are not enough: pydoc's
# `specialnames` topic quotes other topics whole, docstrings repeat boilerplate, LAMBADA holds
# near-copies. With a split by distinct document, 31% of the builtin corpus' validation 100-character
# windows (seed 0) were also in training text; with the grouping, none are (tests/test_data.py).
SHARED_CHARS = 64
_WORD_START = re.compile(r"\s+")  # a window starts where a match ends, and at position 0
# Above this many characters only windows whose hash is 0 modulo (chars // this) are kept, so memory
# stays ~0.5 GB on a 100k-document hub set; a shared passage of a few windows is then found with high
# probability rather than certainly. At or below it (the builtin corpus, Shakespeare) the check is exact.
_EXACT_GROUPING_CHARS = 32_000_000
# The validation share is counted in documents; a group that would take validation past this many
# times val_fraction of the characters is left in training. pydoc's quoting topics form one group of
# 21 long documents, 17% of the builtin corpus' text: drawn for validation (seeds 0 and 1) it held out
# 25% of the text instead of the 5-10% a split by document gave.
VAL_CHARS_CAP = 2


def _shared_passage_groups(distinct: list[str]) -> list[list[int]]:
    """Indices of `distinct` in groups (union-find): two documents with a SHARED_CHARS-character
    window in common, starting at a word start in both, are in one group. Each group in index order,
    groups in the order of their first index."""
    parent = list(range(len(distinct)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    keep_one_in = max(1, sum(map(len, distinct)) // _EXACT_GROUPING_CHARS)
    owner: dict[int, int] = {}  # hash of a window -> the first document that has it
    for index, doc in enumerate(distinct):
        for start in (0, *(match.end() for match in _WORD_START.finditer(doc))):
            if start + SHARED_CHARS > len(doc):
                break
            # blake2b, not hash(): str hashes differ between processes, and every rank must split alike
            key = int.from_bytes(hashlib.blake2b(doc[start:start + SHARED_CHARS].encode(), digest_size=8).digest())
            if key % keep_one_in:
                continue
            first = owner.setdefault(key, index)
            if first != index:
                parent[root(index)] = root(first)
    groups: dict[int, list[int]] = {}
    for index in range(len(distinct)):
        groups.setdefault(root(index), []).append(index)
    return list(groups.values())


def split_documents(docs: list[str], *, val_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split whole documents into (train, val), each in corpus order.

    Distinct texts are grouped with every text they share a passage with (`_shared_passage_groups`;
    exact duplicates are one text), groups are ranked by a seeded hash of their content, and groups
    go to validation in that order while they fit in round(val_fraction * distinct texts) and keep
    validation under VAL_CHARS_CAP times val_fraction of the characters. So no validation document
    repeats a training passage of about SHARED_CHARS characters or more, and the split is
    independent of corpus order and reproducible from the seed alone."""
    check_val_fraction(val_fraction)
    distinct = list(dict.fromkeys(docs))
    if len(distinct) < 2:
        raise DataError(f"docs holds {len(distinct)} distinct document(s), need >= 2 to split into train and "
                        "validation; use a larger corpus")
    n_val = min(max(1, round(val_fraction * len(distinct))), len(distinct) - 1)

    def rank(group: list[int]) -> bytes:
        return min(hashlib.blake2b(f"{seed}\0{distinct[i]}".encode(), digest_size=8).digest() for i in group)

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
