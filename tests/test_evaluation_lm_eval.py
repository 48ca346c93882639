"""Evaluation through lm-eval itself: HellaSwag's documents and requests are lm-eval's, HellaSwag in
memory equals HellaSwag through lm-eval, lm-eval's `hf` class on the exported folder alone gives the
same accuracy on HellaSwag, LAMBADA, SciQ and WinoGrande read from local files, and `zoo eval` prints,
writes and logs the numbers the model gives. CPU, no network (the hub is switched off below)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from zoo.cli import main  # noqa: E402
from zoo.evaluation import ZooLM, hellaswag_accuracy, hellaswag_docs, local_task  # noqa: E402
from zoo.evaluation.harness import perplexity  # noqa: E402
from zoo.evaluation.tasks import hellaswag_requests  # noqa: E402

from _evaluation import (  # noqa: E402, F401  (fixtures)
    HELLASWAG, LAMBADA, LOCAL_FILES, LOGPROB_TOL, N_ITEMS, OFFLINE_ENV, SCIQ, WINOGRANDE, export, hellaswag_task, lm,
    manager, run,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CLI_ITEMS = 4  # items per task in the in-process CLI test (the cross-check compares N_ITEMS)


# ----------------------------------------------------------------------------- HellaSwag vs lm-eval's task


def test_hellaswag_docs_and_requests_are_lm_evals(hellaswag_task):
    ours = hellaswag_docs(HELLASWAG)
    theirs = list(hellaswag_task.validation_docs())
    assert len(ours) == len(theirs) == 10042
    for mine, doc in zip(ours, theirs):
        assert mine == {"query": doc["query"], "choices": doc["choices"], "gold": doc["gold"]}
    assert hellaswag_docs(HELLASWAG, limit=5) == ours[:5]

    hellaswag_task.build_all_requests(limit=N_ITEMS)
    theirs = sorted((i.doc_id, i.idx, i.arguments) for i in hellaswag_task.instances)
    mine = sorted((i.doc_id, i.idx, i.arguments) for i in hellaswag_requests(ours[:N_ITEMS]))
    assert mine == theirs


def _evaluate(lm, task, limit=N_ITEMS, **kwargs):
    return simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_defaults=False),
                           limit=limit, bootstrap_iters=0, **kwargs)


def test_hellaswag_accuracy_in_memory_equals_the_zoo_class_through_lm_eval(run, lm, hellaswag_task):
    _, model, spec, tokenizer = run
    through_lm_eval = _evaluate(lm, hellaswag_task, log_samples=False)["results"]["hellaswag"]
    model.train()
    in_memory = hellaswag_accuracy(model, tokenizer, HELLASWAG, limit=N_ITEMS, batch_size=8,
                                   max_length=spec.model.max_seq_len)
    assert model.training, "hellaswag_accuracy must hand the model back in the mode it found it"
    model.eval()
    assert in_memory == {"acc": through_lm_eval["acc,none"], "acc_norm": through_lm_eval["acc_norm,none"],
                         "n": N_ITEMS}


@pytest.fixture(scope="module")
def hf_lm(export):
    """lm-eval's own `hf` class on the export folder alone: its weights, config and tokenizer files (the
    context from config.json's max_position_embeddings, the tokenizer from AutoTokenizer)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(export), batch_size=8, device="cpu", dtype="float32")


@pytest.mark.parametrize("name", LOCAL_FILES)
def test_cross_check_against_lm_evals_hf_class_on_the_exported_model(run, lm, hf_lm, manager, name):
    """The same task read from the same file, scored by the zoo class on the run folder and by lm-eval's
    `hf` class on the export: the same accuracy to the last digit and the same log-likelihood per
    request (within fp32 rounding: the two models sum in different orders)."""
    assert hf_lm.max_length == lm.max_length == run[2].model.max_seq_len
    task = local_task(name, LOCAL_FILES[name], manager=manager, limit=N_ITEMS)
    hf_out, zoo_out = (_evaluate(model, task, log_samples=True) for model in (hf_lm, lm))
    hf_metrics, zoo_metrics = hf_out["results"][name], zoo_out["results"][name]
    assert "acc,none" in zoo_metrics
    for metric, value in zoo_metrics.items():
        if metric == "acc,none" or metric == "acc_norm,none":
            assert hf_metrics[metric] == value, metric
        elif isinstance(value, float) and "stderr" not in metric:  # lambada's perplexity
            assert hf_metrics[metric] == pytest.approx(value, rel=1e-4), metric

    def logprobs(out):
        return [[resp[0][0] for resp in sample["resps"]] for sample in out["samples"][name]]

    assert len(logprobs(zoo_out)) == N_ITEMS
    for hf_item, zoo_item in zip(logprobs(hf_out), logprobs(zoo_out)):
        assert hf_item == pytest.approx(zoo_item, abs=LOGPROB_TOL)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def small_registry(manager, monkeypatch):
    """`zoo eval` in this process with lm-eval's registry restricted to the tests' task folders."""
    import zoo.evaluation.harness

    monkeypatch.setattr(zoo.evaluation.harness, "task_manager", lambda: manager)


