"""What the trainer builds from its plan before the first step, in order: the data (rank 0 first), the
model in its DeepSpeed engine, and the run folder's files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from training import checkpoints
from training.data import DataError, PreparedData, Tokenizer, prepare_data
from training.ds_config import DS_CONFIG_FILE
from training.engine import initialize
from training.errors import TrainingError
from training.optim import optimizer_groups
from training.plan import Plan
from zoo.checkpoint import write_spec
from zoo.files import write_atomic
from zoo.specs import RunSpec
from zoo.tokenizer import TOKENIZER_FILENAME


def build(plan: Plan) -> tuple[object, object, PreparedData]:
    """The DeepSpeed engine, its optimizer and the data, seeded from train.seed; rank 0 writes the run
    folder's ds_config.json, spec.json and tokenizer.model."""
    import deepspeed

    spec, out, ranks = plan.spec, plan.out, plan.ranks
    deepspeed.utils.logger.setLevel("WARNING")
    torch.manual_seed(spec.train.seed)
    prepared = _prepare_data(spec, ranks.rank)
    _check_min_data(prepared, spec, ranks.world_size)
    tokenizer: Tokenizer = prepared.tokenizer
    if plan.resume and not Tokenizer.load(out).same_model(tokenizer):
        raise TrainingError(f"--resume: the data now gives a different tokenizer than {out / TOKENIZER_FILENAME}; "
                            "the corpus or its settings changed since the run started")
    engine, optimizer = _engine(plan)
    if spec.eval.hellaswag_limit:
        _check_hellaswag_fits(engine.module, tokenizer, spec, resume=plan.resume)
    if ranks.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        # Atomically: a resumed run rewrites them, and a crash mid-write must not leave a run that cannot resume.
        write_atomic(out / DS_CONFIG_FILE, json.dumps(plan.ds_config, indent=2) + "\n")
        write_spec(out, spec)
        tokenizer.save(out)
        checkpoints.write_split_version(out)
    return engine, optimizer, prepared


def _prepare_data(spec: RunSpec, rank: int) -> PreparedData:
    """Rank 0 trains or loads the cached tokenizer first; the others then hit the cache."""
    data = spec.data
    kwargs = dict(source=data.source, seq_len=data.seq_len, vocab_size=spec.model.vocab_size,
                  val_fraction=data.val_fraction, seed=spec.train.seed, text_field=data.text_field,
                  max_documents=data.max_documents, tokenizer_sample_chars=data.tokenizer_sample_chars,
                  cache_dir=Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "zoo")))
    error, prepared, unexpected = None, None, None
    if rank == 0:
        try:
            prepared = prepare_data(**kwargs)
        except DataError as err:
            error = str(err)
        except Exception as err:  # a bug or an environment problem: rank 0 shows the traceback
            error, unexpected = f"rank 0 failed to prepare the data ({type(err).__name__}: {err})", err
    shared = [error]
    dist.broadcast_object_list(shared, src=0)  # so no rank waits forever on one that failed
    if unexpected is not None:
        raise unexpected
    if shared[0]:
        raise DataError(shared[0])
    return prepared if prepared is not None else prepare_data(**kwargs)


def _check_hellaswag_fits(model, tokenizer: Tokenizer, spec: RunSpec, *, resume: bool) -> None:
    """Every HellaSwag item the evaluations will score fits the training length: found out now, not
    eval_every steps into training, when the run would stop before that step's checkpoint. The fixes
    offered are ones this run can take (a resumed run cannot change data.seq_len)."""
    from zoo.evaluation.lm import EvalError
    from zoo.evaluation.tasks import HellaSwagTooLong, check_hellaswag_fits

    limit = spec.eval.hellaswag_limit
    try:
        check_hellaswag_fits(model, tokenizer, spec.eval.hellaswag_path, limit, spec.data.seq_len)
    except HellaSwagTooLong as err:
        fixes = [f"set eval.hellaswag_limit <= {err.first} (the items before it fit)" if err.first
                 else "set eval.hellaswag_limit=0 (no HellaSwag)"]
        if not resume:
            also = "" if err.longest <= spec.model.max_seq_len else " and model.max_seq_len"
            fixes.insert(0, f"raise data.seq_len{also} to >= {err.longest}")
        raise TrainingError(f"eval.hellaswag_limit={limit}: {err}; {', or '.join(fixes)}") from None
    except EvalError as err:
        raise TrainingError(f"eval.hellaswag_path: {err}") from None


def _check_min_data(prepared: PreparedData, spec: RunSpec, world_size: int) -> None:
    needed = spec.train.micro_batch_size * world_size
    if len(prepared.train_blocks) < needed:
        raise TrainingError(
            f"the corpus gives {len(prepared.train_blocks)} training blocks of {spec.data.seq_len} tokens, fewer than "
            f"one global micro-batch ({needed}); use more text, a smaller data.seq_len or train.micro_batch_size"
        )


def _engine(plan: Plan) -> tuple[object, object]:
    """The model in its DeepSpeed engine, and the optimizer."""
    import zoo

    spec, device = plan.spec, plan.ranks.device
    model = zoo.build(spec)
    ep_size = spec.deepspeed.ep_size
    if ep_size > 1:
        from training.expert_parallel import check_ds_config, enable_expert_parallel, moe_param_groups

        try:
            check_ds_config(plan.ds_config, ep_size)
            enable_expert_parallel(model, ep_size)  # before the groups: it replaces the expert parameters
        except ValueError as err:
            raise TrainingError(str(err)) from None
        groups = moe_param_groups(optimizer_groups(model, spec, device))
    else:
        groups = optimizer_groups(model, spec, device)
    engine, optimizer, _ = initialize(model, spec, groups, plan.ds_config, source=plan.ds_name)
    if spec.train.compile:
        engine.compile()
    return engine, optimizer
