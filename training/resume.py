"""Where a run starts: a fresh run in an empty folder, or `--resume` from the folder's latest checkpoint.

A resumed run takes its model from OUT/spec.json and its DeepSpeed config from OUT/ds_config.json; only
its budget and reporting (RESUMABLE) may change.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from training import checkpoints
from training.ds_config import ds_config_source, resolve_ds_config
from training.errors import TrainingError
from training.optim import lr_factor
from training.split import check_split_version
from zoo.checkpoint import read_spec
from zoo.overrides import SpecError, apply_sets, diff
from zoo.presets import DEFAULT_PRESET, resolve
from zoo.specs import RunSpec

# Fields a resumed run may change: budget and reporting, never the model, data or optimisation, nor the
# validation set (one val/loss curve would mix two). HellaSwag may be switched on for a final score.
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_last",
             "eval.hellaswag_limit", "eval.hellaswag_path")


def resolve_run(args: argparse.Namespace) -> tuple[RunSpec, Path, int]:
    """The run's spec, folder and the step it starts from (the checkpoint's, on --resume)."""
    preset = args.preset or DEFAULT_PRESET
    out = Path(args.out or f"runs/{preset}")
    if not args.resume:
        if checkpoints.latest_tag(out):
            raise TrainingError(f"{out} already holds a checkpoint: pass --resume to continue it, or --out NEW_DIR")
        spec = resolve(preset, args.set, args.tiny)
        _check_stop_after(args.stop_after, 0, spec)
        return spec, out, 0
    if args.preset is not None or args.tiny:
        # The model comes from OUT/spec.json; a preset named again could only disagree with it.
        flags = " and ".join(flag for flag, given in (("--preset", args.preset is not None), ("--tiny", args.tiny))
                             if given)
        raise TrainingError(f"--resume continues the run saved in {out / 'spec.json'}: drop {flags} "
                            "(only --set of budget, reporting and HellaSwag fields may change)")
    saved = out / "spec.json"
    if not saved.is_file() or not checkpoints.latest_tag(out):
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
    start = int(checkpoints.latest_tag(out).removeprefix("step_"))
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


def run_ds_config(args: argparse.Namespace, out: Path, spec: RunSpec, world_size: int) -> tuple[str, dict]:
    """How errors name the run's DeepSpeed config, and the config resolved. On --resume the run keeps the
    one it started with (OUT/ds_config.json, resolved): a different one could change how it trains, and
    a --ds-config given again must resolve to the same."""
    saved = out / "ds_config.json"
    if not args.resume or not saved.is_file():
        return ds_config_source(spec, args.ds_config)[1], resolve_ds_config(spec, args.ds_config, world_size)
    name = f"{saved} (the config the run started with)"
    config = resolve_ds_config(spec, str(saved), world_size, named=name)
    if args.ds_config is not None:
        given = resolve_ds_config(spec, args.ds_config, world_size)
        if given != config:
            keys = sorted(k for k in {*given, *config} if given.get(k) != config.get(k))
            raise TrainingError(f"--ds-config {args.ds_config} differs from the config the run started with "
                                f"({saved}) in {', '.join(keys)}; drop --ds-config to resume with that one")
    return name, config
