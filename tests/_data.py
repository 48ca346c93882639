"""What tests/test_data*.py share: the data files, a slice of Shakespeare's works prepared once per
test module, and its tokenizer cache."""

from pathlib import Path

import pytest

from training.data import prepare_data

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
