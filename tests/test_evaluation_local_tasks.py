"""Any lm-eval task on a local file: lm-eval's own task (found in its registry, YAML unchanged) with
only the evaluated split read from the file, in every format, and one-line errors for what a file
cannot serve. CPU, no network (the hub is switched off below); lm-eval's registry restricted to the
tasks' folders (tests/_evaluation.py) keeps these fast."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from zoo.evaluation import local_task  # noqa: E402
from zoo.evaluation.lm import EvalError  # noqa: E402

from _evaluation import DATA, LOCAL_FILES, SCIQ, WINOGRANDE, manager  # noqa: E402, F401  (fixtures)

N_RECORDS = 30


def _records(path, n=N_RECORDS):
    with open(path) as lines:
        return [json.loads(next(lines)) for _ in range(n)]


@pytest.mark.parametrize("name", ["sciq", "winogrande"])
def test_the_task_is_lm_evals_yaml_with_only_the_split_swapped(manager, name):
    """Everything but the data source is the registered task's: prompts, choices, targets, metrics."""
    from lm_eval.tasks._yaml_loader import load_yaml

    task = local_task(name, LOCAL_FILES[name], manager=manager)
    yaml = load_yaml(manager.task_index[name].yaml_path, resolve_func=False)
    evaluated = "test_split" if yaml.get("test_split") else "validation_split"
    assert task.config.dataset_path == "json" and task.config[evaluated] == yaml[evaluated]
    assert task.config.dataset_kwargs == {"data_files": {yaml[evaluated]: str(LOCAL_FILES[name].resolve())}}
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "output_type", "target_delimiter"):
        if key in yaml and isinstance(yaml[key], str) and not yaml[key].startswith("/"):  # not a !function path
            assert task.config[key] == yaml[key], key
    assert [m["metric"] for m in task.config.metric_list] == [m["metric"] for m in yaml["metric_list"]]
    assert len(task.eval_docs) == sum(1 for _ in open(LOCAL_FILES[name]))
    doc = task.eval_docs[0]
    if name == "sciq":  # the YAML's Jinja prompt and choices on the file's first record
        record = _records(SCIQ, 1)[0]
        assert task.doc_to_text(doc) == f"{record['support'].lstrip()}\nQuestion: {record['question']}\nAnswer:"
        assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == record["correct_answer"]
    else:  # preprocess_winogrande.py: one context per option, the same continuation
        record = _records(WINOGRANDE, 1)[0]
        blank = record["sentence"].index("_")
        assert task.doc_to_choice(doc) == [record["sentence"][:blank] + record[f"option{i}"] for i in (1, 2)]
        assert task.doc_to_text(doc) == int(record["answer"]) - 1


def test_json_and_parquet_files_give_the_same_documents(manager, tmp_path):
    records = _records(SCIQ)
    (tmp_path / "sciq.json").write_text(json.dumps(records))
    pd.DataFrame(records).to_parquet(tmp_path / "sciq.parquet")
    (tmp_path / "sciq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    docs = [list(local_task("sciq", tmp_path / f"sciq.{suffix}", manager=manager).eval_docs)
            for suffix in ("jsonl", "json", "parquet")]
    assert docs[0] == docs[1] == docs[2] and len(docs[0]) == N_RECORDS


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("name,file,words", [
    ("sciqq", SCIQ, ["unknown task 'sciqq'", "did you mean sciq"]),
    ("ai2_arc", SCIQ, ["ai2_arc is a tag of 2 lm-eval tasks (arc_challenge, arc_easy)", "each with its own --data-file"]),
    ("legalbench", SCIQ, ["legalbench is a group of", "lm-eval tasks (", ", ...)"]),
    ("legalbench_abercrombie", SCIQ, ["takes 5 few-shot examples from its 'train' split",
                                      "replaces only the 'test' split it evaluates"]),
    ("squadv2", SCIQ, ["squadv2 is a Python task class"]),
    ("sciq", WINOGRANDE, ["the file does not fit lm-eval's sciq task (UndefinedError: 'support' is undefined)",
                          "its fields: sentence, option1, option2, answer"]),
    ("winogrande", SCIQ, ["does not fit lm-eval's winogrande task (KeyError: 'answer')", "its fields: question"]),
    ("hellaswag", DATA / "lambada_openai_test.jsonl", ["does not fit lm-eval's hellaswag task (KeyError: 'ctx_a')",
                                                       "its fields: text"]),
    ("sciq", DATA / "README.md", ["a .md file; give .jsonl, .json, .parquet"]),
    ("sciq", DATA / "absent.jsonl", ["no such file"]),
    ("sciq", "{tmp}/empty.jsonl", ["the file is empty"]),
    ("sciq", "{tmp}/garbage.jsonl", ["cannot read it as .jsonl records"]),
    ("sciq", "{tmp}/third_bad.jsonl", ["record 3 does not fit lm-eval's sciq task", "its fields: question"]),
    ("winogrande", "{tmp}/int_answer.jsonl", ["does not fit lm-eval's winogrande task (KeyError: 2)"]),
])
def test_what_a_file_cannot_serve_is_one_line(manager, tmp_path, name, file, words):
    records = _records(SCIQ, 3)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "garbage.jsonl").write_text("{not json\n")
    _write(tmp_path / "third_bad.jsonl", records[:2] + [{k: v for k, v in records[2].items() if k != "support"}])
    _write(tmp_path / "int_answer.jsonl", [{**r, "answer": int(r["answer"])} for r in _records(WINOGRANDE, 2)])
    with pytest.raises(EvalError) as caught:
        local_task(name, str(file).format(tmp=tmp_path), manager=manager)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, message


def test_a_bad_record_past_the_limit_is_not_checked(manager, tmp_path):
    records = _records(SCIQ, 3)
    path = _write(tmp_path / "s.jsonl", records[:2] + [{k: v for k, v in records[2].items() if k != "support"}])
    assert len(local_task("sciq", path, manager=manager, limit=2).eval_docs) == 3
