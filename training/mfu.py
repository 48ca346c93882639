"""Model FLOPs utilisation: achieved model FLOP/s over the device's peak.

Model FLOPs per token come from `zoo describe` (forward) x 3 (forward + backward). The peak is the
device's dense matmul rate for the training dtype. `peak_flops` (the trainer's): on CUDA a table of
datasheet numbers for a GPU it names, else a measurement on that GPU; on CPU a measurement. The
measurement (`measured_peak_flops`, the benchmarks' peak everywhere) is of square matmuls, best of
several; on CPU it is cached on disk per CPU (name, ISA level torch dispatches to, native bf16 or
not), thread count, dtype and torch version because it takes a few seconds. A busy machine lowers
the peak and so inflates every MFU divided by it: a CPU measurement during which this process got
less than QUIET_CPU_SHARE of its threads' time on the CPU (other processes were running) is used for
this run only, with a `BusyPeakWarning`, and measured again next time. An MFU above 100% still says
the peak is wrong, and `format_mfu` marks it so.

bf16 on a CPU without bf16 instructions has no peak (NaN): it is emulated, at ~1 GFLOP/s on a
256^3 matmul and 3-5 on a model's matmuls, so no square-matmul rate bounds what a step achieves.

fp32 on CUDA: with TF32 allowed (torch.set_float32_matmul_precision("high")) matmuls run on tensor
cores at half the bf16 rate; without it, PyTorch's default and this project's, they run on the CUDA
cores at a rate the table does not hold, so it is measured.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import torch

from zoo.files import write_atomic
from zoo.host import usable_cpus

TRAIN_FLOPS_PER_FORWARD_FLOP = 3  # backward costs two forwards (grads w.r.t. inputs and weights)
PEAK_MATMUL_SIZES = (1024, 2048)
CUDA_PEAK_MATMUL_SIZES = (4096, 8192)  # a GPU reaches its peak only on large matmuls
PEAK_REPEATS = 8  # best of several: a busy machine only ever lowers a measurement
PEAK_PROBE_SIZE = 256  # measured first, to skip sizes that would take too long
PEAK_BUDGET_S = 10.0  # most seconds one size's repeats may take
# Share of its threads' wall time a CPU peak measurement must get on the CPU to be cached: 0.90 on an
# idle 2-core VM; 0.62 with one other busy process and 0.50 with another matmul loop (which cut the
# measured peak from 122 to 95 and 68 GFLOP/s).
QUIET_CPU_SHARE = 0.8
PEAK_CACHE_VERSION = 2  # 1 cached measurements from busy machines too
# Dense bf16 tensor-core peaks (datasheets, without sparsity), FLOP/s, keyed by the model words of
# torch.cuda.get_device_name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB").
CUDA_PEAKS = {"H100": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L4": 121e12,
              "A10": 125e12, "4090": 165e12}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions: avx512_bf16 or AMX on x86, oneDNN's bf16
    support elsewhere (aarch64's BF16 extension)."""
    cpu = torch.cpu
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
            return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private helpers: absent in another torch, assume the worst
        return False


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def measure_matmul_peak(dtype: torch.dtype, device: torch.device = torch.device("cpu"), sizes=None,
                        repeats: int = PEAK_REPEATS, budget_s: float = PEAK_BUDGET_S,
                        clock: dict | None = None) -> float:
    """Best observed FLOP/s of square matmuls on `device` (sizes: default PEAK_MATMUL_SIZES, larger on
    CUDA). A probe at PEAK_PROBE_SIZE first: a size whose repeats would take longer than `budget_s` at
    the rate seen so far is skipped (bf16 on a CPU without bf16 instructions ran at 0.3 GFLOP/s, and
    2048^3 would have taken 53 s a matmul). `clock`, if given, receives the process CPU time ("cpu")
    and wall time ("wall") of the largest size's timed matmuls alone."""
    if sizes is None:
        sizes = CUDA_PEAK_MATMUL_SIZES if device.type == "cuda" else PEAK_MATMUL_SIZES
    best = 0.0
    for size in (PEAK_PROBE_SIZE, *sizes):
        if best and (repeats + 1) * 2 * size**3 / best > budget_s:
            break
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        torch.mm(a, b)  # warm up (allocations, kernel selection)
        cpu = wall = 0.0
        for _ in range(repeats):
            _synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            torch.mm(a, b)
            _synchronize(device)  # CUDA kernels run asynchronously: time the matmul, not its launch
            seconds = time.perf_counter() - start
            cpu, wall = cpu + time.process_time() - start_cpu, wall + seconds
            best = max(best, 2 * size**3 / seconds)
        if clock is not None:
            clock.update(cpu=cpu, wall=wall)
    return best


class BusyPeakWarning(UserWarning):
    """The CPU matmul peak was measured while other processes used the CPU: it is too low, and an
    MFU divided by it too high."""


