"""Any lm-eval task on a local file, scored exactly as lm-eval's hub task.

    task = local_task("sciq", "../shared/data/sciq_val.jsonl")     # an lm-eval Task, ready for simple_evaluate

A local task is not a re-implementation: `local_task` finds the task in lm-eval's own registry
(`TaskManager`), loads its YAML (its `process_docs`, prompt, target delimiter, choices, metrics,
filters) and changes only where the split it evaluates comes from: the `json` or `parquet` builder
of `datasets` with `data_files` pointing at the file. That split is the task's test split when it has
one, else its validation split, so a local score equals the hub score whenever the file holds that
split's records in the hub's order (../shared/data's hellaswag_val.jsonl and lambada_openai_test.jsonl
are the original releases the hub sets come from).

What one file cannot serve is refused in one line before any model loads: a group or a tag (several
tasks), a Python task class (it loads its own data), a task that builds its documents in Python
(`custom_dataset`), a task whose few-shot examples come from another split, and a file whose
records do not fit the task's fields (every record evaluated is rendered through the task's
prompt, target and choices first).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from pathlib import Path

from zoo.evaluation.lm import EvalError

DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # file suffix -> `datasets` builder
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
MEMBERS_SHOWN = 3  # of a group's tasks, in an error message


@functools.cache
def task_manager():
    """lm-eval's index of its ~15k task YAMLs: seconds to build, so once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_entry(name: str, manager=None):
    """The registry entry of `name` (a task, group or tag), or an EvalError naming close matches."""
    manager = manager or task_manager()
    entry = manager.task_index.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `lm_eval ls tasks` lists them"
        raise EvalError(f"unknown task {name!r}{hint}")
    return entry


def check_data_file(name: str, path: str | Path) -> None:
    """What can be judged of a --data-file without lm-eval's registry: the file exists and has a
    format `datasets` reads."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--data-file {name}={path}: no such file")
    if path.suffix.lower() not in DATA_BUILDERS:
        raise EvalError(f"--data-file {name}={path}: a {path.suffix or 'suffix-less'} file; give "
                        f"{', '.join(DATA_BUILDERS)} (one record per document, the hub data set's fields)")


def local_task(name: str, path: str | Path, *, manager=None, limit: int | None = None):
    """lm-eval's task `name` with the split it evaluates read from `path` (.jsonl, .json or .parquet).
    The first `limit` records (all when None) are checked against the task's fields."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    flag = f"--data-file {name}={path}"
    check_data_file(name, path)
    entry = task_entry(name, manager)
    if entry.kind in (Kind.GROUP, Kind.TAG):
        members = _members(entry)
        shown = ", ".join(members[:MEMBERS_SHOWN]) + (", ..." if len(members) > MEMBERS_SHOWN else "")
        raise EvalError(f"{flag}: {name} is a {entry.kind.name.lower()} of {len(members)} lm-eval tasks ({shown}), "
                        "and a file holds one task's documents: name its tasks in --tasks, each with its own "
                        "--data-file")
    if entry.kind is Kind.PY_TASK:
        raise EvalError(f"{flag}: {name} is a Python task class that loads its own data; local files serve the "
                        "tasks lm-eval defines in YAML")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):  # what lm-eval's TaskFactory strips before building a task
        config.pop(key, None)
    if callable(config.get("custom_dataset")):
        raise EvalError(f"{flag}: {name} builds its documents in Python (custom_dataset), not from a data set "
                        "split a file could replace")
    split_key = "test_split" if config.get("test_split") else "validation_split"
    split = config.get(split_key)
    if not split:
        raise EvalError(f"{flag}: {name} evaluates no test or validation split that a file could replace")
    fewshot_config = dict(config.get("fewshot_config") or {})
    fewshot = _fewshot_split(config, fewshot_config)
    if fewshot is not None and fewshot != split:
        raise EvalError(f"{flag}: {name} takes {config['num_fewshot']} few-shot examples from its {fewshot!r} "
                        f"split, and the file replaces only the {split!r} split it evaluates: a local file "
                        "serves zero-shot tasks and tasks whose examples come from that split or the YAML")
    path = Path(path).resolve()
    builder = DATA_BUILDERS[path.suffix.lower()]
    # Only the evaluated split exists locally; few-shot examples, if any, come from it (the sampler leaves
    # out the item being evaluated) or from the YAML's own samples.
    fewshot_config.pop("split", None)
    config.update({key: None for key in SPLIT_KEYS})
    config.update({split_key: split}, dataset_path=builder, dataset_name=None,
                  dataset_kwargs={"data_files": {split: str(path)}}, fewshot_split=fewshot,
                  fewshot_config=fewshot_config or None)
    config["metadata"] = {**(config.get("metadata") or {}), "data_file": str(path)}
    with _quiet_datasets():
        fields = f"; its fields: {', '.join(_read(flag, builder, path, split).column_names)}"
        try:
            task = ConfigurableTask(config=config)  # reads the file again, from datasets' cache
        except Exception as err:  # a file that does not fit surfaces deep inside the task's processing or templates
            raise EvalError(f"{flag}: the file {_misfit(name, err)}{fields}") from err
    docs = task.eval_docs
    for index, doc in enumerate(docs if limit is None else docs.select(range(min(limit, len(docs))))):
        try:
            task.doc_to_text(doc)
            task.doc_to_target(doc)
            if task.config.doc_to_choice is not None:
                task.doc_to_choice(doc)
        except Exception as err:
            raise EvalError(f"{flag}: record {index + 1} {_misfit(name, err)}{fields}") from err
    return task


def _members(entry) -> list[str]:
    """The task names of a tag, or of a group (its YAML's `task:` list)."""
    if entry.cfg is None:  # a tag: lm-eval's index holds its tasks, not a YAML
        return sorted(entry.tags)
    members = entry.cfg.get("task", [])
    return [m if isinstance(m, str) else m.get("task") or m.get("group") or "?" for m in members]


def _fewshot_split(config: dict, fewshot_config: dict) -> str | None:
    """The split a task draws its few-shot examples from (None: zero-shot, or examples in the YAML), by
    lm-eval's rules: fewshot_config.split, else fewshot_split, else its `samples`, else its training,
    validation or test split, in that order."""
    if not config.get("num_fewshot"):
        return None
    split = fewshot_config.get("split") or config.get("fewshot_split")
    if split is None and fewshot_config.get("samples") is not None:
        return None
    return split or config.get("training_split") or config.get("validation_split") or config.get("test_split")


def _misfit(name: str, err: BaseException) -> str:
    detail = str(err).splitlines()[0] if str(err) else ""
    return f"does not fit lm-eval's {name} task ({type(err).__name__}: {detail})"


@contextlib.contextmanager
def _quiet_datasets():
    """No `datasets` progress bars while a local file is read: a file of evaluation records loads in a
    blink, and a bar on stderr would break an error's one line the first time a file is seen."""
    import datasets

    was_off = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def _read(flag: str, builder: str, path: Path, split: str):
    """The file as a `datasets` table, or an EvalError saying why it cannot be one."""
    import datasets

    if path.stat().st_size == 0:
        raise EvalError(f"{flag}: the file is empty")
    try:
        rows = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    except Exception as err:
        while err.__cause__ or err.__context__:  # datasets wraps the parser's error in a generic one
            err = err.__cause__ or err.__context__
        detail = str(err).splitlines()[0] if str(err) else ""
        raise EvalError(f"{flag}: cannot read it as {path.suffix} records ({type(err).__name__}: {detail})") from None
    if len(rows) == 0:
        raise EvalError(f"{flag}: the file holds no records")
    return rows
