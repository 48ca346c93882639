"""What the loop reports: the opening line, each logged step (TensorBoard scalars, router statistics and
the progress line), and the closing line. Rank 0's Observer writes; the others' are silent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from training.checkpoints import tag_for
from training.memory import format_split, memory_split
from training.mfu import format_mfu
from training.observe import Observer
from training.timing import shares
from zoo.blocks.moe import RouterStats
from zoo.checkpoint import CHECKPOINTS
from zoo.specs import RunSpec


@dataclass
class StepStats:
    """One optimizer step as every rank agrees on it: losses averaged and expert loads summed over the
    accumulation window and all ranks."""

    loss: float
    ce: float
    aux: float
    grad_norm: torch.Tensor | float | None
    lrs: dict[str, float]  # each parameter group's LR for this update
    stats: dict[int, RouterStats]  # the last micro-batch's, per MoE layer
    loads: dict[int, torch.Tensor]  # (E,) per MoE layer
    tokens: int  # over all ranks
    seconds: float
    signalled: bool  # some rank got SIGTERM/SIGINT
    mtp: list[float] = field(default_factory=list)  # each MTP depth's cross-entropy (none without MTP)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def loss_terms(out) -> torch.Tensor:
    """What a micro-batch adds to the step's sums: (loss, ce, aux, then each MTP depth's cross-entropy),
    detached, float64."""
    mtp = [] if out.mtp_losses is None else [out.mtp_losses.detach()]
    return torch.cat([torch.stack([out.loss.detach(), out.ce_loss.detach(), out.aux_loss.detach()]), *mtp]).double()


def mtp_scalars(mtp: list[float]) -> dict[str, float]:
    """TensorBoard names of each MTP depth's training cross-entropy, depth 1 first."""
    return {f"train/mtp_loss_{k}": value for k, value in enumerate(mtp, start=1)}


def mtp_validation(val: dict[str, float]) -> str:
    """The MTP part of the validation line: each depth's loss and how often its greedy guess is the main
    model's (the acceptance rate of greedy drafting on the validation text)."""
    depths = sorted(int(name.rsplit("_", 1)[1]) for name in val if name.startswith("val/mtp_loss_"))
    return "".join(f", MTP {k} loss {val[f'val/mtp_loss_{k}']:.4f} draft acceptance "
                   f"{val[f'val/mtp_draft_acceptance_{k}']:.3f}" for k in depths)


def opening_line(out: Path, spec: RunSpec, world_size: int, data_summary: str, startup_s: float) -> str:
    train, ep_size = spec.train, spec.deepspeed.ep_size
    return (
        f"{out}: {train.steps} steps x {train.micro_batch_size * train.grad_accum * world_size} sequences x "
        f"{spec.data.seq_len} tokens on {world_size} rank(s), {train.precision}, ZeRO-{spec.deepspeed.zero_stage}"
        f"{f', ep_size {ep_size}' if ep_size > 1 else ''}; {data_summary}; start-up {startup_s:.1f} s"
    )


def log_step(observer: Observer, step: int, result: StepStats, *, tokens_seen: int, mfu: float | None,
             biased: dict, world_size: int, skipped_steps: int | None) -> None:
    """`biased`: the routers with auxiliary-loss-free biases, by layer. Every rank calls this: the biases'
    spread across ranks is a collective."""
    tps = result.tokens_per_s
    observer.scalars(step, {"train/loss": result.loss, "train/ce_loss": result.ce, "train/aux_loss": result.aux,
                            "perf/tokens_per_s": tps, "train/tokens": tokens_seen,
                            **({"perf/mfu": mfu} if mfu is not None else {}),
                            **({"train/grad_norm": float(result.grad_norm)} if result.grad_norm is not None else {}),
                            **({"train/skipped_steps": skipped_steps} if skipped_steps is not None else {}),
                            **mtp_scalars(result.mtp), **result.lrs})
    observer.routers(step, result.stats, result.loads, {i: r.e_score_correction_bias for i, r in biased.items()})
    if world_size > 1 and biased:
        observer.scalars(step, {"moe/routing_bias_rank_spread": _rank_spread(biased)})
    observer.progress(step, {"loss": f"{result.loss:.3f}", "tok/s": f"{tps:,.0f}", "mfu": format_mfu(mfu)})


def _rank_spread(routers: dict) -> float:
    """Largest difference of any routing bias between ranks (0 when the update is in sync)."""
    flat = torch.cat([r.e_score_correction_bias for r in routers.values()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return (high - low).max().item()


def closing_line(out: Path, spec: RunSpec, *, start_step: int, tokens_seen: int, val: dict[str, float],
                 wall: float) -> str:
    final = out / CHECKPOINTS / tag_for(spec.train.steps)
    return (
        f"done: {spec.train.steps} steps ({spec.train.steps - start_step} this run), {tokens_seen:,} tokens, "
        f"val loss {val.get('val/loss', float('nan')):.4f} (ppl {val.get('val/ppl', float('nan')):.1f}, "
        f"ln V = {math.log(spec.model.vocab_size):.2f}), {wall:.0f} s; checkpoint {final}; "
        f"view: tensorboard --logdir {out.parent}"
    )


def time_scalars(seconds: dict[str, float], *, steps: int, wall: float) -> dict[str, float]:
    """time/PHASE: seconds per optimizer step over the last `steps` steps; time/step: their wall time."""
    per = max(steps, 1)
    return {"time/step": wall / per, **{f"time/{name}": value / per for name, value in seconds.items()}}


def time_line(totals: dict[str, float], wall: float, engine, device) -> str:
    """Each phase's share of the run's wall time, and the peak memory split (training/memory.py)."""
    return f"time: {wall:.0f} s: {shares(totals, wall)}; {format_split(memory_split(engine, device))}"


def hparams(spec: RunSpec) -> dict:
    from zoo.overrides import flatten

    return {k: v for k, v in flatten(spec).items() if isinstance(v, (int, float, str, bool))}
