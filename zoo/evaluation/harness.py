"""`zoo eval`: lm-eval tasks and held-out perplexity for a run folder; a table, a JSON file, TensorBoard.

    tasks = prepare_tasks(["sciq"], {"sciq": "../shared/data/sciq_val.jsonl"}, limit=50)
    results = run_tasks(lm, tasks, limit=50)
    ppl = perplexity(lm, "heldout.txt")

Every task name is looked up in lm-eval's own registry (TaskManager). Tasks named in `data_files`
are lm-eval's tasks reading the local file (see local_tasks.py); the rest load from the hub, for
users who are online.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from pathlib import Path

from lm_eval.api.instance import Instance

from zoo.evaluation.lm import EvalError, ZooLM
from zoo.evaluation.local_tasks import check_data_file, local_task, task_entry, task_manager
from zoo.generate import check_run_folder

# Enough draws for a stable stderr of perplexity-type metrics (lm-eval's default of 100,000 takes
# minutes on a laptop); `mean` metrics such as acc have a closed-form stderr and ignore this.
BOOTSTRAP_ITERS = 1000
TENSORBOARD_PREFIX = "eval"
HUB_MODULES = ("huggingface_hub", "requests", "urllib3", "httpx", "fsspec")  # where hub and network errors come from


def _from_the_hub(err: BaseException | None) -> bool:
    """Whether an error (or one it came from) is the hub or the network failing."""
    while err is not None:
        if isinstance(err, ConnectionError) or type(err).__module__.split(".")[0] in HUB_MODULES:
            return True
        err = err.__cause__ or err.__context__
    return False


def check_task_names(tasks: list[str], data_files: dict[str, str]) -> None:
    """Fail fast, before lm-eval's registry loads, on what can be judged without it."""
    for name in data_files:
        if name not in tasks:
            raise EvalError(f"--data-file {name}=...: {name} is not in --tasks ({','.join(tasks) or 'none'})")
        check_data_file(name, data_files[name])


def prepare_tasks(tasks: list[str], data_files: dict[str, str] | None = None, *, limit: int | None = None,
                  manager=None) -> list:
    """What `run_tasks` takes: for a name in `data_files`, lm-eval's task reading that file (built now,
    so a file that does not fit the task fails before any model loads); for any other, the name, checked
    against lm-eval's registry (a hub task stays a name, so that a group such as mmlu keeps its
    aggregate score)."""
    data_files = data_files or {}
    check_task_names(tasks, data_files)
    manager = manager or task_manager()
    prepared = []
    for name in tasks:
        task_entry(name, manager)
        prepared.append(local_task(name, data_files[name], manager=manager, limit=limit) if name in data_files
                        else name)
    return prepared


def run_tasks(lm: ZooLM, tasks: list, *, limit: int | None = None, manager=None) -> dict:
    """lm-eval's results dict (`results`, `n-samples`, ...) for `tasks` (hub names, or prepare_tasks'
    list), zero-shot unless a task's YAML says otherwise."""
    from lm_eval import simple_evaluate

    hub = [task for task in tasks if isinstance(task, str)]
    try:
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager or task_manager(), limit=limit,
                               bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
    except Exception as err:  # offline, gated or renamed data sets fail deep inside datasets/huggingface_hub
        if not (hub and _from_the_hub(err)):
            raise
        raise EvalError(f"could not load {', '.join(hub)} from the hub ({type(err).__name__}); offline, give "
                        f"a local file of the split it evaluates: --data-file {hub[0]}=PATH "
                        "(.jsonl, .json or .parquet)") from err


def perplexity(lm: ZooLM, path: str | Path, *, limit: int | None = None) -> dict:
    """Perplexity of a held-out file: its documents (zoo.corpus.load_documents: paragraphs of a text
    file, rows of JSON/parquet) each scored from the EOS prefix with lm-eval's rolling windows.
    Returns documents, tokens, bytes, nll_per_token, token_perplexity and bits_per_byte (the
    tokenizer-independent number to compare runs with different vocabularies)."""
    from zoo.corpus import DataError, load_documents

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--ppl {path}: no such file")
    with tempfile.TemporaryDirectory() as cache_dir:  # datasets' cache for the file: nothing left behind
        try:
            # absolute, so a file named 'builtin' or 'hf:x' is read as the file it is
            docs = load_documents(str(path.resolve()), max_documents=limit, cache_dir=cache_dir)
        except DataError as err:
            raise EvalError(f"--ppl {path}: {err}") from None
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(doc,), idx=0) for doc in docs]
    logprob = sum(lm.loglikelihood_rolling(requests))
    n_tokens = sum(len(lm.tok_encode(doc)) for doc in docs)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    return {
        "file": str(path), "documents": len(docs), "tokens": n_tokens, "bytes": n_bytes,
        "nll_per_token": -logprob / n_tokens, "token_perplexity": math.exp(-logprob / n_tokens),
        "bits_per_byte": -logprob / (n_bytes * math.log(2)),
    }


