"""HellaSwag in memory, for the training loop: the numbers lm-eval's `hellaswag` task gives.

`hellaswag_accuracy` reads the first `limit` records of a HellaSwag JSON-lines file itself, builds the
same requests as lm-eval's task (lm-eval's `preprocess`, query + " " + ending), scores them with
`ZooLM.loglikelihood` (the code `zoo eval` runs) and computes acc / acc_norm as lm-eval's
multiple-choice `process_results` does. tests/test_evaluation_lm_eval.py checks it against lm-eval's
task read from the same file (zoo.evaluation.local_tasks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from lm_eval.api.instance import Instance
from torch import nn

from zoo.evaluation.lm import EvalError, ZooLM

TARGET_DELIMITER = " "  # lm-eval's TaskConfig default, which hellaswag.yaml keeps


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
