"""Tasks on local files that score exactly as lm-eval's hub tasks, and HellaSwag for the training loop.

Local tasks (`zoo eval --data-file TASK=PATH`) are not re-implementations: `local_task` loads
lm-eval's own YAML for the task (its `process_docs`, prompt, target delimiter, choices, metrics) and
changes only where the evaluation split comes from: `dataset_path: json` with `data_files` pointing
at the local JSON-lines file. Every line of task logic is lm-eval's, so a local score equals the hub
score whenever the file holds the hub split's records in the hub's order (../shared/data's
hellaswag_val.jsonl and lambada_openai_test.jsonl are the original releases the hub sets come from).

`hellaswag_accuracy` is the in-memory path for training: it reads the first `limit` records itself,
builds the same requests as lm-eval's task (lm-eval's `preprocess`, query + " " + ending), scores
them with `ZooLM.loglikelihood` (the code `zoo eval` runs) and computes acc / acc_norm as lm-eval's
multiple-choice `process_results` does. tests/test_evaluation_lm_eval.py checks both against lm-eval.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from lm_eval.api.instance import Instance
from torch import nn

from zoo.evaluation.lm import EvalError, ZooLM

# Task name -> its YAML under lm_eval/tasks/. Other tasks run from the hub (`zoo eval --tasks NAME`).
LOCAL_TASKS = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}
TARGET_DELIMITER = " "  # lm-eval's TaskConfig default, which hellaswag.yaml keeps


def local_task(name: str, path: str | Path):
    """lm-eval's task `name` with its evaluation split read from the JSON-lines file `path`."""
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    if name not in LOCAL_TASKS:
        raise EvalError(f"--data-file {name}=...: no local version of task {name!r}; "
                        f"local files work for {', '.join(LOCAL_TASKS)} (other tasks load from the hub)")
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--data-file {name}={path}: no such file")
    config = load_yaml(Path(lm_eval.tasks.__file__).parent / LOCAL_TASKS[name], resolve_func=True)
    split = config.get("test_split") or config["validation_split"]
    for key in ("tag", "group", "task_list"):  # what lm-eval's TaskFactory strips before building a task
        config.pop(key, None)
    config.update(
        dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(path.resolve())}},
        # Only the evaluated split exists locally (zero-shot: no few-shot split is needed).
        training_split=None, fewshot_split=None,
        validation_split=split if config.get("validation_split") == split else None,
    )
    config["metadata"] = {**config.get("metadata", {}), "data_file": str(path.resolve())}
    try:
        return ConfigurableTask(config=config)
    except Exception as err:  # a malformed file surfaces deep inside datasets or the task's templates
        raise EvalError(f"--data-file {name}={path}: cannot read it as lm-eval's {name} data "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err


# ----------------------------------------------------------------------------- HellaSwag in memory


def hellaswag_docs(path: str | Path, limit: int | None = None) -> list[dict]:
    """The first `limit` records of a HellaSwag JSON-lines file as lm-eval's task sees them:
    {"query", "choices", "gold"} (lm_eval/tasks/hellaswag/utils.py's process_docs, its `preprocess`)."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"HellaSwag file {path} does not exist")
    docs, offset = [], 0  # offset: the file's bytes before the current line
    with path.open("rb") as lines:  # decoded line by line: an error names its line and byte, read-ahead aside
        for number, raw in enumerate(lines, 1):
            if limit is not None and len(docs) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise EvalError(f"HellaSwag file {path}, line {number}: not UTF-8 text ({err.reason} at byte "
                                f"{offset + err.start}); give a JSON-lines file such as "
                                "../shared/data/hellaswag_val.jsonl") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
                docs.append({
                    "query": preprocess(doc["activity_label"] + ": " + ctx),
                    "choices": [preprocess(ending) for ending in doc["endings"]],
                    "gold": int(doc["label"]),
                })
            except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError is a ValueError
                raise EvalError(f"HellaSwag file {path}, line {number}: not a HellaSwag record "
                                f"({type(err).__name__}: {err}); each line needs activity_label, ctx_a, ctx_b, "
                                "endings and label, as in ../shared/data/hellaswag_val.jsonl") from None
    return docs


def hellaswag_requests(docs: list[dict]) -> list[Instance]:
    """One loglikelihood request per (doc, ending): (query, " " + ending), as lm-eval builds them."""
    return [
        Instance(request_type="loglikelihood", doc=doc, arguments=(doc["query"], f"{TARGET_DELIMITER}{choice}"),
                 idx=i, metadata=("hellaswag", doc_id, 1))
        for doc_id, doc in enumerate(docs)
        for i, choice in enumerate(doc["choices"])
    ]


def check_hellaswag_fits(model: nn.Module, tokenizer, path: str | Path, limit: int, max_length: int) -> None:
    """EvalError unless every ending of the first `limit` HellaSwag items of `path`, tokenized as
    `hellaswag_accuracy` tokenizes it, fits in `max_length` tokens (a context is left-truncated, an
    ending cannot be): checked before training, not when the first evaluation stops the run."""
    docs = hellaswag_docs(path, limit)
    requests = hellaswag_requests(docs)
    # The encoding loglikelihood does (lm-eval's TemplateLM: an empty context, trailing spaces), counted
    # instead of scored.
    counted = _ContinuationLengths(model=model, tokenizer=tokenizer, max_length=max_length)
    lengths = {}  # item -> its longest ending, in tokens
    for request, (n, _) in zip(requests, counted.loglikelihood(requests, disable_tqdm=True)):
        item = request.metadata[1]
        lengths[item] = max(lengths.get(item, 0), n)
    too_long = [item for item, n in lengths.items() if n > max_length]
    if too_long:
        raise HellaSwagTooLong(len(too_long), len(docs), too_long[0], lengths[too_long[0]], max(lengths.values()),
                               max_length)


class _ContinuationLengths(ZooLM):
    """ZooLM whose loglikelihood returns each request's continuation length in tokens, not its score."""

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[int, bool]]:
        return [(len(continuation), False) for _, _, continuation in requests]


