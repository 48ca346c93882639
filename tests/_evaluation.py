"""What tests/test_evaluation*.py share: a tiny run folder with its tokenizer, the zoo's lm-eval class
on it, and lm-eval's HellaSwag task read from the local file."""

import os
from pathlib import Path

import pytest

import zoo
from training.data import load_or_train_tokenizer
from zoo import presets
from zoo.checkpoint import save_run_folder
from zoo.evaluation import ZooLM, local_task
from zoo.overrides import with_changes

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# CLI subprocesses: no hub, and one thread (as the tests in this process, pytest's one_thread).
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
HELLASWAG = DATA / "hellaswag_val.jsonl"
LAMBADA = DATA / "lambada_openai_test.jsonl"
VOCAB = 512
MAX_LEN = 128  # most HellaSwag items fit; the longest are left-truncated, identically in both classes
N_ITEMS = 20  # HellaSwag items in the lm-eval comparisons
LOGPROB_TOL = 1e-4  # sums of ~20-100 fp32 log-probs of magnitude ~6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder, model, spec, tokenizer): a tiny deepseek_glm4 (MLA + sigmoid MoE) with a tokenizer
    trained on a slice of Tiny Shakespeare."""
    paragraphs = [p for p in (DATA / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()][:1500]
    tokenizer, _ = load_or_train_tokenizer(paragraphs, vocab_size=VOCAB, cache_dir=tmp_path_factory.mktemp("cache"))
    changes = {"model.vocab_size": VOCAB, "model.max_seq_len": 2 * MAX_LEN, "data.seq_len": MAX_LEN}
    spec = with_changes(presets.get("deepseek_glm4", tiny=True), changes)
    model = zoo.build(spec).eval()
    run_dir = tmp_path_factory.mktemp("run")
    save_run_folder(model, spec, run_dir)
    tokenizer.save(run_dir)
    return run_dir, model, spec, tokenizer


@pytest.fixture(scope="module")
def lm(run):
    return ZooLM(str(run[0]), batch_size=8)


@pytest.fixture(scope="module")
def hellaswag_task():
    return local_task("hellaswag", HELLASWAG)
