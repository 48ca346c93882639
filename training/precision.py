"""Which precision a run trains in: `train.precision=auto` resolved per device, and the refusals.

bf16 is only fast where the hardware computes it. On a CPU without bf16 dot-product instructions
(x86: avx512_bf16 or AMX), PyTorch's bf16 matmul falls back to a slow path: 0.3 GFLOP/s against
136 GFLOP/s in fp32 for 2048^3 on a 2-core AVX2 EPYC (Zen 3, torch 2.13.0), so a bf16
run there would take hundreds of times longer. On an avx512_bf16 EPYC (Zen 4) bf16 ran at 983
GFLOP/s against 229 in fp32.

- `auto` (the default): bf16 on a CUDA device that supports it and on a CPU with native bf16,
  when ZeRO >= 1 (bf16 needs it); fp32 otherwise.
- `bf16` asked for explicitly on a CPU without native bf16 runs as asked, with a warning.
- `fp16` on a CPU is refused (no DeepSpeed CPU path; fp16 matmuls are slower still).

What counts as native is `training.mfu.cpu_has_native_bf16` / `native_bf16`; Muon's Newton-Schulz
dtype follows it too (`training.optim.optimizer_groups`).
"""

from __future__ import annotations

import warnings

import torch

from training import mfu
from training.errors import TrainingError
from zoo.overrides import with_changes
from zoo.specs import RunSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
AUTO_CHOICES = ("bf16", "fp32")  # what `auto` resolves to, on some device


def resolve_precision(spec: RunSpec, device: torch.device) -> RunSpec:
    """`spec` with `train.precision` concrete (auto resolved for `device`); raises TrainingError for
    a precision the device or the ZeRO stage cannot train in."""
    precision = spec.train.precision
    if precision == "auto":
        precision = "bf16" if mfu.native_bf16(device) and spec.deepspeed.zero_stage >= 1 else "fp32"
        spec = with_changes(spec, {"train.precision": precision})
    if precision == "fp16" and device.type == "cpu":
        raise TrainingError(
            "train.precision=fp16 is refused on CPU: fp16 matmuls run ~1000x slower there and DeepSpeed "
            "has no CPU fp16 path; use --set train.precision=auto (or bf16, fp32)"
        )
    if precision == "bf16" and spec.deepspeed.zero_stage == 0:
        raise TrainingError(
            "train.precision=bf16 needs deepspeed.zero_stage >= 1 (ZeRO-0 would accumulate gradients in bf16); "
            "use --set deepspeed.zero_stage=1, or train.precision=fp32"
        )
    if precision == "bf16" and device.type == "cpu" and not mfu.cpu_has_native_bf16():
        warnings.warn(
            "train.precision=bf16 on a CPU without bf16 instructions (avx512_bf16 or AMX): its bf16 matmuls may run "
            "hundreds of times slower than fp32 (measured 400x on an AVX2 EPYC); train.precision=auto or fp32 "
            "trains in fp32 here", stacklevel=2)
    return spec
