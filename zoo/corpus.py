"""Corpora as lists of documents: the builtin text, local files (via `datasets`), hub data sets.

    docs = load_documents(source)                 # list[str], one entry per document, in source order

Sources (`source=`):
    "builtin"                 text that ships with every CPython: pydoc's topics + stdlib docstrings
    "path/a.txt", "d/*.jsonl" local text / JSON / JSONL / parquet files or a glob, via `datasets`
    "hf:owner/name[:config]"  a hub data set, streamed (needs network), first `max_documents` rows
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import inspect
import os
import re
import warnings
from pathlib import Path

import datasets


class DataError(ValueError):
    """Bad data settings or a corpus that cannot make a run; the message names the field and the fix."""


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