def test_cli_eval_scores_any_task_from_a_local_file(run, lm, manager, small_registry, tmp_path, capsys):
    """SciQ and WinoGrande, as in the acceptance command: lm-eval's table, and the numbers the zoo class
    gives on the same tasks in this process."""
    output, run_dir = tmp_path / "results.json", tmp_path / "run"
    shutil.copytree(run[0], run_dir)  # its TensorBoard log is this test's, not the module's run folder's
    assert main(["eval", str(run_dir), "--tasks", "sciq,winogrande", "--data-file", f"sciq={SCIQ}",
                 "--data-file", f"winogrande={WINOGRANDE}", "--limit", str(CLI_ITEMS), "--output", str(output)]) == 0
    table = capsys.readouterr().out
    assert "|Tasks|Version|Filter|n-shot|Metric|" in table.replace(" ", "")  # lm-eval's make_table
    for word in ("sciq", "winogrande", "acc_norm"):
        assert word in table
    record = json.loads(output.read_text())
    for name, path in (("sciq", SCIQ), ("winogrande", WINOGRANDE)):
        theirs = _evaluate(lm, local_task(name, path, manager=manager), limit=CLI_ITEMS)["results"][name]
        assert record["tasks"][name]["n"] == CLI_ITEMS and record["tasks"][name]["acc"] == theirs["acc,none"]


@pytest.mark.slow  # a subprocess, and lm-eval's whole task index (seconds to build)
def test_cli_eval_prints_a_table_writes_json_and_tensorboard(run, tmp_path):
    run_dir = run[0]
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("O Romeo, Romeo! wherefore art thou Romeo?\n\nDeny thy father and refuse thy name.\n")
    output = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "zoo.cli", "eval", str(run_dir), "--tasks", "hellaswag,lambada_openai",
         "--data-file", f"hellaswag={HELLASWAG}", "--data-file", f"lambada_openai={LAMBADA}", "--limit", "8",
         "--ppl", str(heldout), "--output", str(output)],
        capture_output=True, text=True, timeout=300, env=OFFLINE_ENV)
    assert proc.returncode == 0, proc.stderr
    for word in ("hellaswag", "acc_norm", "lambada_openai", "perplexity", "bits/byte"):
        assert word in proc.stdout
    record = json.loads(output.read_text())
    assert record["tasks"]["hellaswag"]["n"] == 8 and record["tasks"]["lambada_openai"]["n"] == 8
    assert record["tasks"]["lambada_openai"]["perplexity"] > 1 and record["perplexity"]["documents"] == 2
    # The CLI's numbers are the model's: the same run folder scored in this process (HellaSwag in memory,
    # at model.max_seq_len as `zoo eval` scores it; held-out perplexity through the zoo class).
    _, model, spec, tokenizer = run
    in_memory = hellaswag_accuracy(model, tokenizer, HELLASWAG, limit=8, max_length=spec.model.max_seq_len)
    assert {m: record["tasks"]["hellaswag"][m] for m in ("acc", "acc_norm", "n")} == in_memory
    ppl = perplexity(ZooLM(str(run_dir)), heldout)
    for key in ("tokens", "bytes"):
        assert record["perplexity"][key] == ppl[key]
    for key in ("nll_per_token", "token_perplexity", "bits_per_byte"):
        assert record["perplexity"][key] == pytest.approx(ppl[key], rel=1e-6)  # fp32 log-probs, same batches

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("eval/")}
    expected = {f"eval/{task}/{metric}": value for task, metrics in record["tasks"].items()
                for metric, value in metrics.items() if metric != "n" and not metric.endswith("_stderr")}
    expected.update({f"eval/ppl/{key}": record["perplexity"][key]
                     for key in ("token_perplexity", "bits_per_byte", "nll_per_token")})
    assert {"eval/hellaswag/acc", "eval/hellaswag/acc_norm", "eval/lambada_openai/acc"} <= set(expected)
    assert logged == pytest.approx(expected, rel=1e-6)  # TensorBoard stores float32 (24-bit mantissa, ~6e-8)


@pytest.mark.parametrize("args,words", [
    (["eval", "{missing}", "--tasks", "sciq", "--data-file", f"sciq={SCIQ}"], ["does not exist"]),
    (["eval", "{run}", "--tasks", "hellaswag", "--data-file", "hellaswag"], ["TASK=PATH"]),
    (["eval", "{run}", "--tasks", "sciq", "--data-file", "sciq={missing}"], ["no such file"]),
    (["eval", "{run}", "--tasks", "sciq", "--data-file", f"sciq={HELLASWAG.parent / 'README.md'}"], ["a .md file"]),
    (["eval", "{run}", "--tasks", "sciq", "--data-file", f"winogrande={WINOGRANDE}"], ["winogrande is not in --tasks"]),
    (["eval", "{run}"], ["nothing to evaluate"]),
    (["eval", "{run}", "--ppl", str(HELLASWAG), "--max-length", "999"], ["max_length=999", "must be in [1, 128]"]),
    (["eval", "{run}", "--tasks", "sciqq"], ["unknown task 'sciqq'", "did you mean sciq"]),
    (["eval", "{run}", "--tasks", "sciq", "--data-file", f"sciq={WINOGRANDE}"],
     ["does not fit lm-eval's sciq task", "its fields: sentence, option1, option2, answer"]),
    (["eval", "{run}", "--tasks", "legalbench", "--data-file", f"legalbench={SCIQ}"], ["legalbench is a group of"]),
    (["eval", "{run}", "--tasks", "hellaswag"], ["from the hub", "--data-file hellaswag=PATH"]),
])
def test_cli_eval_bad_input_is_one_line_exit_2(run, small_registry, tmp_path, capsys, args, words):
    args = [a.format(run=run[0], missing=tmp_path / "nope") for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err


@pytest.mark.slow  # lm-eval's whole task index: seconds to build
@pytest.mark.parametrize("args,words", [
    (["--tasks", "hellaswg"], ["unknown task 'hellaswg'", "did you mean hellaswag"]),
    (["--tasks", "mmlu", "--data-file", f"mmlu={SCIQ}"], ["mmlu is a group of", "each with its own --data-file"]),
])
def test_cli_eval_finds_tasks_in_lm_evals_whole_registry(run, capsys, args, words):
    assert main(["eval", str(run[0]), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(word in err for word in words), err
