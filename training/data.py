"""Data: documents -> train/val split -> SentencePiece BPE -> packed blocks -> seeded batches.

    docs = load_documents(source)                 # list[str], one entry per document
    train_docs, val_docs = split_documents(docs)  # BEFORE tokenization; documents sharing a passage together
    tokenizer = load_or_train_tokenizer(sample of train_docs)   # cached by content hash
    blocks = pack(tokenize(docs), seq_len)        # (N, seq_len) int64, EOS after every document

The first two steps live in `zoo.corpus` (sources: builtin, local files, the hub) and
`training.split`; this module trains the tokenizer, packs and batches, and `prepare_data` runs it all.

Shapes: N = blocks, B = batch size, T = seq_len. Labels are the inputs: the model shifts them.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from tqdm import tqdm

from zoo.corpus import PARAGRAPHS, DataError, load_documents  # noqa: F401  (DataError: part of this API)
from training.split import (
    SPLIT_VERSION, UNVERSIONED_SPLIT, check_split_version, check_val_fraction, split_documents)
from zoo.files import write_atomic
from zoo.tokenizer import (  # noqa: F401
    TOKENIZER_FILENAME, Tokenizer, TokenizerError, canonical_proto, sentencepiece_threads)

UNK_ID, EOS_ID = 0, 1
N_BYTE_PIECES = 256  # byte_fallback adds one piece per byte value
# Every option here that changes the model is part of the cache key. Chosen so decode(encode(s)) == s:
# identity normalization (no NFKC), whitespace kept as written (no trimming, no dummy prefix, runs of
# spaces may become pieces, useful for code), and any character outside the vocab falls back to bytes.
SPM_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
    add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.9995,
    unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, pad_id=-1, max_sentence_length=1 << 16,
)
_SPM_CHUNK_CHARS = (1 << 16) // 4  # sentences longer than max_sentence_length bytes are dropped by the trainer
_CACHE_FORMAT = 1  # bump when the sampling or training code changes what a cached file means


def tokenizer_sample(train_docs: list[str], *, max_chars: int, seed: int = 0) -> list[str]:
    """All train documents if they fit in `max_chars`, else a seeded random subset of about that size."""
    if sum(map(len, train_docs)) <= max_chars:
        return list(train_docs)
    order = torch.randperm(len(train_docs), generator=torch.Generator().manual_seed(seed)).tolist()
    sample, n_chars = [], 0
    for index in order:
        if n_chars >= max_chars:
            break
        sample.append(train_docs[index])
        n_chars += len(train_docs[index])
    return sample


def load_or_train_tokenizer(sample: list[str], *, vocab_size: int,
                            cache_dir: str | Path = ".cache/zoo") -> tuple[Tokenizer, bool]:
    """(tokenizer, loaded_from_cache). The cache key hashes the sample text, vocab_size and SPM_OPTIONS,
    so changing any of them trains a new model and repeating them loads the old one."""
    _check_vocab_size(vocab_size)
    key = hashlib.sha256(json.dumps([_CACHE_FORMAT, vocab_size, SPM_OPTIONS], sort_keys=True).encode())
    for doc in sample:
        key.update(doc.encode())
        key.update(b"\0")  # document boundary: ["ab"] and ["a", "b"] train differently
    path = Path(cache_dir) / "tokenizers" / f"spm-bpe{vocab_size}-{key.hexdigest()[:20]}.model"
    if path.is_file():  # canonical: a file cached before canonical_proto existed records its thread count
        return Tokenizer(canonical_proto(path.read_bytes())), True

    chunks = (doc[i:i + _SPM_CHUNK_CHARS] for doc in sample for i in range(0, len(doc), _SPM_CHUNK_CHARS))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=chunks, model_writer=model, vocab_size=vocab_size,
                                       num_threads=sentencepiece_threads(), minloglevel=2, **SPM_OPTIONS)
    except RuntimeError as error:
        raise _vocab_error(vocab_size, str(error)) from error
    tokenizer = Tokenizer(canonical_proto(model.getvalue()))  # the same bytes whatever the core count
    assert tokenizer.vocab_size == vocab_size and tokenizer.eos_id == EOS_ID
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, tokenizer.model_proto)
    return tokenizer, False


def _check_vocab_size(vocab_size: int) -> None:
    floor = N_BYTE_PIECES + 2  # bytes, unk and eos; the corpus' own characters come on top
    if vocab_size < floor:
        raise DataError(f"vocab_size={vocab_size} is too small: byte-fallback BPE needs > {floor} pieces "
                        "(256 bytes + unk + eos + the corpus' characters); use e.g. 512 or more")


def _vocab_error(vocab_size: int, message: str) -> DataError:
    """Turn SentencePiece's trainer errors into one line that says what to change."""
    if too_small := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return DataError(f"vocab_size={vocab_size} is too small for this corpus: it needs at least "
                         f"{too_small[1]} pieces (bytes, specials and its characters); raise vocab_size")
    if too_large := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        return DataError(f"vocab_size={vocab_size} is too large for the tokenizer sample: at most "
                         f"{too_large[1]} pieces can be learned; lower vocab_size or raise tokenizer_sample_chars")
    return DataError(f"vocab_size={vocab_size}: SentencePiece training failed: {message.strip().splitlines()[-1]}")


