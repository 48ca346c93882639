"""What every gpu_check section shares: the report (say, note, header and the summary's lines), the
device the sections run on, bf16's tolerance, relative error and CUDA-event timing, and the repo's
PYTHONPATH for the subprocess sections."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS: list[str] = []  # one line per figure, reprinted in the summary
BF16_TOL = 2e-2  # relative L2 error vs an fp32 reference that bf16 results must stay under
# "cpu" only with --cpu-smoke (a developer's dry run of the code paths, no real figures). gpu_check's
# main sets it after the sections are imported, so they read it as `common.DEV`, never a copy.
DEV = "cuda"


def say(text: str = "") -> None:
    print(text, flush=True)


def note(line: str) -> None:
    """A figure for the report: printed now and repeated in the summary."""
    RESULTS.append(line)
    say("  " + line)


def header(title: str) -> None:
    say(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cuda_time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Mean milliseconds per call of fn, CUDA events around `reps` calls after `warmup` calls."""
    import torch

    if DEV != "cuda":
        for _ in range(warmup):
            fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) * 1e3 / reps
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def repo_pythonpath() -> str:
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([*parts, str(REPO)] if str(REPO) not in parts else parts)


def run_command(name: str, cmd: list[str], timeout: float) -> subprocess.CompletedProcess | None:
    """`cmd` (a `python ...` command line) run from the repository with its packages importable, shown
    first; None, with a TIMED OUT note under `name`, when it outlives `timeout` seconds."""
    say("  $ " + " ".join(["python", *cmd[1:]]))
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": repo_pythonpath()})
    except subprocess.TimeoutExpired:
        note(f"{name}: TIMED OUT after {timeout} s")
        return None
