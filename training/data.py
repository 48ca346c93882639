"""Data: documents -> train/val split -> SentencePiece BPE -> packed blocks -> seeded batches.

    docs = load_documents(source)                 # list[str], one entry per document
    train_docs, val_docs = split_documents(docs)  # BEFORE tokenization; documents sharing a passage together
    tokenizer = load_or_train_tokenizer(sample of train_docs)   # cached by content hash
    blocks = pack(tokenize(docs), seq_len)        # (N, seq_len) int64, EOS after every document

Sources (`source=`):
    "builtin"                 text that ships with every CPython: pydoc's topics + stdlib docstrings
    "path/a.txt", "d/*.jsonl" local text / JSON / JSONL / parquet files or a glob, via `datasets`
    "hf:owner/name[:config]"  a hub data set, streamed (needs network), first `max_documents` rows

Shapes: N = blocks, B = batch size, T = seq_len. Labels are the inputs: the model shifts them.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import sentencepiece as spm
import torch
from tqdm import tqdm

from zoo.tokenizer import (  # noqa: F401
    TOKENIZER_FILENAME, Tokenizer, TokenizerError, canonical_proto, sentencepiece_threads, write_atomic)


class DataError(ValueError):
    """Bad data settings or a corpus that cannot make a run; the message names the field and the fix."""


# ---------------------------------------------------------------------------------------------- sources

# A blank line (possibly holding spaces) ends a paragraph. One paragraph per document makes a
# document-level split meaningful for one big .txt (Shakespeare: a speech, a stage direction, a sonnet).
PARAGRAPHS = r"\n\s*\n"
HUB_PREFIX = "hf:"
HUB_DEFAULT_MAX_DOCUMENTS = 100_000  # a streamed hub set is endless in practice; bound what we read
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
_BUILDER_BY_SUFFIX = {".txt": "text", ".text": "text", ".md": "text",
                      ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# Fixed and ordered, so the builtin corpus is the same on every run of one Python version. Modules with
# import side effects (antigravity, this, turtle/tkinter, idlelib) or platform-specific ones stay out.
BUILTIN_MODULES = (
    "abc argparse array ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd code codecs "
    "collections colorsys concurrent.futures configparser contextlib contextvars copy copyreg csv dataclasses "
    "datetime decimal difflib dis doctest email enum errno faulthandler filecmp fileinput fnmatch fractions "
    "ftplib functools gc getopt getpass gettext glob graphlib gzip hashlib heapq hmac html html.parser http "
    "http.client http.server imaplib importlib inspect io ipaddress itertools json keyword linecache locale "
    "logging lzma mailbox marshal math mimetypes mmap multiprocessing netrc numbers operator optparse os "
    "pathlib pdb pickle pickletools pkgutil platform plistlib poplib posixpath pprint profile pstats pty queue "
    "quopri random re reprlib rlcompleter runpy sched secrets select selectors shelve shlex shutil signal site "
    "smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess symtable sys sysconfig "
    "tabnanny tarfile tempfile textwrap threading time timeit token tokenize trace traceback tracemalloc types "
    "typing unicodedata unittest unittest.mock urllib.parse urllib.request uuid venv warnings wave weakref "
    "wsgiref xml.dom.minidom xml.etree.ElementTree xml.sax zipapp zipfile zipimport zlib zoneinfo"
).split()


def builtin_documents() -> list[str]:
    """pydoc's documentation topics (one document each, sorted by name), then for every module in
    BUILTIN_MODULES its docstring and the docstrings of the public classes and functions it defines
    (one document each). Needs no network; the text varies a little between Python versions."""
    from pydoc_data.topics import topics

    docs = [topics[name] for name in sorted(topics)]
    with warnings.catch_warnings():  # reading a docstring of typing.io & co. warns they are deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        for module_name in BUILTIN_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # e.g. a Python built without sqlite3 or lzma: skip, deterministically
                continue
            docs.append(inspect.getdoc(module) or "")
            for name, obj in sorted(vars(module).items()):
                defined_here = getattr(obj, "__module__", None) == module.__name__
                if name.startswith("_") or not defined_here or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                docs.append(inspect.getdoc(obj) or "")
    return [doc for doc in docs if doc.strip()]


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """"hf:owner/name[:config]" -> ("owner/name", config or None)."""
    if not source.startswith(HUB_PREFIX):
        raise DataError(f"source={source!r} is not a hub source; write it as 'hf:owner/name[:config]'")
    name, colon, config = source[len(HUB_PREFIX):].partition(":")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or (colon and not config):
        raise DataError(f"source={source!r} is not a valid hub data set; write it as 'hf:owner/name[:config]'")
    return name, config or None


def _builder_for(path: str) -> str:
    name = path.lower()
    for compression in _COMPRESSION:
        name = name.removesuffix(compression)
    builder = _BUILDER_BY_SUFFIX.get(Path(name).suffix)
    if builder is None:
        raise DataError(f"source={path!r} has an unknown format; use files ending in {sorted(_BUILDER_BY_SUFFIX)}")
    return builder


def _hub_documents(source: str, text_field: str, max_documents: int | None) -> list[str]:
    name, config = parse_hub_source(source)
    limit = max_documents or HUB_DEFAULT_MAX_DOCUMENTS
    try:
        stream = datasets.load_dataset(name, config, split="train", streaming=True)
        rows = iter(stream.take(limit))
        first = next(rows, None)
    except Exception as error:  # offline, gated, misspelled: one line beats a traceback from the hub client
        raise DataError(f"source={source!r}: could not stream it ({type(error).__name__}: {error}); "
                        "check the name and the network, or use 'builtin' or a local file") from error
    if first is None:
        return []
    if text_field not in first:
        raise DataError(f"text_field={text_field!r} is not a column of {source!r}; pick one of {sorted(first)}")
    return [first[text_field], *(row[text_field] for row in rows)]


def _files_digest(files: list[str]) -> str:
    """A hash of the files' names and contents. `datasets` keys its cache on path and mtime only, so a
    file rewritten with its old mtime (cp -p, rsync -a, tar) would silently load the old text."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.abspath(path).encode() + b"\0")
        with open(path, "rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()[:20]


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _local_documents(source: str, text_field: str, doc_separator: str | None, cache_dir: Path) -> list[str]:
    path = os.path.expanduser(source)
    # An existing file is read as named: glob would take "a[1].txt" for a pattern.
    files = [path] if os.path.isfile(path) else sorted(
        match for match in glob.glob(path, recursive=True) if os.path.isfile(match))
    if not files:
        raise DataError(f"source={source!r} matches no file; give 'builtin', 'hf:owner/name', "
                        "or an existing path or glob such as 'data/*.txt'")
    builders = {_builder_for(path) for path in files}
    if len(builders) > 1:
        raise DataError(f"source={source!r} mixes formats {sorted(builders)}; use a glob that matches one format")
    builder = builders.pop()
    # sample_by="document": one row per file, split into paragraphs below. (The text builder's own
    # "paragraph" mode splits on a bare "\n\n" only, so runs of blank lines would leave empty rows.)
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        # escaped: datasets expands data_files as patterns too
        dataset = datasets.load_dataset(builder, data_files=[glob.escape(path) for path in files], split="train",
                                        cache_dir=str(cache_dir / "datasets" / _files_digest(files)), **options)
    except Exception as error:  # datasets says only "An error occurred while generating the dataset"
        cause = _root_cause(error)
        raise DataError(f"source={source!r}: cannot read it as {builder} ({type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}); check the file's format and "
                        "encoding (UTF-8)") from error
    if builder == "text":
        if doc_separator is None:
            return list(dataset["text"])
        # Newlines at a paragraph's ends belong to the separator (a file's last one often ends in "\n");
        # indentation of its first line is kept.
        return [paragraph.strip("\n") for text in dataset["text"] for paragraph in re.split(doc_separator, text)]
    if text_field not in dataset.column_names:
        raise DataError(f"text_field={text_field!r} is not a column of {source!r}; "
                        f"pick one of {dataset.column_names}")
    return list(dataset[text_field])


def load_documents(source: str, *, text_field: str = "text", max_documents: int | None = None,
                   doc_separator: str | None = PARAGRAPHS, cache_dir: str | Path = ".cache/zoo") -> list[str]:
    """The corpus as a list of documents, in source order, without empty ones; the first
    `max_documents` when set. Plain-text files are cut into documents at `doc_separator` (a regex;
    None keeps one document per file); JSON/parquet rows are one document each."""
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents={max_documents} must be >= 1, or None for all")
    try:
        re.compile(doc_separator or "")
    except re.error as error:
        raise DataError(f"doc_separator={doc_separator!r} is not a valid regex ({error}); the default is "
                        f"{PARAGRAPHS!r}, None keeps one document per file") from error
    if source == "builtin":
        docs = builtin_documents()
    elif source.startswith(HUB_PREFIX):
        docs = _hub_documents(source, text_field, max_documents)
    else:
        docs = _local_documents(source, text_field, doc_separator, Path(cache_dir))
    docs = [doc for doc in docs if isinstance(doc, str) and doc.strip()][:max_documents]
    if not docs:
        raise DataError(f"source={source!r} holds no text (zero non-empty documents); point it at a corpus")
    return docs


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
    _check_val_fraction(val_fraction)
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


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 1); 0.05 is typical")


# ------------------------------------------------------------------------------------------- tokenizer

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
    epoch is skipped. state_dict() holds (epoch, position), so a resumed run draws the same next batch."""

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
                "world_size": self.world_size, "n_blocks": len(self.blocks_NT)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for field in ("seed", "batch_size", "world_size", "n_blocks"):
            if state[field] != self.state_dict()[field]:
                raise DataError(f"data state {field}={state[field]} differs from this run's "
                                f"{self.state_dict()[field]}; resume with the same data settings")
        self.epoch, self.position = state["epoch"], state["position"]


def val_batches(blocks_NT: torch.Tensor, *, batch_size: int, max_batches: int | None = None) -> list[torch.Tensor]:
    """The validation blocks in order, in batches of `batch_size` (the last may be smaller), at most
    `max_batches` of them: the same list on every call, so every evaluation scores the same tokens."""
    batches = [blocks_NT[i:i + batch_size] for i in range(0, len(blocks_NT), batch_size)]
    return batches[:max_batches]


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

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> list[torch.Tensor]:
        return val_batches(self.val_blocks, batch_size=batch_size, max_batches=max_batches)

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
    _check_val_fraction(val_fraction)
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
