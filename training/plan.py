"""The command line, once, as one immutable plan: what a run trains, where, from which step, with which
DeepSpeed config, on which ranks. Everything that can be refused before the data is refused here.

    plan = make_plan(args)       # None: a --resume of a run that already finished (said on stdout)

In order: the spec (a preset with --set edits; on --resume the run folder's spec.json with budget
and reporting edits only) and the start step; the process group; a fresh run's unfinished checkpoint
folders removed; the precision resolved for this device (auto -> bf16 or fp32, warnings in one
line); layouts DeepSpeed cannot train refused; the DeepSpeed config resolved (on --resume the one
the run started with, OUT/ds_config.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from training import checkpoints
from training.distributed import Dist, init_distributed
from training.ds_config import DS_CONFIG_FILE, ds_config_source, resolve_ds_config
from training.errors import TrainingError
from training.optim import lr_factor
from training.precision import resolve_precision
from training.split import check_split_version
from zoo.checkpoint import SPEC_FILE, latest_tag, read_spec
from zoo.overrides import SpecError, apply_sets, diff
from zoo.presets import DEFAULT_PRESET, resolve
from zoo.specs import MoESpec, RunSpec

# Fields a resumed run may change: budget and reporting, never the model, data or optimisation, nor the
# validation set (one val/loss curve would mix two). HellaSwag may be switched on for a final score.
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_last",
             "eval.hellaswag_limit", "eval.hellaswag_path")


@dataclass(frozen=True)
class Plan:
    """A run as the loop executes it; built once by make_plan, read (never changed) by what follows."""

    spec: RunSpec  # final: train.precision is concrete
    out: Path  # the run folder
    start_step: int  # optimizer steps already done: 0, or the checkpoint's on --resume
    ds_config: dict  # the DeepSpeed config, every "auto" filled (read-only)
    ds_name: str  # how errors name that config
    ranks: Dist  # this process's rank, local rank, world size and device
    resume: bool  # --resume: the checkpoint at start_step is loaded
    stop_after: int | None  # --stop-after: checkpoint and stop after this step


def make_plan(args: argparse.Namespace) -> Plan | None:
    """The plan for `training/run.py`'s arguments; None when a --resume finds its run finished."""
    spec, out, start = resolve_run(args)
    if args.resume and start == spec.train.steps:
        if os.environ.get("RANK", "0") == "0":
            print(f"{out} already finished its train.steps={spec.train.steps} steps; nothing to do "
                  f"(pass --set train.steps=N with N > {start} to train further)", flush=True)
        return None
    ranks = init_distributed()
    spec = _settle(spec, out, ranks, resume=args.resume)
    ds_name, ds_config = run_ds_config(spec, args.ds_config, out, ranks.world_size, resume=args.resume)
    return Plan(spec, out, start, ds_config, ds_name, ranks, args.resume, args.stop_after)