def summary(results: dict | None, ppl: dict | None) -> dict:
    """The numbers worth keeping, JSON-serialisable: {task: {metric: value, ..., "n": samples}, "perplexity": ...}."""
    out: dict = {"tasks": {}}
    for task, metrics in (results or {}).get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            metric, _, _ = key.partition(",")  # lm-eval keys metrics as "acc,none" (metric, filter)
            row[metric] = value
        row["n"] = results.get("n-samples", {}).get(task, {}).get("effective")
        out["tasks"][task] = row
    if ppl is not None:
        out["perplexity"] = ppl
    return out


def format_table(results: dict | None, ppl: dict | None) -> str:
    lines = []
    if results is not None:
        from lm_eval.utils import make_table

        lines.append(make_table(results).rstrip())
    if ppl is not None:
        lines.append(f"perplexity of {ppl['file']}: {ppl['documents']} documents, {ppl['tokens']:,} tokens, "
                     f"{ppl['nll_per_token']:.4f} nats/token, token perplexity {ppl['token_perplexity']:.3f}, "
                     f"{ppl['bits_per_byte']:.4f} bits/byte")
    return "\n".join(lines)


def write_json(run_dir: str | Path, record: dict, output: str | Path | None = None) -> Path:
    """`output`, or RUN_DIR/eval/eval-<time>.json (timestamped, one per evaluation)."""
    path = Path(output) if output else Path(run_dir) / "eval" / time.strftime("eval-%Y%m%d-%H%M%S.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def log_tensorboard(log_dir: str | Path, record: dict, step: int = 0) -> None:
    """Scalars eval/<task>/<metric> and eval/ppl/<name> into the run's TensorBoard log directory."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for task, metrics in record["tasks"].items():
            for metric, value in metrics.items():
                if metric != "n" and not metric.endswith("_stderr") and math.isfinite(value):
                    writer.add_scalar(f"{TENSORBOARD_PREFIX}/{task}/{metric}", value, step)
        if "perplexity" in record:
            for name in ("token_perplexity", "bits_per_byte", "nll_per_token"):
                writer.add_scalar(f"{TENSORBOARD_PREFIX}/ppl/{name}", record["perplexity"][name], step)


def eval_run(
    run_dir: str | Path,
    *,
    tasks: list[str],
    data_files: dict[str, str] | None = None,
    limit: int | None = None,
    ppl: str | Path | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    output: str | Path | None = None,
    step: int | None = None,
) -> dict:
    """What `zoo eval` does: score, print the table, write the JSON record, log to TensorBoard in RUN_DIR
    (where training writes its own scalars) at `step`, by default the run's latest checkpoint step."""
    data_files = data_files or {}
    if not tasks and ppl is None:
        raise EvalError("nothing to evaluate: give --tasks NAME[,NAME...] and/or --ppl FILE")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit {limit} must be >= 1")
    check_task_names(tasks, data_files)
    if ppl is not None and not Path(ppl).is_file():
        raise EvalError(f"--ppl {ppl}: no such file")
    check_run_folder(run_dir)  # before lm-eval's registry and the data load, which take seconds
    prepared = prepare_tasks(tasks, data_files, limit=limit) if tasks else []
    lm = ZooLM(str(run_dir), batch_size=batch_size, max_length=max_length)
    start = time.perf_counter()
    results = run_tasks(lm, prepared, limit=limit) if prepared else None
    ppl_result = perplexity(lm, ppl, limit=limit) if ppl is not None else None
    seconds = time.perf_counter() - start
    record = {**summary(results, ppl_result), "run_dir": str(run_dir), "limit": limit, "data_files": data_files,
              "seconds": round(seconds, 1), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(format_table(results, ppl_result))
    step = run_step(run_dir) if step is None else step
    record["step"] = step
    path = write_json(run_dir, record, output)
    log_tensorboard(run_dir, record, step)
    print(f"{seconds:.1f} s; results in {path}, TensorBoard scalars {TENSORBOARD_PREFIX}/* in {run_dir} at step {step}")
    return record


def run_step(run_dir: str | Path) -> int:
    """The optimizer step of a run folder's weights: that of training's newest complete checkpoint
    (zoo.checkpoint.latest_tag, step_NNNNNNN), whose weights model.safetensors holds; 0 when there is
    none."""
    from zoo.checkpoint import latest_tag

    tag = latest_tag(Path(run_dir))
    match = re.fullmatch(r"step_(\d+)", tag) if tag else None
    return int(match[1]) if match else 0
