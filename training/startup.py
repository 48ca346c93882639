"""What the trainer does before its first step, in order: the spec settled for this device, layouts
DeepSpeed cannot train refused at the door, the data (rank 0 first), the model in its DeepSpeed engine,
and the run folder's files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from training import checkpoints
from training.data import DataError, PreparedData, Tokenizer, prepare_data
from training.distributed import Dist
from training.engine import initialize
from training.errors import TrainingError
from training.optim import optimizer_groups
from training.precision import resolve_precision
from training.resume import run_ds_config
from zoo.files import write_atomic
from zoo.specs import MoESpec, RunSpec


def settle(args: argparse.Namespace, spec: RunSpec, out: Path, env: Dist) -> RunSpec:
    """The spec with its precision resolved for this device, once its layout is checked. A fresh run
    first removes the folders of a save that never finished."""
    if not args.resume and env.rank == 0:
        # Folders of a save that never finished (the run was killed during its first checkpoint).
        removed = checkpoints.remove_incomplete(out)
        if removed:
            print(f"{out}: removed unfinished checkpoint folders {', '.join(removed)}", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = resolve_precision(spec, env.device)  # auto -> bf16 or fp32 for this device; spec.json records it
    if env.rank == 0:
        for warning in caught:  # one line, without the source line `warnings` would print
            print(f"training: warning: {warning.message}", file=sys.stderr)
    check_layout(spec, env.world_size)
    return spec


def check_layout(spec: RunSpec, world_size: int) -> None:
    moe = [layer.ffn for layer in spec.model.layer_specs() if isinstance(layer.ffn, MoESpec)]
    ep = spec.deepspeed.ep_size
    if spec.deepspeed.zero_stage == 3 and moe:
        raise TrainingError("deepspeed.zero_stage=3 serves dense presets only (DeepSpeed's MoE path rejects "
                            "ZeRO-3); use --set deepspeed.zero_stage=2")
    if spec.eval.hellaswag_limit:
        path = spec.eval.hellaswag_path
        if path is None or not Path(path).is_file():
            raise TrainingError(f"eval.hellaswag_limit={spec.eval.hellaswag_limit} needs eval.hellaswag_path to name "
                                f"a HellaSwag JSONL file (got {path!r}), e.g. ../shared/data/hellaswag_val.jsonl")
        from zoo.evaluation.lm import EvalError
        from zoo.evaluation.tasks import hellaswag_docs

        try:  # the records the evaluations will read, now rather than eval_every steps into training
            docs = hellaswag_docs(path, spec.eval.hellaswag_limit)
        except EvalError as err:
            raise TrainingError(f"eval.hellaswag_path: {err}") from None
        if not docs:
            raise TrainingError(f"eval.hellaswag_path={path!r} holds no HellaSwag records")
    if ep > 1:
        if world_size % ep:
            raise TrainingError(f"deepspeed.ep_size={ep} must divide the number of ranks ({world_size})")
        bad = sorted({f.n_experts for f in moe if f.n_experts % ep})
        if not moe or bad:
            raise TrainingError(f"deepspeed.ep_size={ep} must divide every MoE layer's n_experts "
                                f"(found {bad or 'no MoE layer'})")


def build(args: argparse.Namespace, spec: RunSpec, out: Path, env: Dist) -> tuple[object, object, PreparedData]:
    """The DeepSpeed engine, its optimizer and the data, seeded from train.seed; rank 0 writes the run
    folder's ds_config.json, spec.json and tokenizer.model."""
    import deepspeed

    deepspeed.utils.logger.setLevel("WARNING")
    torch.manual_seed(spec.train.seed)
    prepared = _prepare_data(spec, env.rank)
    _check_min_data(prepared, spec, env.world_size)
    tokenizer: Tokenizer = prepared.tokenizer
    if args.resume and not Tokenizer.load(out).same_model(tokenizer):
        raise TrainingError(f"--resume: the data now gives a different tokenizer than {out / 'tokenizer.model'}; "
                            "the corpus or its settings changed since the run started")
    engine, optimizer, ds_config = _engine(args, spec, out, env)
    if spec.eval.hellaswag_limit:
        _check_hellaswag_fits(engine.module, tokenizer, spec, resume=args.resume)
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        # Atomically: a resumed run rewrites them, and a crash mid-write must not leave a run that cannot resume.
        write_atomic(out / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")
        write_atomic(out / "spec.json", spec.model_dump_json(indent=2) + "\n")
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


def _engine(args: argparse.Namespace, spec: RunSpec, out: Path, env: Dist) -> tuple[object, object, dict]:
    """The model in its DeepSpeed engine, the optimizer, and the resolved DeepSpeed config."""
    import zoo

    model = zoo.build(spec)
    ep_size = spec.deepspeed.ep_size
    ds_name, ds_config = run_ds_config(args, out, spec, env.world_size)
    if ep_size > 1:
        from training.expert_parallel import check_ds_config, enable_expert_parallel, moe_param_groups

        try:
            check_ds_config(ds_config, ep_size)
            enable_expert_parallel(model, ep_size)  # before the groups: it replaces the expert parameters
        except ValueError as err:
            raise TrainingError(str(err)) from None
        groups = moe_param_groups(optimizer_groups(model, spec, env.device))
    else:
        groups = optimizer_groups(model, spec, env.device)
    engine, optimizer, _ = initialize(model, spec, groups, ds_config, source=ds_name)
    if spec.train.compile:
        engine.compile()
    return engine, optimizer, ds_config