def resolve_run(args: argparse.Namespace) -> tuple[RunSpec, Path, int]:
    """The run's spec, folder and the step it starts from (the checkpoint's, on --resume)."""
    preset = args.preset or DEFAULT_PRESET
    out = Path(args.out or f"runs/{preset}")
    if not args.resume:
        if latest_tag(out):
            raise TrainingError(f"{out} already holds a checkpoint: pass --resume to continue it, or --out NEW_DIR")
        spec = resolve(preset, args.set, args.tiny)
        _check_stop_after(args.stop_after, 0, spec)
        return spec, out, 0
    if args.preset is not None or args.tiny:
        # The model comes from OUT/spec.json; a preset named again could only disagree with it.
        flags = " and ".join(flag for flag, given in (("--preset", args.preset is not None), ("--tiny", args.tiny))
                             if given)
        raise TrainingError(f"--resume continues the run saved in {out / SPEC_FILE}: drop {flags} "
                            "(only --set of budget, reporting and HellaSwag fields may change)")
    saved = out / SPEC_FILE
    if not saved.is_file() or not latest_tag(out):
        unfinished = checkpoints.incomplete_tags(out)
        why = f" ({', '.join(unfinished)} never finished saving)" if unfinished else ""
        raise TrainingError(f"--resume: {out} holds no complete checkpoint to resume from{why}; start it without "
                            "--resume")
    # Here, not with the checkpoint's data state: the data is prepared first, and a new split changes
    # the tokenizer, which would be blamed on the corpus.
    check_split_version(checkpoints.read_split_version(out))
    try:
        spec = read_spec(saved)
    except SpecError as err:
        raise TrainingError(f"--resume: {err}") from None
    edited = apply_sets(spec, args.set)
    changed = [path for path, _, _ in diff(spec, edited) if not path.startswith(RESUMABLE)]
    if changed:
        raise TrainingError(f"--resume cannot change {', '.join(changed)}: only {', '.join(RESUMABLE)} may change")
    start = checkpoints.step_of(latest_tag(out))
    if edited.train.steps < start:
        raise TrainingError(f"--resume: the checkpoint is at step {start} but train.steps={edited.train.steps}; "
                            f"pass --set train.steps={start} or more")
    if edited.train.steps > start:
        _check_stop_after(args.stop_after, start, edited)
    if edited.train.steps != spec.train.steps and start < edited.train.steps and os.environ.get("RANK", "0") == "0":
        # The LR follows train.steps (lr_factor): a new length re-spaces the rest of the cosine.
        print(f"--resume: train.steps {spec.train.steps} -> {edited.train.steps} re-spaces the LR schedule: its "
              f"factor goes from {lr_factor(start - 1, spec):.3f} (step {start}) to {lr_factor(start, edited):.3f} "
              f"(step {start + 1})", flush=True)
    return edited, out, start


def _check_stop_after(stop_after: int | None, start: int, spec: RunSpec) -> None:
    if stop_after is not None and not start < stop_after <= spec.train.steps:
        raise TrainingError(f"--stop-after {stop_after} must be a step this run reaches: after its start "
                            f"(step {start}) and at most train.steps={spec.train.steps}")


def _settle(spec: RunSpec, out: Path, ranks: Dist, *, resume: bool) -> RunSpec:
    """The spec with its precision resolved for this device, once its layout is checked. A fresh run
    first removes the folders of a save that never finished."""
    if not resume and ranks.rank == 0:
        # Folders of a save that never finished (the run was killed during its first checkpoint).
        removed = checkpoints.remove_incomplete(out)
        if removed:
            print(f"{out}: removed unfinished checkpoint folders {', '.join(removed)}", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = resolve_precision(spec, ranks.device)  # auto -> bf16 or fp32 for this device; spec.json records it
        for concern in spec.model.training_warnings():  # legal specs (imported models) that train poorly
            warnings.warn(concern)
    if ranks.rank == 0:
        for warning in caught:  # one line, without the source line `warnings` would print
            print(f"training: warning: {warning.message}", file=sys.stderr)
    check_layout(spec, ranks.world_size)
    return spec


def check_layout(spec: RunSpec, world_size: int) -> None:
    """Refuse what DeepSpeed cannot train, and HellaSwag settings that would fail at the first evaluation."""
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


def run_ds_config(spec: RunSpec, given: str | None, out: Path, world_size: int, *, resume: bool) -> tuple[str, dict]:
    """How errors name the run's DeepSpeed config, and the config resolved. On --resume the run keeps the
    one it started with (OUT/ds_config.json, resolved): a different one could change how it trains, and
    a --ds-config given again must resolve to the same."""
    saved = out / DS_CONFIG_FILE
    if not resume or not saved.is_file():
        return ds_config_source(spec, given)[1], resolve_ds_config(spec, given, world_size)
    name = f"{saved} (the config the run started with)"
    config = resolve_ds_config(spec, str(saved), world_size, named=name)
    if given is not None:
        other = resolve_ds_config(spec, given, world_size)
        if other != config:
            keys = sorted(k for k in {*other, *config} if other.get(k) != config.get(k))
            raise TrainingError(f"--ds-config {given} differs from the config the run started with "
                                f"({saved}) in {', '.join(keys)}; drop --ds-config to resume with that one")
    return name, config