def measure_cpu_peak(dtype: torch.dtype) -> tuple[float, float]:
    """(peak FLOP/s, CPU share): `measure_matmul_peak` on the CPU, and the share of its threads' wall
    time its largest timed matmuls got on the CPU (process CPU time over wall time x threads; 1 is
    all of it). Other processes on the same cores take their share from it. Only the matmuls count:
    the setup (random matrices) runs on one thread, and counted in, it lowered the share of a quiet
    machine the more cores it had (a model of it: 0.96 on 2 cores, 0.79 on 8, 0.47 on 32)."""
    threads = min(torch.get_num_threads(), usable_cpus())
    clock = {"cpu": 0.0, "wall": 0.0}
    peak = measure_matmul_peak(dtype, clock=clock)
    return peak, clock["cpu"] / max(clock["wall"] * threads, 1e-9)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def datasheet_bf16_peak(gpu_name: str) -> float | None:
    """The CUDA_PEAKS entry for `gpu_name`, or None. A key matches when each of its words is a whole
    word of the name (any case), the longest key winning: "NVIDIA L40S" is not an L4, and
    "NVIDIA H100 PCIe" not an SXM H100."""
    words = set(gpu_name.lower().replace("-", " ").split())
    matches = [key for key in CUDA_PEAKS if set(key.lower().split()) <= words]
    return CUDA_PEAKS[max(matches, key=len)] if matches else None


def datasheet_peak_flops(dtype: torch.dtype, device: torch.device) -> float | None:
    """The datasheet's dense peak for `dtype` on a CUDA GPU the table names (fp32: half the bf16
    rate, and only with TF32 allowed); None elsewhere."""
    if device.type != "cuda":
        return None
    peak = datasheet_bf16_peak(torch.cuda.get_device_name(device))
    if peak is None or dtype != torch.float32:
        return peak
    return peak / 2 if torch.backends.cuda.matmul.allow_tf32 else None  # TF32 tensor cores: half the bf16 rate


def cpu_peak_cache_key(dtype: torch.dtype) -> str:
    """What a CPU matmul peak depends on. The model name alone is not enough: a VM may show only
    "AMD EPYC" for an AVX2 host and for one with avx512_bf16."""
    capability = torch.backends.cpu.get_cpu_capability()  # the ISA level torch's kernels dispatch to
    return (f"v{PEAK_CACHE_VERSION}|{_cpu_name()}|{capability}|native_bf16={cpu_has_native_bf16()}"
            f"|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__}")


def measured_peak_flops(dtype: torch.dtype, device: torch.device, cache_dir: Path | None = None) -> float:
    """The measured matmul peak for `dtype` on `device` (cached on disk for a CPU); NaN for bf16 on a
    CPU without bf16 instructions (see above)."""
    if device.type != "cpu":
        return measure_matmul_peak(dtype, device)
    if dtype == torch.bfloat16 and not cpu_has_native_bf16():
        return math.nan
    cache_dir = cache_dir or Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "zoo"))
    key = cpu_peak_cache_key(dtype)
    cache_file = cache_dir / "matmul_peak.json"
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]
    peak, share = measure_cpu_peak(dtype)
    if share < QUIET_CPU_SHARE:
        warnings.warn(BusyPeakWarning(
            f"the {str(dtype).removeprefix('torch.')} matmul peak ({peak / 1e9:.1f} GFLOP/s) was measured while other "
            f"processes used the CPU (this one got {share:.0%} of its threads' time): MFU this run reads too high; "
            "not cached, so the next run measures again"))
        return peak
    cached[key] = peak
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(cache_file, json.dumps(cached, indent=1).encode())
    return peak


def peak_flops(dtype: torch.dtype, device: torch.device, cache_dir: Path | None = None) -> float:
    """The trainer's peak: the datasheet's where `datasheet_peak_flops` has one, else measured. NaN
    where there is none (bf16 on a CPU without bf16 instructions): an MFU divided by it is NaN."""
    peak = datasheet_peak_flops(dtype, device)
    return peak if peak is not None else measured_peak_flops(dtype, device, cache_dir)


def mfu(tokens_per_second: float, forward_flops_per_token: float, peak: float) -> float | None:
    """None where there is no peak (None or NaN)."""
    if peak is None or math.isnan(peak):
        return None
    return tokens_per_second * forward_flops_per_token * TRAIN_FLOPS_PER_FORWARD_FLOP / peak


def format_mfu(value: float | None) -> str:
    """'43.8%'; 'n/a' without a peak (None or NaN); above 100%, the figure with '!' after it: the
    step outran the peak, so the peak, not the model, is what that number measures."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.1%}" + ("!" if value > 1 else "")


MFU_ABOVE_PEAK_NOTE = ("! MFU above 100%: the step ran faster than the peak it is divided by, so that peak is wrong "
                       "(measured on a busy machine? delete $ZOO_CACHE/matmul_peak.json to measure again); "
                       "not a utilisation")
