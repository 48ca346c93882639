"""Evaluation: an lm-eval model class (`zoo`), lm-eval tasks on local files, HellaSwag for training,
held-out perplexity.

    from zoo.evaluation import ZooLM, hellaswag_accuracy
    hellaswag_accuracy(model, tokenizer, "hellaswag_val.jsonl", limit=500, max_length=spec.model.max_seq_len)
    # -> {"acc": ..., "acc_norm": ..., "n": 500}

Importing this package registers the `zoo` model with lm-eval (`lm_eval.simple_evaluate(model="zoo",
model_args="pretrained=RUN_DIR", ...)` then works too).
"""

from zoo.evaluation.lm import EvalError, ZooLM
from zoo.evaluation.local_tasks import local_task
from zoo.evaluation.tasks import hellaswag_accuracy, hellaswag_docs

__all__ = ["EvalError", "ZooLM", "hellaswag_accuracy", "hellaswag_docs", "local_task"]
