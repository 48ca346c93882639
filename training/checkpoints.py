"""Checkpoints: DeepSpeed's engine state plus what makes a run folder self-describing.

    RUN_DIR/spec.json, model.safetensors   the latest weights with their spec (zoo.checkpoint)
    RUN_DIR/tokenizer.model                the SentencePiece model the run trained with
    RUN_DIR/ds_config.json                 the resolved DeepSpeed config
    RUN_DIR/split.json                     the train/validation split's version (training.split)
    RUN_DIR/checkpoints/<tag>/             DeepSpeed's model, optimizer and scheduler state
    RUN_DIR/checkpoints/<tag>/complete     written once every rank has written its part of <tag>
    RUN_DIR/checkpoints/latest             the newest complete tag, replaced atomically after `complete`

DeepSpeed's own `latest` is written by rank 0 as soon as its own files are, before the other ranks'
(and before the expert shards), so the trainer writes it itself, after a barrier. A crash mid-save
therefore loses at most the checkpoint being written: `latest` still names the previous one, and
if `latest` is lost or names a deleted folder, the newest folder marked `complete` is used.
Pruning keeps the newest `keep_last` complete checkpoints (the one just written among them) and
removes incomplete folders.
"""

from __future__ import annotations

import errno
import json
import resource
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from training.errors import TrainingError
from training.split import SPLIT_VERSION, UNVERSIONED_SPLIT
from zoo.checkpoint import CHECKPOINTS, COMPLETE, LATEST, checkpoint_dirs
from zoo.files import write_atomic

SPLIT = "split.json"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def write_split_version(run_dir: Path) -> None:
    write_atomic(run_dir / SPLIT, json.dumps({"split_version": SPLIT_VERSION}) + "\n")


def read_split_version(run_dir: Path) -> int:
    """The split version RUN_DIR/split.json records; a run folder without one (older) used version 1.
    Read before the data is prepared, so a resume across a new split is refused before anything else."""
    path = run_dir / SPLIT
    if not path.is_file():
        return UNVERSIONED_SPLIT
    try:
        return int(json.loads(path.read_text())["split_version"])
    except (ValueError, KeyError, TypeError) as err:
        raise TrainingError(f"{path} is unreadable ({type(err).__name__}: {err}); it should hold "
                            f'{{"split_version": N}}') from None


def incomplete_tags(run_dir: Path) -> list[str]:
    """Checkpoint folders no save finished (a crash mid-save): never resumed from, pruned at the next save."""
    return [p.name for p in checkpoint_dirs(run_dir) if not (p / COMPLETE).is_file()]


def remove_incomplete(run_dir: Path) -> list[str]:
    """Delete the incomplete checkpoint folders (a fresh run's saves would otherwise mix with them)."""
    tags = incomplete_tags(run_dir)
    for tag in tags:
        shutil.rmtree(run_dir / CHECKPOINTS / tag, ignore_errors=True)
    return tags


NO_ROOM = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded", errno.EFBIG: "File too large"}


class CheckpointWriteError(Exception):
    """A checkpoint could not be written for want of room: the run stops at it, its last good one intact."""


def no_room(err: BaseException, run_dir: Path, step: int, needed: int) -> CheckpointWriteError | None:
    """The one-line stop for a save that failed because the disk (or quota, or file size limit) is full,
    else None. The cause is the error's errno or text where it has one (the OS, safetensors); torch.save's
    stream writer drops the errno ("unexpected pos ..."), so a failure with a file at the size limit
    (ulimit -f) or less room left than a checkpoint needs counts too. The failed tag's folder is removed (it was never marked
    complete), so that what it took is free again."""
    code = getattr(err, "errno", None)
    cause = NO_ROOM.get(code) or next((text for text in NO_ROOM.values() if text in str(err)), None)
    partial = run_dir / CHECKPOINTS / tag_for(step)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if cause is None and limit != resource.RLIM_INFINITY and _largest(partial) >= limit:
        cause = f"File too large (the file size limit, ulimit -f, is {limit:,} bytes)"
    if cause is None and shutil.disk_usage(run_dir).free + _size(partial) >= needed:
        return None
    if dist.get_rank() == 0 and partial.is_dir() and not (partial / COMPLETE).exists():
        shutil.rmtree(partial, ignore_errors=True)
    free = shutil.disk_usage(run_dir).free
    return CheckpointWriteError(f"cannot write the step {step} checkpoint in {run_dir}: {cause or 'the disk is full'} "
                                f"(a checkpoint needs about {needed / 1e6:,.1f} MB, {free / 1e6:,.1f} MB free there)")