# ------------------------------------------------------------------------------------------ packing

_PROGRESS_MIN_DOCS = 20_000  # below this, tokenizing takes about a second: no bar
_ENCODE_CHUNK_DOCS = 2_048


def pack(docs: list[str], tokenizer: Tokenizer, *, seq_len: int, desc: str = "tokenize") -> tuple[torch.Tensor, int]:
    """(blocks (N, seq_len) int64, tokens in the stream). The documents are tokenized, each followed by
    EOS, concatenated in order and cut into non-overlapping blocks; the last partial block is dropped."""
    pieces = []  # int32 tensors per chunk of documents: a Python list of every token would cost ~30 B each
    bar = tqdm(total=len(docs), desc=desc, unit="doc", disable=None if len(docs) >= _PROGRESS_MIN_DOCS else True)
    with bar:
        for start in range(0, len(docs), _ENCODE_CHUNK_DOCS):
            chunk = docs[start:start + _ENCODE_CHUNK_DOCS]
            ids = [token for doc_ids in tokenizer.encode_batch(chunk) for token in (*doc_ids, tokenizer.eos_id)]
            pieces.append(torch.tensor(ids, dtype=torch.int32))
            bar.update(len(chunk))
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)
    n_blocks = len(stream) // seq_len
    blocks_NT = stream[:n_blocks * seq_len].long().view(n_blocks, seq_len)
    return blocks_NT, len(stream)


# ---------------------------------------------------------------------------------------- batching

class TrainBatches:
    """Endless, resumable iterator of (B, T) train batches.

    Epoch e visits the blocks in the order torch.randperm(N, seed + e) in global batches of
    B * world_size blocks, and rank r takes the r-th slice of B; the last incomplete global batch of an
    epoch is skipped. state_dict() holds (epoch, position), so a resumed run draws the same next batch,
    and the split version, so that it draws it from the same training documents."""

    def __init__(self, blocks_NT: torch.Tensor, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size < 1 or batch_size * world_size > len(blocks_NT):
            raise DataError(f"batch_size={batch_size} x world_size={world_size} must be in [1, {len(blocks_NT)}] "
                            "(the number of train blocks); lower batch_size or seq_len, or use more data")
        self.blocks_NT, self.batch_size, self.seed = blocks_NT, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(blocks_NT) // (batch_size * world_size)
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order, self._order_epoch = torch.randperm(len(self.blocks_NT), generator=generator), self.epoch
        start = (self.position * self.world_size + self.rank) * self.batch_size
        batch_BT = self.blocks_NT[self._order[start:start + self.batch_size]]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch_BT

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "n_blocks": len(self.blocks_NT), "split_version": SPLIT_VERSION}

    def load_state_dict(self, state: dict[str, int]) -> None:
        check_split_version(state.get("split_version", UNVERSIONED_SPLIT))  # first: n_blocks would differ too
        for field in ("seed", "batch_size", "world_size", "n_blocks"):
            if state[field] != self.state_dict()[field]:
                raise DataError(f"data state {field}={state[field]} differs from this run's "
                                f"{self.state_dict()[field]}; resume with the same data settings")
        self.epoch, self.position = state["epoch"], state["position"]


