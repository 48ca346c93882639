"""Everything between a RunSpec and a DeepSpeed engine: process group, DeepSpeed config, optimizer,
learning-rate schedule.

- One code path for a laptop and a cluster: a single `python training/run.py` gets a one-rank
  gloo (CPU) or NCCL (GPU) group, a `deepspeed` launch gets the launcher's.
- The optimizer is DeepSpeed's Muon-with-auxiliary-Adam, given as a client optimizer: Muon for
  hidden matrices (stacked expert weights orthogonalised per expert), AdamW for embeddings, LM
  head, routers, norms and biases. The config-file "Muon" type chooses by parameter name only and
  would put routers on Muon, hence the client optimizer with our own choice.
- Schedule: linear warmup, then cosine decay to `min_lr_ratio` of the peak, in optimizer steps.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zoo.blocks.routers import SigmoidGroupTopKRouter, SoftmaxTopKRouter
from zoo.specs import RunSpec

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
MUON_MOMENTUM = 0.95
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


class TrainingError(Exception):
    """A user error found before or during training: printed as one line, exit status 2."""


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Dist:
    """Join the launcher's process group, or make a one-rank group when run with plain `python`."""
    single = "RANK" not in os.environ
    if single:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not cuda:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        if "OMP_NUM_THREADS" not in os.environ or single:
            # The launcher does not split the cores between ranks; oversubscription halves throughput.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    import deepspeed

    # init_distributed JIT-compiles a shared-memory op (20 s cold) used only by inference all-reduce.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]), device)


def check_precision(spec: RunSpec, device: torch.device) -> None:
    precision = spec.train.precision
    if precision == "fp16" and device.type == "cpu":
        raise TrainingError(
            "train.precision=fp16 is refused on CPU: fp16 matmuls run ~1000x slower there and DeepSpeed "
            "has no CPU fp16 path; use --set train.precision=bf16 (or fp32)"
        )
    if precision == "bf16" and spec.deepspeed.zero_stage == 0:
        raise TrainingError(
            "train.precision=bf16 needs deepspeed.zero_stage >= 1 (ZeRO-0 would accumulate gradients in bf16); "
            "use --set deepspeed.zero_stage=1, or train.precision=fp32"
        )


def resolve_ds_config(spec: RunSpec, path: str | None, world_size: int) -> dict:
    """The DeepSpeed config with every "auto" filled from the run spec; conflicts are errors."""
    train, stage = spec.train, spec.deepspeed.zero_stage
    path = Path(path or spec.deepspeed.config or DS_CONFIG_DIR / f"zero{stage}_{train.precision}.json")
    if not path.is_file():
        raise TrainingError(f"--ds-config {path} does not exist; the shipped configs are in {DS_CONFIG_DIR}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TrainingError(f"--ds-config {path} is not valid JSON: {err}") from None
    wanted = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
    }
    for key, value in wanted.items():
        _fill(config, key, value, path, f"train.{key}")
    config.setdefault("zero_optimization", {})
    _fill(config["zero_optimization"], "stage", stage, path, "deepspeed.zero_stage")
    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {})
        _fill(section, "enabled", train.precision == precision, path, "train.precision")
    if "train_batch_size" in config:
        _fill(config, "train_batch_size", train.micro_batch_size * train.grad_accum * world_size, path,
              "train.micro_batch_size x train.grad_accum x world size")
    if "optimizer" in config or "scheduler" in config:
        raise TrainingError(
            f"{path} sets an optimizer or scheduler; the trainer builds Muon + AdamW and the warmup-cosine "
            "schedule from train.* fields, so remove those sections"
        )
    config.update(zero_allow_untested_optimizer=True, steps_per_print=10**9, wall_clock_breakdown=False)
    return config


def _fill(section: dict, key: str, value, path: Path, field: str) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value
    elif section[key] != value:
        raise TrainingError(
            f"{path} sets {key}={section[key]!r} but the run has {field}={value!r}; "
            f"make them agree (or write \"auto\" in the config)"
        )


def optimizer_groups(model: nn.Module, spec: RunSpec, device: torch.device | None = None) -> list[dict]:
    """Muon for hidden matrices; AdamW for embeddings, head, routers (decayed) and norms, biases (not)."""
    train = spec.train
    # Newton-Schulz: DeepSpeed's "gram" variant runs in fp16, which a CPU lacks (it falls back to
    # fp32, measured 1.8x slower here than the "standard" variant's bf16).
    ns_method = "gram" if device is not None and device.type == "cuda" else "standard"
    special = {id(model.embed.weight), id(model.lm_head.weight)}
    routers = {id(p) for m in model.modules() if isinstance(m, (SoftmaxTopKRouter, SigmoidGroupTopKRouter))
               for p in m.parameters()}
    muon, adam, adam_no_decay = [], [], []
    for param in model.parameters():
        if param.ndim >= 2 and id(param) not in special and id(param) not in routers:
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