def _sizes(folder: Path) -> list[int]:
    return [f.stat().st_size for f in folder.rglob("*") if f.is_file()] if folder.is_dir() else []


def _size(folder: Path) -> int:
    return sum(_sizes(folder))


def _largest(folder: Path) -> int:
    return max(_sizes(folder), default=0)


def save(engine, run_dir: Path, step: int, client_state: dict, keep_last: int, expert_parallel: bool = False,
         before_commit: Callable[[], None] | None = None) -> Path:
    """Every rank writes its part of checkpoint `step`, then `before_commit` runs on every rank (the run
    folder's weights: they must not lag behind `latest`), and only then, after a barrier, rank 0 marks
    the folder complete, points `latest` at it and prunes."""
    tag = tag_for(step)
    directory = str(run_dir / CHECKPOINTS)
    if dist.get_rank() == 0:
        # A folder of this tag from an earlier attempt (a run resumed from before it) loses its mark
        # until this save completes: a crash now must not leave a half-rewritten folder marked complete.
        (run_dir / CHECKPOINTS / tag / COMPLETE).unlink(missing_ok=True)
    dist.barrier()
    if expert_parallel:
        from training.expert_parallel import expert_checkpoint_context, save_expert_shards

        # DeepSpeed's own MoE checkpointing expects its expert module layout; each rank writes its shard.
        with expert_checkpoint_context(engine):
            engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
        save_expert_shards(engine, directory, tag)
    else:
        engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
    if before_commit is not None:
        before_commit()
    dist.barrier()  # every rank's files, expert shards included, are on disk
    if dist.get_rank() == 0:
        write_atomic(run_dir / CHECKPOINTS / tag / COMPLETE, f"{tag}\n")
        write_atomic(run_dir / CHECKPOINTS / LATEST, tag)
        _prune(run_dir, keep_last, keep=tag)
    dist.barrier()  # no rank reads `latest` or starts the next save before rank 0 has moved it
    return run_dir / CHECKPOINTS / tag


def load(engine, run_dir: Path, step: int, expert_parallel: bool = False) -> dict:
    """Checkpoint `step` into `engine` on every rank; its client state (the trainer's step, tokens,
    data position and generators)."""
    tag = tag_for(step)
    directory = str(run_dir / CHECKPOINTS)
    failure = None
    try:
        if expert_parallel:
            from training.expert_parallel import expert_checkpoint_context, load_expert_shards

            with expert_checkpoint_context(engine):
                path, client_state = engine.load_checkpoint(directory, tag=tag)
            load_expert_shards(engine, directory, tag)
        else:
            path, client_state = engine.load_checkpoint(directory, tag=tag)
    except Exception as err:  # torch.load and DeepSpeed raise many kinds for a damaged file
        failure = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    # Ranks read different files (their ZeRO shard, their experts): agree, so that a failure on one
    # rank is reported by rank 0, once, rather than leaving the others waiting.
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    reasons = agreed_failure(failures)
    if reasons:
        raise TrainingError(
            f"checkpoint {run_dir / CHECKPOINTS / tag} is unreadable ({reasons}); "
            "delete that folder to fall back to an older one, or start afresh with another --out"
        )
    if path is None or not client_state or "step" not in client_state:
        raise TrainingError(f"checkpoint {run_dir / CHECKPOINTS / tag} is incomplete (no training state in it)")
    return client_state


def agreed_failure(failures: list[str | None]) -> str:
    """One text for the ranks' load failures (None where a rank succeeded): the reason once if every
    rank failed alike, else each failing rank's; '' if none failed."""
    failed = {rank: reason for rank, reason in enumerate(failures) if reason}
    if not failed:
        return ""
    if len(failed) == len(failures) and len(set(failed.values())) == 1:
        return failed[0]
    return "; ".join(f"rank {rank}: {reason}" for rank, reason in failed.items())


def _prune(run_dir: Path, keep_last: int, keep: str) -> None:
    """Keep the newest `keep_last` complete checkpoints and `keep`; incomplete folders (crashed saves,
    or ones a resume from an older checkpoint left ahead of it) never count and are removed."""
    tags = checkpoint_dirs(run_dir)
    complete = [p for p in tags if (p / COMPLETE).is_file()]
    kept = {p.name for p in complete[-keep_last:]} | {keep}
    for old in tags:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
