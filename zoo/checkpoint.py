"""Run folders: a model's resolved spec and its weights, the unit training fine-tunes from and
evaluation reads.

    RUN_DIR/spec.json          the RunSpec (`RunSpec.model_validate_json`); rebuilds the module graph
    RUN_DIR/model.safetensors  the model's state_dict (parameters and persistent buffers such as the
                               routers' correction biases); tied weights are stored once
    RUN_DIR/checkpoints/       training's checkpoints (training.checkpoints); `latest_tag` names the
                               newest complete one, whose weights model.safetensors holds

`load_run_folder` rebuilds the model from the spec alone and loads the weights strictly, so a
spec/weights mismatch is an error, not a silent partial load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file
from torch import nn

from zoo.builders import build
from zoo.files import write_atomic
from zoo.overrides import SpecError, validation_message
from zoo.specs import RunSpec

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINTS = "checkpoints"  # RUN_DIR/checkpoints/<tag>/, tags step_NNNNNNN
COMPLETE = "complete"  # marker file inside a tag folder, written once every rank has written its part
LATEST = "latest"  # RUN_DIR/checkpoints/latest: the newest complete tag


def save_run_folder(
    model: nn.Module, spec: RunSpec, run_dir: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write `spec.json` and `model.safetensors` into `run_dir` (created if missing).

    `state_dict` replaces the model's own (e.g. experts gathered from expert-parallel ranks); its keys
    and shapes must be those of the unsharded model."""
    if not isinstance(spec, RunSpec):
        raise TypeError(f"save_run_folder needs a RunSpec, got {type(spec).__name__}: wrap a ModelSpec as RunSpec(model=...)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_spec(run_dir, spec)
    state = model.state_dict() if state_dict is None else state_dict
    tied = getattr(model.lm_head, "weight", None) is model.embed.weight
    # Own, contiguous copies: an engine's parameters may be views into one flat buffer.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()
               if not (tied and k == "lm_head.weight")}
    # Written aside and renamed: a kill mid-write leaves the previous weights, never a truncated file.
    tmp = run_dir / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also keep the half-written copy
        raise
    os.replace(tmp, run_dir / WEIGHTS_FILE)
    return run_dir


def write_spec(run_dir: Path, spec: RunSpec) -> None:
    """RUN_DIR/spec.json, atomically: a crash mid-write must not leave a run that cannot resume."""
    write_atomic(run_dir / SPEC_FILE, spec.model_dump_json(indent=2) + "\n")


def read_spec(path: str | Path) -> RunSpec:
    """The RunSpec in a run folder's spec.json; a SpecError in one line naming the file and its first
    invalid field (a folder saved by an older zoo may hold a spec this one's rules refuse)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpecError(f"{path}: not a readable run spec ({err})") from None
    try:
        return RunSpec.model_validate(data)
    except ValueError as err:  # pydantic's ValidationError
        raise SpecError(f"{path}: not a valid run spec for this version of the zoo: "
                        f"{validation_message(err, data)}") from None


def load_run_folder(run_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, RunSpec]:
    """The model (in eval mode, `dtype`) and RunSpec stored in `run_dir` by `save_run_folder`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SpecError(f"run folder {run_dir} does not exist (or is not a directory)")
    spec_path, weights_path = run_dir / SPEC_FILE, run_dir / WEIGHTS_FILE
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise SpecError(f"run folder {run_dir} has no {path.name}: not a run folder (expected {SPEC_FILE} + {WEIGHTS_FILE})")
    spec = read_spec(spec_path)
    model = build(spec).to(dtype)
    try:
        missing, unexpected = load_model(model, str(weights_path), strict=False)
    except (RuntimeError, SafetensorError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        reason = next((line for line in lines if "size mismatch" in line), lines[-1] if lines else type(err).__name__)
        raise SpecError(f"{weights_path} does not match {SPEC_FILE}: {reason}") from None
    if missing or unexpected:
        raise SpecError(
            f"{weights_path} does not match {SPEC_FILE}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    return model.eval(), spec


def latest_tag(run_dir: Path) -> str | None:
    """The tag `latest` names if its folder exists, else the newest folder marked complete, else None."""
    directory = run_dir / CHECKPOINTS
    pointer = directory / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if tag and (directory / tag).is_dir():
            return tag
    complete = [p.name for p in checkpoint_dirs(run_dir) if (p / COMPLETE).is_file()]
    return complete[-1] if complete else None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """RUN_DIR/checkpoints/step_* folders, oldest first (tags are zero-padded, so names sort by step)."""
    directory = run_dir / CHECKPOINTS
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step_"))