def val_batches(blocks_NT: torch.Tensor, *, batch_size: int, max_blocks: int | None = None) -> list[torch.Tensor]:
    """The first `max_blocks` validation blocks in order, in batches of `batch_size` (the last may be
    smaller): the same list on every call, so every evaluation scores the same tokens, whatever the
    batch size."""
    blocks_NT = blocks_NT[:max_blocks]
    return [blocks_NT[i:i + batch_size] for i in range(0, len(blocks_NT), batch_size)]


# ---------------------------------------------------------------------------------------- top level

@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train_blocks: torch.Tensor  # (N_train, T) int64
    val_blocks: torch.Tensor  # (N_val, T) int64
    seed: int
    n_documents: dict[str, int]  # {"train": ..., "val": ...}
    n_chars: dict[str, int]
    n_tokens: dict[str, int]  # tokens in each split's stream, EOS included, before cutting into blocks
    tokenizer_from_cache: bool

    @property
    def seq_len(self) -> int:
        return self.train_blocks.shape[1]

    def train_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> TrainBatches:
        return TrainBatches(self.train_blocks, batch_size=batch_size, seed=self.seed, rank=rank, world_size=world_size)

    def val_batches(self, batch_size: int, max_blocks: int | None = None) -> list[torch.Tensor]:
        return val_batches(self.val_blocks, batch_size=batch_size, max_blocks=max_blocks)

    def summary(self) -> str:
        return (f"documents {self.n_documents['train']:,} train / {self.n_documents['val']:,} val, "
                f"chars {self.n_chars['train']:,} / {self.n_chars['val']:,}, "
                f"tokens {self.n_tokens['train']:,} / {self.n_tokens['val']:,}, "
                f"blocks {len(self.train_blocks):,} / {len(self.val_blocks):,} of {self.seq_len}, "
                f"vocab {self.tokenizer.vocab_size}{' (cached)' if self.tokenizer_from_cache else ''}")


def prepare_data(*, source: str = "builtin", seq_len: int, vocab_size: int, val_fraction: float = 0.05,
                 seed: int = 0, text_field: str = "text", cache_dir: str | Path = ".cache/zoo",
                 max_documents: int | None = None, tokenizer_sample_chars: int = 5_000_000,
                 doc_separator: str | None = PARAGRAPHS) -> PreparedData:
    """Load, split (by document), train or load the tokenizer on train text only, tokenize and pack."""
    check_val_fraction(val_fraction)
    _check_vocab_size(vocab_size)
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len} must be >= 2 (the model predicts token t+1 from tokens <= t)")
    if tokenizer_sample_chars < 1:
        raise DataError(f"tokenizer_sample_chars={tokenizer_sample_chars} must be >= 1; 5_000_000 is typical")

    docs = load_documents(source, text_field=text_field, max_documents=max_documents,
                          doc_separator=doc_separator, cache_dir=cache_dir)
    if len(set(docs)) < 2:
        raise DataError(f"source={source!r} holds {len(set(docs))} distinct document, need >= 2 to split into "
                        "train and validation; use a larger corpus")
    splits = dict(zip(("train", "val"), split_documents(docs, val_fraction=val_fraction, seed=seed)))
    sample = tokenizer_sample(splits["train"], max_chars=tokenizer_sample_chars, seed=seed)
    tokenizer, from_cache = load_or_train_tokenizer(sample, vocab_size=vocab_size, cache_dir=cache_dir)

    blocks, n_tokens = {}, {}
    for split, split_docs in splits.items():
        blocks[split], n_tokens[split] = pack(split_docs, tokenizer, seq_len=seq_len, desc=f"tokenize {split}")
        if len(blocks[split]) == 0:
            raise DataError(f"seq_len={seq_len}: the {split} split has only {n_tokens[split]:,} tokens "
                            f"({len(split_docs)} documents), less than one block; lower seq_len, "
                            "use a larger corpus" + (" or raise val_fraction" if split == "val" else ""))
    return PreparedData(
        tokenizer=tokenizer, train_blocks=blocks["train"], val_blocks=blocks["val"], seed=seed,
        n_documents={split: len(d) for split, d in splits.items()},
        n_chars={split: sum(map(len, d)) for split, d in splits.items()},
        n_tokens=n_tokens, tokenizer_from_cache=from_cache)