class HellaSwagTooLong(EvalError):
    """Some HellaSwag endings do not fit the scoring length; the fields say which and by how much."""

    def __init__(self, count: int, items: int, first: int, first_tokens: int, longest: int, max_length: int):
        self.count, self.items, self.first, self.first_tokens = count, items, first, first_tokens
        self.longest, self.max_length = longest, max_length
        super().__init__(f"{count} of the first {items} HellaSwag items have an ending longer than {max_length} "
                         f"tokens (item {first}: {first_tokens}; the longest: {longest}), which cannot be scored")


def multiple_choice_scores(logprobs: list[float], choices: list[str], gold: int) -> tuple[float, float]:
    """(acc, acc_norm) of one item, as lm-eval's multiple-choice process_results: acc_norm divides each
    choice's log-probability by the choice's length in characters (the delimiter not counted); ties go
    to the first choice (np.argmax)."""
    logprobs = np.array(logprobs)
    lengths = np.array([float(len(choice)) for choice in choices])
    return float(np.argmax(logprobs) == gold), float(np.argmax(logprobs / lengths) == gold)


def hellaswag_accuracy(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    *,
    max_length: int | None = None,
) -> dict:
    """{"acc", "acc_norm", "n"} of an in-memory model on the first `limit` HellaSwag items of `path`.

    `tokenizer` needs encode/decode/eos_id (zoo.tokenizer.Tokenizer); pass `max_length` =
    spec.data.seq_len so long items are truncated as `zoo eval` truncates them. The model's
    train/eval mode is restored afterwards."""
    docs = hellaswag_docs(path, limit)
    if not docs:
        raise EvalError(f"HellaSwag file {path} holds no records")
    lm = ZooLM(model=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size)
    logprobs = [logprob for logprob, _ in lm.loglikelihood(hellaswag_requests(docs), disable_tqdm=True)]
    scores, start = [], 0
    for doc in docs:
        n = len(doc["choices"])
        scores.append(multiple_choice_scores(logprobs[start:start + n], doc["choices"], doc["gold"]))
        start += n
    acc, acc_norm = np.mean(scores, axis=0)
    return {"acc": float(acc), "acc_norm": float(acc_norm), "n": len(docs)}
