"""Everything between a RunSpec and a DeepSpeed engine: process group, DeepSpeed config, optimizer,
learning-rate schedule.

- One code path for a laptop and a cluster: a single `python training/run.py` gets a one-rank
  gloo (CPU) or NCCL (GPU) group, a `deepspeed` launch gets the launcher's.
- The optimizer is DeepSpeed's Muon-with-auxiliary-Adam, given as a client optimizer: Muon for
  hidden matrices (stacked expert weights orthogonalised per expert), AdamW for embeddings, LM
  head, routers, norms and biases. The config-file "Muon" type chooses by parameter name only and
  would put routers on Muon, hence the client optimizer with our own choice.
- Gradient clipping (`train.grad_clip`) acts on the raw gradients, before Newton-Schulz, and the
  norm DeepSpeed reports (`engine.get_global_grad_norm()`, logged as train/grad_norm) is theirs
  (ZeRO-0 in fp32 reports none: the trainer takes it with `unreported_grad_norm`).
  DeepSpeed's ZeRO 1/2/3 optimizers orthogonalise the Muon matrices first and take the norm after
  (stage_1_and_2.py: `get_flat_partition` runs `muon_update` in the step's last backward, `step`
  then calls `scaled_global_norm`; stage3.py: `step` calls `_apply_muon_to_accumulated_grads`
  before `_get_norm_groups`). A Newton-Schulz output has norm ~sqrt(min(m, n)) per matrix, so the
  norm came out at ~320 for deepseek_glm4 (47 at --tiny) at every step, the clip at 1.0 always
  fired and divided every Muon update by that: train.muon_lr was in effect ~300x smaller.
  `initialize` mixes `_ClipBeforeMuonZero12` / `_ClipBeforeMuonZero3` into DeepSpeed's optimizer
  (it builds that itself and has no hook), to get the order of its ZeRO-0 path and its
  BF16_Optimizer: norm of the raw gradients, every gradient clipped by it (a Muon gradient before
  it enters the momentum), then Newton-Schulz. That ignores its input's scale, so for Muon the
  clip only bounds one step's weight in the momentum; it never shrinks the update.
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
import torch.distributed as dist
from torch import nn

from training.mfu import cpu_has_native_bf16
from zoo.blocks.routers import Router
from zoo.host import usable_cpus
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
        set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))))
    import deepspeed

    # init_distributed JIT-compiles a shared-memory op (20 s cold) used only by inference all-reduce.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]), device)


def set_cpu_threads(local_world: int) -> None:
    """An explicit OMP_NUM_THREADS wins (torch read it at start-up); else the cores this process may
    use split between the ranks on this node."""
    if "OMP_NUM_THREADS" not in os.environ:
        # The launcher does not split the cores between ranks; oversubscription halves throughput.
        torch.set_num_threads(max(1, usable_cpus() // local_world))


def ds_config_source(spec: RunSpec, path: str | None) -> tuple[Path, str]:
    """The DeepSpeed config file a run uses, and how the user named it (for error messages)."""
    if path:
        return Path(path), f"--ds-config {path}"
    if spec.deepspeed.config:
        return Path(spec.deepspeed.config), f"deepspeed.config={spec.deepspeed.config}"
    default = DS_CONFIG_DIR / f"zero{spec.deepspeed.zero_stage}_{spec.train.precision}.json"
    return default, str(default)


# What each DeepSpeed key the trainer fills is called in the run spec.
SPEC_FIELDS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
}
# Sections the trainer reads or fills: DeepSpeed indexes into them as dicts.
OBJECT_SECTIONS = ("zero_optimization", "bf16", "fp16")


def resolve_ds_config(spec: RunSpec, path: str | None, world_size: int, named: str | None = None) -> dict:
    """The DeepSpeed config with every "auto" filled from the run spec; conflicts are errors. `named`: how
    errors name the file (default: as the user gave it, see ds_config_source)."""
    train, stage = spec.train, spec.deepspeed.zero_stage
    if train.precision == "auto":
        raise TrainingError("train.precision=auto is resolved per device first (training.precision.resolve_precision)")
    path, default_name = ds_config_source(spec, path)
    named = named or default_name
    if not path.is_file():
        raise TrainingError(f"{named} does not exist; the shipped configs are in {DS_CONFIG_DIR}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TrainingError(f"{named} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise TrainingError(f"{named} holds a JSON {type(config).__name__}; a DeepSpeed config is an object "
                            '({"zero_optimization": {...}, ...})')
    for section in OBJECT_SECTIONS:
        if section in config and not isinstance(config[section], dict):
            raise TrainingError(f"{path} sets \"{section}\": {json.dumps(config[section])}; it must be an object, "
                                f'e.g. \"{section}\": {{{_EXAMPLES[section]}}}')
    wanted = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
    }
    for key, value in wanted.items():
        _fill(config, key, value, path, SPEC_FIELDS[key])
    config.setdefault("zero_optimization", {})
    _fill(config["zero_optimization"], "stage", stage, path, "deepspeed.zero_stage")
    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {})
        _fill(section, "enabled", train.precision == precision, path,
              f"train.precision={train.precision!r}, so {precision}.enabled")
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


_EXAMPLES = {"zero_optimization": '"stage": "auto"', "bf16": '"enabled": "auto"', "fp16": '"enabled": "auto"'}


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
    # Newton-Schulz: DeepSpeed's "gram" variant runs in fp16 where the device has it, else fp32; its
    # "standard" one in bf16 on any CPU. On a CPU with bf16 instructions standard is faster (gram's fp32
    # fallback measured 1.8x slower); on one without, bf16 matmuls crawl, and gram in fp32 is the choice.
    on_cpu = device is None or device.type == "cpu"
    ns_method = "standard" if on_cpu and cpu_has_native_bf16() else "gram"
    special = {id(model.embed.weight), id(model.lm_head.weight)}
    routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
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
    _clip_before_newton_schulz(engine.optimizer)
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


# ----------------------------------------------------------------------------- clipping before Newton-Schulz


def _clip_before_newton_schulz(optimizer) -> None:
    """Give DeepSpeed's ZeRO optimizer our order: raw norm, clip, then Muon (see the module docstring)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, (MuonWithAuxAdam, FP16_UnfusedOptimizer, BF16_Optimizer)):
        return  # ZeRO-0 (fp32, fp16) and BF16_Optimizer already clip before orthogonalising
    mixin = {DeepSpeedZeroOptimizer: _ClipBeforeMuonZero12, DeepSpeedZeroOptimizer_Stage3: _ClipBeforeMuonZero3}.get(
        type(optimizer))
    if mixin is None:
        raise TrainingError(f"DeepSpeed wrapped the optimizer in {type(optimizer).__name__}, whose gradient clipping "
                            "the trainer has not checked against Muon; use the shipped ds_configs/")
    if getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False):
        raise TrainingError("zero_optimization.offload_optimizer with Muon is refused: DeepSpeed's offload path "
                            "clips the orthogonalised update, not the gradient; remove offload_optimizer")
    if any(any(padding) for padding in getattr(optimizer, "round_robin_bit16_padding", [])):
        raise TrainingError("zero_optimization.parameter_alignment with Muon is refused: the trainer's clip before "
                            "Newton-Schulz reads DeepSpeed's unpadded partition layout; remove parameter_alignment")
    # DeepSpeed constructs its ZeRO optimizer inside deepspeed.initialize: the mixin goes in afterwards.
    optimizer.__class__ = type(f"ClipBeforeMuon{type(optimizer).__name__}", (mixin, type(optimizer)), {})
    optimizer.clipped_muon_groups = set()  # groups whose gradient was clipped before Newton-Schulz this step
    optimizer.deferred_muon = {}  # ZeRO-1/2: group -> what Newton-Schulz needs, held until the norm is known
    optimizer.raw_norm_groups = None  # ZeRO-3: the raw gradients' group norms, handed to step()


