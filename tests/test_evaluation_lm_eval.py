"""Evaluation through lm-eval itself: HellaSwag's documents and requests are lm-eval's, HellaSwag in
memory equals HellaSwag through lm-eval, lm-eval's `hf` class on the exported model gives the same
acc and acc_norm, and `zoo eval` prints, writes and logs the numbers the model gives. CPU, no network
(the hub is switched off below)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from zoo.cli import main  # noqa: E402
from zoo.evaluation import ZooLM, hellaswag_accuracy, hellaswag_docs  # noqa: E402
from zoo.evaluation.harness import perplexity  # noqa: E402
from zoo.evaluation.tasks import hellaswag_requests  # noqa: E402

from _evaluation import (  # noqa: E402, F401  (fixtures)
    HELLASWAG, LAMBADA, LOGPROB_TOL, N_ITEMS, OFFLINE_ENV, hellaswag_task, lm, run,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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


def _evaluate(lm, task, **kwargs):
    return simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_defaults=False),
                           limit=N_ITEMS, bootstrap_iters=0, **kwargs)


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


def test_cross_check_against_lm_evals_hf_class_on_the_exported_model(run, lm, hellaswag_task, tmp_path):
    """The exported model, scored by lm-eval's own `hf` class with a transformers tokenizer read from
    the same SentencePiece file, gives the zoo class's acc, acc_norm and per-choice log-likelihoods."""
    from lm_eval.models.huggingface import HFLM
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from zoo.interop.hf import to_hf

    run_dir, model, spec, tokenizer = run
    to_hf(model, spec, tmp_path / "hf", special_tokens={"eos_token_id": tokenizer.eos_id})
    # legacy=True: encode with the SentencePiece model as it is (no dummy prefix, no BOS): our encoding.
    hf_tokenizer = SentencePieceBackend(vocab_file=str(run_dir / "tokenizer.model"), legacy=True,
                                        unk_token="<unk>", eos_token="</s>", bos_token=None)
    for doc in hellaswag_docs(HELLASWAG, limit=N_ITEMS):
        for text in (doc["query"], *(doc["query"] + " " + choice for choice in doc["choices"])):
            assert hf_tokenizer.encode(text) == tokenizer.encode(text), text
    hf = HFLM(pretrained=str(tmp_path / "hf"), tokenizer=hf_tokenizer, max_length=spec.data.seq_len,
              batch_size=8, device="cpu", dtype="float32")

    hf_out, zoo_out = (_evaluate(model_, hellaswag_task, log_samples=True) for model_ in (hf, lm))
    for metric in ("acc,none", "acc_norm,none"):
        assert hf_out["results"]["hellaswag"][metric] == zoo_out["results"]["hellaswag"][metric]

    def logprobs(out):
        return [[resp[0][0] for resp in sample["resps"]] for sample in out["samples"]["hellaswag"]]

    assert len(logprobs(zoo_out)) == N_ITEMS
    for hf_item, zoo_item in zip(logprobs(hf_out), logprobs(zoo_out)):
        assert hf_item == pytest.approx(zoo_item, abs=LOGPROB_TOL)


# ----------------------------------------------------------------------------- the CLI


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
    # truncated at data.seq_len as `zoo eval` truncates; held-out perplexity through the zoo class).
    _, model, spec, tokenizer = run
    in_memory = hellaswag_accuracy(model, tokenizer, HELLASWAG, limit=8, max_length=spec.data.seq_len)
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
    (["eval", "{missing}", "--tasks", "hellaswag", "--data-file", f"hellaswag={HELLASWAG}"], ["does not exist"]),
    (["eval", "{run}", "--tasks", "hellaswag", "--data-file", "hellaswag"], ["TASK=PATH"]),
    (["eval", "{run}", "--tasks", "arc_easy", "--data-file", "arc_easy=x.jsonl"], ["no local version", "hellaswag"]),
    (["eval", "{run}", "--tasks", "hellaswag", "--data-file", "hellaswag={missing}"], ["no such file"]),
    (["eval", "{run}"], ["nothing to evaluate"]),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [  # lm-eval's task index: seconds to load
        (["eval", "{run}", "--tasks", "hellaswg"], ["unknown task 'hellaswg'", "did you mean hellaswag"]),
        (["eval", "{run}", "--tasks", "hellaswag"], ["from the hub", "offline, use --data-file hellaswag=PATH"]),
    ]),
])
def test_cli_eval_bad_input_is_one_line_exit_2(run, tmp_path, capsys, args, words):
    args = [a.format(run=run[0], missing=tmp_path / "nope") for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err
