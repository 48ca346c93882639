"""training/data.py on real text from ../shared/data and the builtin corpus: the tokenizer, seeded and
resumable batches split over ranks, the sources (builtin, local files, the hub), and bad input refused
in one line. CPU, no network, seconds."""

import os

# Tests never reach the hub; make any accidental attempt fail fast instead of waiting on a socket.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import socket  # noqa: E402

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import training.data as data_module  # noqa: E402
import training.split as split_module  # noqa: E402
from training.data import (  # noqa: E402
    DataError,
    Tokenizer,
    TokenizerError,
    TrainBatches,
    load_or_train_tokenizer,
    prepare_data,
)
from training.split import split_documents  # noqa: E402
from zoo.corpus import builtin_documents, load_documents, parse_hub_source  # noqa: E402

from _data import LAMBADA, SMALL, WORKS, cache_dir, works  # noqa: E402, F401  (fixtures)


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
