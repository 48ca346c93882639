"""Checkpoints: DeepSpeed's engine state plus what makes a run folder self-describing.

    RUN_DIR/spec.json, model.safetensors   the latest weights with their spec (zoo.checkpoint)
    RUN_DIR/tokenizer.model                the SentencePiece model the run trained with
    RUN_DIR/ds_config.json                 the resolved DeepSpeed config
    RUN_DIR/checkpoints/<tag>/             DeepSpeed's model, optimizer and scheduler state
    RUN_DIR/checkpoints/latest             the newest complete tag (written by DeepSpeed after the tag)

Only complete checkpoints are ever pointed at, and pruning never removes the one `latest` names,
so a crash mid-save loses at most the checkpoint being written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from training.engine import TrainingError

CHECKPOINTS = "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def latest_tag(run_dir: Path) -> str | None:
    pointer = run_dir / CHECKPOINTS / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (run_dir / CHECKPOINTS / tag).is_dir() else None


def save(engine, run_dir: Path, step: int, client_state: dict, keep_last: int, expert_parallel: bool = False) -> Path:
    tag = tag_for(step)
    directory = str(run_dir / CHECKPOINTS)
    if expert_parallel:
        from training.expert_parallel import expert_checkpoint_context, save_expert_shards

        # DeepSpeed's own MoE checkpointing expects its expert module layout; each rank writes its shard.
        with expert_checkpoint_context(engine):
            engine.save_checkpoint(directory, tag=tag, client_state=client_state)
        save_expert_shards(engine, directory, tag)
    else:
        engine.save_checkpoint(directory, tag=tag, client_state=client_state)
    dist.barrier()
    if dist.get_rank() == 0:
        _prune(run_dir / CHECKPOINTS, keep_last, keep=tag)
    return run_dir / CHECKPOINTS / tag


def load(engine, run_dir: Path, expert_parallel: bool = False) -> dict:
    tag = latest_tag(run_dir)
    if tag is None:
        raise TrainingError(f"--resume: {run_dir / CHECKPOINTS} holds no checkpoint to resume from")
    directory = str(run_dir / CHECKPOINTS)
    try:
        if expert_parallel:
            from training.expert_parallel import expert_checkpoint_context, load_expert_shards

            with expert_checkpoint_context(engine):
                path, client_state = engine.load_checkpoint(directory, tag=tag)
            load_expert_shards(engine, directory, tag)
        else:
            path, client_state = engine.load_checkpoint(directory, tag=tag)
    except Exception as err:  # torch.load and DeepSpeed raise many kinds for a damaged file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrainingError(
            f"checkpoint {run_dir / CHECKPOINTS / tag} is unreadable ({type(err).__name__}: {first}); "
            "delete that folder to fall back to an older one, or start afresh with another --out"
        ) from None
    if path is None or not client_state or "step" not in client_state:
        raise TrainingError(f"checkpoint {run_dir / CHECKPOINTS / tag} is incomplete (no training state in it)")
    return client_state


def _prune(directory: Path, keep_last: int, keep: str) -> None:
    tags = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in tags[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
