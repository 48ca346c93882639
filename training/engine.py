"""The DeepSpeed engine: `deepspeed.initialize` with the zoo's optimizer and schedule (training.optim),
gradients clipped before Newton-Schulz (training.zero_clip), and the gradient norm where DeepSpeed
reports none.

Gradient clipping (`train.grad_clip`) acts on the raw gradients, and the norm DeepSpeed reports
(`engine.get_global_grad_norm()`, logged as train/grad_norm) is theirs; ZeRO-0 in fp32 reports none,
and the trainer takes it with `unreported_grad_norm`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from training.errors import TrainingError
from training.optim import make_optimizer, make_scheduler
from training.zero_clip import clip_before_newton_schulz
from zoo.specs import RunSpec


def initialize(model: nn.Module, spec: RunSpec, groups: list[dict], ds_config: dict,
               source: str = "the DeepSpeed config"):
    """`deepspeed.initialize` with our optimizer and schedule, gradients clipped before Newton-Schulz.
    `source` names the config file in the one-line error for a value DeepSpeed rejects."""
    import deepspeed
    import pydantic

    try:
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model, spec, groups), lr_scheduler=make_scheduler(spec),
            config=ds_config)
    except pydantic.ValidationError as err:  # DeepSpeed's config models; its own message spans many lines
        raise TrainingError(f"{source}: {_validation_summary(err)}") from None
    clip_before_newton_schulz(engine.optimizer)
    return engine, optimizer, scheduler


# The section each DeepSpeed config model reads (its pydantic errors name the model, not the section).
DS_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
               "DeepSpeedFP16Config": "fp16"}


def _validation_summary(err) -> str:
    """One line from a pydantic error: section.key=value and why DeepSpeed refuses it."""
    first = err.errors()[0]
    section = DS_SECTIONS.get(err.title, err.title)
    where = ".".join(str(part) for part in (section, *first["loc"]))
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"DeepSpeed rejects {where}={first.get('input')!r}: {first['msg']}{more}"


def unreported_grad_norm(engine, ep_size: int) -> torch.Tensor | None:
    """The raw gradients' global norm where DeepSpeed reports none, else None. Without a ZeRO, fp16
    or bf16 optimizer (ZeRO-0 in fp32) DeepSpeed clips with the norm and discards it, so a diverged
    step would be applied and checkpointed unseen. Call after a step's last backward (the gradients
    are then all-reduced), before engine.step()."""
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    from deepspeed.moe.utils import is_moe_param

    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # (dense, expert) sums of squares
    for param in engine.module.parameters():
        if param.grad is not None:
            sums[int(is_moe_param(param))] += param.grad.detach().double().square().sum()
    if ep_size > 1:
        # Each expert's gradient is on one rank of every expert-parallel group, all groups alike.
        expert = sums[1:].clone()
        dist.all_reduce(expert)
        sums[1:] = expert / (dist.get_world_size() // ep_size)
    return sums.sum().sqrt()
