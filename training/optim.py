"""The optimizer and the learning-rate schedule.

DeepSpeed's Muon-with-auxiliary-Adam, given to DeepSpeed as a client optimizer: Muon for hidden
matrices (stacked expert weights orthogonalised per expert), AdamW for embeddings, LM head, routers,
norms and biases. DeepSpeed's config-file "Muon" type chooses by parameter name only and would put
routers on Muon, hence the client optimizer with our own choice. The schedule: linear warmup, then
cosine decay to `min_lr_ratio` of the peak, in optimizer steps. `train.optimizer=adamw` puts every
parameter on the same optimizer's AdamW groups: the baseline a Muon comparison needs, with the same
ZeRO, checkpoint and resume paths.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.mfu import cpu_has_native_bf16
from zoo.blocks.routers import Router
from zoo.specs import RunSpec

MUON_MOMENTUM = 0.95
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def optimizer_groups(model: nn.Module, spec: RunSpec, device: torch.device | None = None) -> list[dict]:
    """Muon for hidden matrices; AdamW for embeddings, head, routers (decayed) and norms, biases (not).
    Under train.optimizer=adamw every matrix is in the decayed AdamW group and none on Muon."""
    train = spec.train
    # Newton-Schulz: DeepSpeed's "gram" variant runs in fp16 where the device has it, else fp32; its
    # "standard" one in bf16 on any CPU. On a CPU with bf16 instructions standard is faster (gram's fp32
    # fallback measured 1.8x slower); on one without, bf16 matmuls crawl, and gram in fp32 is the choice.
    on_cpu = device is None or device.type == "cpu"
    ns_method = "standard" if on_cpu and cpu_has_native_bf16() else "gram"
    special = {id(p) for p in model.vocab_parameters()}  # embeddings and heads, the MTP modules' own too
    routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    muon, adam, adam_no_decay = [], [], []
    for param in model.parameters():
        on_muon = train.optimizer == "muon" and (param.ndim == 2 or (param.ndim == 3 and train.muon_experts))
        if on_muon and id(param) not in special and id(param) not in routers:
            param.use_muon = True
            param.is_expert_group = param.ndim == 3  # stacked experts: Newton-Schulz per expert
            muon.append(param)
        else:
            param.use_muon = False
            (adam if param.ndim >= 2 else adam_no_decay).append(param)
    groups = [
        dict(name="muon", params=muon, use_muon=True, lr=train.muon_lr, momentum=MUON_MOMENTUM,
             weight_decay=train.weight_decay, ns_method=ns_method),
        dict(name="adam", params=adam, use_muon=False, lr=train.adam_lr, betas=ADAM_BETAS, eps=ADAM_EPS,
             weight_decay=train.weight_decay),
        dict(name="adam_no_decay", params=adam_no_decay, use_muon=False, lr=train.adam_lr, betas=ADAM_BETAS,
             eps=ADAM_EPS, weight_decay=0.0),
    ]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, spec: RunSpec) -> float:
    """Multiplier of each group's peak LR after `step` optimizer steps: warmup, then cosine to a floor."""
    train = spec.train
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    decay_steps = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, spec: RunSpec, groups: list[dict] | None = None):
    if not spec.train.compile:
        # DeepSpeed's Muon wraps Newton-Schulz in torch.compile: ~16 s of inductor compilation on a
        # CPU before the first step. Eager is fast enough at these sizes; train.compile turns it back on.
        import torch._dynamo

        torch._dynamo.config.disable = True
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    return MuonWithAuxAdam(groups if groups is not None else optimizer_groups(model, spec))


def make_scheduler(spec: RunSpec):
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec))
