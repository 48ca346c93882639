"""What tests/test_evaluation*.py share: a tiny run folder with its tokenizer, the zoo's lm-eval class
on it, lm-eval's task registry restricted to the tasks the tests read from ../shared/data, and
lm-eval's HellaSwag task read from the local file."""

import os
from pathlib import Path

import lm_eval.tasks
import pytest
from lm_eval.tasks import TaskManager

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
SCIQ = DATA / "sciq_val.jsonl"
WINOGRANDE = DATA / "winogrande_xl_val.jsonl"
LOCAL_FILES = {"hellaswag": HELLASWAG, "lambada_openai": LAMBADA, "sciq": SCIQ, "winogrande": WINOGRANDE}
# lm-eval's own task folders for these tasks: its TaskManager indexes them in milliseconds (all ~15k
# task YAMLs take seconds; the CLI tests, marked slow, use the whole index).
TASK_DIRS = ("hellaswag", "lambada", "sciq", "winogrande", "arc", "legalbench", "squadv2")
VOCAB = 512
MAX_LEN = 128  # model.max_seq_len; most HellaSwag items fit, the longest are left-truncated in both classes
TRAIN_LEN = MAX_LEN // 2  # data.seq_len, shorter: evaluation must not take it for the model's context
N_ITEMS = 20  # HellaSwag items in the lm-eval comparisons
LOGPROB_TOL = 1e-4  # sums of ~20-100 fp32 log-probs of magnitude ~6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder, model, spec, tokenizer): a tiny deepseek_glm4 (MLA + sigmoid MoE) with a tokenizer
    trained on a slice of Tiny Shakespeare."""
    paragraphs = [p for p in (DATA / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()][:1500]
    tokenizer, _ = load_or_train_tokenizer(paragraphs, vocab_size=VOCAB, cache_dir=tmp_path_factory.mktemp("cache"))
    changes = {"model.vocab_size": VOCAB, "model.max_seq_len": MAX_LEN, "data.seq_len": TRAIN_LEN}
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
def manager():
    root = Path(lm_eval.tasks.__file__).parent
    return TaskManager(include_path=[str(root / name) for name in TASK_DIRS], include_defaults=False)


@pytest.fixture(scope="module")
def hellaswag_task(manager):
    return local_task("hellaswag", HELLASWAG, manager=manager, limit=N_ITEMS)


@pytest.fixture(scope="module")
def export(run, tmp_path_factory):
    """The run exported by `zoo export-hf`'s code: weights, config and its tokenizer files."""
    from zoo.interop.hf import export_hf

    out = tmp_path_factory.mktemp("hf")
    export_hf(run[0], out)
    return out
