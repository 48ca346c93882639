"""What the benchmarks share: timing on CPU or CUDA, medians, a CUDA matmul's rate, peak memory.

Times are wall-clock seconds of one call, with the device synchronised before and after. Each
benchmark alternates the things it compares, call by call, so that a machine that slows down
(another process, thermal limits) slows every contender alike, and reports medians.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(contenders: dict[str, Callable[[], object]], device: torch.device, *, warmup: int, reps: int,
              progress: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """`warmup` untimed calls of each, then `reps` rounds calling each contender once in turn."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(reps):
        for name, fn in contenders.items():
            times[name].append(timed(fn, device))
        if progress:
            progress(rep + 1)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """Median with the relative half-range of the middle half, e.g. '12.3 ms ±2%'."""
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) >= 2 else (values[0],) * 3
    mid = median(values)
    return f"±{50 * (q3 - q1) / mid:.0f}%"


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def release_freed_memory() -> None:
    """Hand memory the process has freed back to the OS: a garbage collection, then glibc's
    malloc_trim(0), which also returns free pages inside the heap. `training.allocator` keeps freed
    memory resident for reuse, so without this a step reuses memory freed earlier (a model built
    and deleted, a previous step's activations) and the resident set does not grow by what it needs.
    Does nothing beyond the collection where the C library is not glibc."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # no C library found, or one without malloc_trim
        pass


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Set this process's resident high-water mark (VmHWM) to its current resident set (Linux >= 4.0:
    "5" in clear_refs). False where that is unavailable. getrusage's ru_maxrss cannot serve: a child
    process starts with its parent's peak (Linux copies it across fork and exec) and it never resets."""
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return peak_rss_bytes() is not None


def peak_rss_bytes() -> int | None:
    """This process's resident high-water mark (VmHWM) since start or the last `reset_peak_rss`."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def measured_cuda_peak(dtype: torch.dtype, device: torch.device, size: int = 8192, reps: int = 10) -> float:
    """FLOP/s of a square `size` matmul in `dtype` on a CUDA device: the mean of `reps` after 3 warm-ups."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    synchronize(device)
    return 2 * size**3 * reps / (time.perf_counter() - start)