def _clip_coefficient(norm: torch.Tensor, loss_scale: float, clip: float) -> torch.Tensor | None:
    """What DeepSpeed divides the gradients by (its unscale_and_clip_grads), or None for no clip."""
    from deepspeed.runtime.utils import is_invalid_grad_norm

    if clip <= 0 or is_invalid_grad_norm(norm):
        return None  # an invalid norm: DeepSpeed's own clip zeroes the step, Muon's included
    return torch.clamp((norm / loss_scale + 1e-6) / clip, min=1.0)


class _ClipBeforeMuonZero12:
    """Mixed into DeepSpeed's ZeRO-1/2 optimizer: Newton-Schulz waits for the norm of the raw gradients.

    DeepSpeed orthogonalises a Muon group while filling its gradient partition at the end of the
    step's last backward (`get_flat_partition`). Here that call keeps the group's full gradient
    matrices and hands back their raw slices for this rank's partition, so the norm `step` takes
    is the raw one; `scaled_global_norm` then clips the kept matrices by the global coefficient and
    runs DeepSpeed's own Muon partition fill on them, and `unscale_and_clip_grads` does not clip
    the resulting update again.
    """

    def get_flat_partition(self, tensor_list, first_offset, partition_size, dtype, device, param_group_idx,
                           return_tensor_list=False):
        if not (return_tensor_list and tensor_list and self._is_muon_group(tensor_list) and self.compute_grad_norm):
            return super().get_flat_partition(tensor_list, first_offset, partition_size, dtype, device,
                                              param_group_idx, return_tensor_list)
        grads = self.all_grad_tensors[param_group_idx]  # full matrices, reduced over the ranks
        self.deferred_muon[param_group_idx] = (tensor_list, first_offset, partition_size, dtype, device, grads)
        # This rank's slice of the group's flat gradient: the first tensor from first_offset, then whole
        # tensors until partition_size, zero-padded at the end (DeepSpeed's unpadded layout).
        slices, used = [], 0
        for i, grad in enumerate(grads):
            start = first_offset if i == 0 else 0
            count = min(grad.numel() - start, partition_size - used)
            slices.append(grad.reshape(-1).narrow(0, start, count))
            used += count
        if used < partition_size:
            slices.append(torch.zeros(partition_size - used, dtype=dtype, device=device))
        return slices

    def scaled_global_norm(self, norm_type=2):
        deferred, self.deferred_muon = self.deferred_muon, {}
        # Raw gradients carry the loss scale that a Newton-Schulz output lacks: not marked as lacking it yet.
        self.groups_lacking_loss_scale.difference_update(deferred)
        norm = super().scaled_global_norm(norm_type)
        coefficient = _clip_coefficient(norm, self.loss_scale, self.clip_grad)
        self.clipped_muon_groups = set(deferred) if coefficient is not None else set()
        for i, (tensor_list, first_offset, partition_size, dtype, device, grads) in deferred.items():
            if coefficient is not None:
                for grad in grads:
                    grad.div_(coefficient.to(grad.dtype))
            self.all_grad_tensors[i] = grads
            self.averaged_gradients[i] = super().get_flat_partition(tensor_list, first_offset, partition_size,
                                                                    dtype, device, i, return_tensor_list=True)
            self.all_grad_tensors[i] = None
        return norm

    def unscale_and_clip_grads(self, grad_groups_flat, total_norm):
        clipped = {id(self.single_partition_of_fp32_groups[i].grad) for i in self.clipped_muon_groups}
        if any(id(grad) in clipped for grad in grad_groups_flat):
            total_norm = torch.zeros_like(total_norm)  # clipped before Newton-Schulz: only the loss scale is left
        super().unscale_and_clip_grads(grad_groups_flat, total_norm)


