"""Exports carry the run's tokenizer: `AutoTokenizer.from_pretrained(EXPORT)` encodes any text to the
ids the run's SentencePiece model gives (whitespace, newlines and unicode included), decodes them to
the same text, and has the zoo's special tokens; lm-eval's `hf` class runs on the folder alone.
CPU, no network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from training.data import load_or_train_tokenizer  # noqa: E402
from zoo.interop.hf_tokenizer import write_hf_tokenizer  # noqa: E402

from _evaluation import DATA, HELLASWAG, OFFLINE_ENV, SCIQ, export, run  # noqa: E402, F401  (fixtures)

# Text SentencePiece treats specially or that a converter could normalise: runs of spaces, tabs,
# newlines and CRLF, text that starts or ends with spaces, SentencePiece's own space symbol, the special
# pieces' spellings, control characters, combining marks, characters outside the vocabulary (bytes).
EDGE_CASES = [
    "", " ", "   ", "\n", "\n\n\n", "\t\tindented", "  leading", "trailing  ", "a  b   c", "a\r\nb\rc",
    "x \n y", "\u2581", "\u2581\u2581 x", "</s> <unk> <s>", "</s>", "\x00\x01\x7f", "e\u0301 vs \u00e9",
    "\u00a0nbsp\u200bzero-width", "ünïcödé 日本語 😀 𝔘𝔫𝔦", "1234567890 3.14159 -0.5e10", "def f(x):\n    return x  # ok\n",
]


def _samples(seed: int = 0) -> list[str]:
    """Slices of the shared corpora: Shakespeare's works, the Linux documentation, HellaSwag's text."""
    rng = random.Random(seed)
    works = (DATA / "shakespeare_works.txt").read_text()
    texts = [works[start:start + rng.randrange(1, 2000)] for start in
             (rng.randrange(len(works) - 2000) for _ in range(150))]
    docs = pq.read_table(DATA / "linux_docs.parquet", columns=["text"]).column("text").to_pylist()
    texts += rng.sample(docs, 60)
    with open(HELLASWAG) as lines:
        records = [json.loads(next(lines)) for _ in range(100)]
    texts += [f"{r['activity_label']}: {r['ctx']} {ending}" for r in records for ending in r["endings"]]
    return texts + EDGE_CASES


@pytest.fixture(scope="module")
def linux_docs_tokenizer(tmp_path_factory):
    """A second vocabulary, trained on code-heavy text (runs of spaces, punctuation, markup)."""
    docs = pq.read_table(DATA / "linux_docs.parquet", columns=["text"]).column("text").to_pylist()
    tokenizer, _ = load_or_train_tokenizer(docs[:100], vocab_size=1024, cache_dir=tmp_path_factory.mktemp("cache"))
    return tokenizer


def _check_same_ids(tokenizer, hf):
    for text in _samples():
        ids = tokenizer.encode(text)
        assert hf.encode(text) == ids and hf(text)["input_ids"] == ids, repr(text[:80])
        assert hf.decode(ids) == tokenizer.decode(ids), repr(text[:80])


def test_the_exported_tokenizer_encodes_as_the_runs_sentencepiece_model(run, export):
    assert {"tokenizer.json", "tokenizer_config.json"} <= {path.name for path in export.iterdir()}
    _check_same_ids(run[3], AutoTokenizer.from_pretrained(str(export), local_files_only=True))


def test_the_conversion_is_exact_for_another_vocabulary(linux_docs_tokenizer, tmp_path):
    written = write_hf_tokenizer(linux_docs_tokenizer, tmp_path, model_max_length=256)
    assert written == ["tokenizer.json", "tokenizer_config.json"]
    _check_same_ids(linux_docs_tokenizer, AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True))


def test_special_tokens_are_the_zoos(run, export):
    """No BOS (nothing is added to an encoding; a document starts after EOS), EOS </s>, padding with
    <unk> (the id zoo eval pads with), in the tokenizer and in config.json alike."""
    tokenizer, spec = run[3], run[2]
    hf = AutoTokenizer.from_pretrained(str(export), local_files_only=True)
    assert hf.bos_token is None and hf.bos_token_id is None
    assert (hf.eos_token, hf.eos_token_id) == ("</s>", tokenizer.eos_id)
    assert (hf.pad_token, hf.pad_token_id) == ("<unk>", tokenizer.unk_id) and hf.unk_token_id == tokenizer.unk_id
    assert hf.model_max_length == spec.model.max_seq_len
    config = json.loads((export / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        None, tokenizer.eos_id, tokenizer.unk_id)
    assert hf("To be")["input_ids"] == tokenizer.encode("To be")


@pytest.mark.slow  # a subprocess that builds lm-eval's whole task index
def test_lm_eval_cli_runs_the_export_folder_alone(export, tmp_path):
    """`lm_eval --model hf --model_args pretrained=EXPORT`, offline: SciQ from the local file through a
    task YAML that includes lm-eval's own sciq.yaml and swaps only its data source."""
    import lm_eval.tasks

    sciq_yaml = os.path.join(os.path.dirname(lm_eval.tasks.__file__), "sciq", "sciq.yaml")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sciq_local.yaml").write_text(
        f"include: {sciq_yaml}\ntask: sciq_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {SCIQ}\ntraining_split: null\nvalidation_split: null\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},dtype=float32",
         "--device", "cpu", "--batch_size", "8", "--include_path", str(tmp_path / "tasks"), "--tasks", "sciq_local",
         "--limit", "10", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env=OFFLINE_ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sciq_local" in proc.stdout and "acc_norm" in proc.stdout, proc.stdout