class _ClipBeforeMuonZero3:
    """Mixed into DeepSpeed's ZeRO-3 optimizer: the raw gradients' norm and clip come before Newton-Schulz.

    DeepSpeed's `step` orthogonalises (`_apply_muon_to_accumulated_grads`) and then takes the norm
    (`_get_norm_groups`). Here the first takes the raw norm, clips the Muon partitions by it and
    leaves the raw group norms for the second to return; `unscale_and_clip_grads` does not clip
    the Muon update again.
    """

    def _apply_muon_to_accumulated_grads(self):
        from deepspeed.runtime.utils import combine_grad_norm_groups

        muon = [i for i, uses in enumerate(getattr(self, "sub_groups_using_muon", [])) if uses]
        self.sub_groups_lacking_loss_scale.difference_update(muon)  # raw gradients carry the loss scale
        norm_groups = self._get_norm_groups()
        coefficient = _clip_coefficient(combine_grad_norm_groups(norm_groups), self.loss_scale, self.clip_grad)
        self.clipped_muon_groups = set(muon) if coefficient is not None else set()
        if coefficient is not None:
            for i in muon:
                for grad in self.averaged_gradients[i]:
                    grad.div_(coefficient.to(grad.dtype))
        super()._apply_muon_to_accumulated_grads()
        self.raw_norm_groups = norm_groups

    def _get_norm_groups(self):
        norm_groups, self.raw_norm_groups = self.raw_norm_groups, None
        return norm_groups if norm_groups is not None else super()._get_norm_groups()

    def unscale_and_clip_grads(self, sub_group_id, total_norm):
        if sub_group_id in self.clipped_muon_groups:
            total_norm = torch.zeros_like(total_norm)  # clipped before Newton-Schulz: only the loss scale is left
        super().unscale_and_clip_grads(sub_group_id, total_norm)
