"""bf16 autocast training tracks fp32 training: the optimized CPU bf16 paths (grouped-GEMM dispatch,
matmul attention, fused LM-head loss) must not cost accuracy. And `train.precision=auto` picks bf16
only where the device computes it natively (training/precision.py)."""

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from training import mfu, precision
from training.errors import TrainingError
from zoo import presets
from zoo.builders import build
from zoo.overrides import with_changes

STEPS = 40


def _batches(seq: int, batch: int, steps: int) -> list[torch.Tensor]:
    """Byte tokens of a real text (Python's argparse source), consecutive windows."""
    data = torch.tensor(list(Path(argparse.__file__).read_bytes()), dtype=torch.long)
    size = seq * batch
    return [data[i * size:(i + 1) * size].view(batch, seq) for i in range(steps)]


def _train(precision: str, seed: int) -> list[float]:
    torch.manual_seed(seed)
    spec = presets.get("perf_w1", tiny=True)
    model = build(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for ids in _batches(spec.data.seq_len, 4, STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(ids, labels=ids, return_logits=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.ce_loss.item())
    return losses


@pytest.mark.slow
def test_bf16_training_reaches_the_fp32_loss_within_seed_noise():
    fp32_a, fp32_b, bf16 = _train("fp32", 0), _train("fp32", 1), _train("bf16", 0)

    def tail(losses):  # mean of the last quarter: less noisy than one step
        return sum(losses[-STEPS // 4:]) / (STEPS // 4)

    assert tail(fp32_a) < 0.7 * fp32_a[0], "the model did not learn; the comparison would be empty"
    seed_noise = abs(tail(fp32_a) - tail(fp32_b))
    assert abs(tail(bf16) - tail(fp32_a)) <= max(2 * seed_noise, 0.02 * tail(fp32_a)), (
        f"bf16 {tail(bf16):.4f} vs fp32 {tail(fp32_a):.4f} (seed noise {seed_noise:.4f})")


# ----------------------------------------------------------------------------- train.precision=auto


def _spec(**changes):
    return with_changes(presets.get("deepseek_glm4", tiny=True), changes)


@pytest.mark.parametrize("native,stage,expected", [(True, 1, "bf16"), (False, 1, "fp32"), (True, 0, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, native, stage, expected):
    monkeypatch.setattr(mfu, "cpu_has_native_bf16", lambda: native)
    spec = _spec(**{"deepspeed.zero_stage": stage})
    assert spec.train.precision == "auto"
    assert precision.resolve_precision(spec, torch.device("cpu")).train.precision == expected


def test_explicit_bf16_on_a_cpu_without_bf16_trains_as_asked_with_a_warning(monkeypatch):
    monkeypatch.setattr(mfu, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without bf16 instructions"):
        resolved = precision.resolve_precision(_spec(**{"train.precision": "bf16"}), torch.device("cpu"))
    assert resolved.train.precision == "bf16"
    monkeypatch.setattr(mfu, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.resolve_precision(_spec(**{"train.precision": "bf16"}), torch.device("cpu"))


@pytest.mark.parametrize("changes,words", [({"train.precision": "fp16"}, "refused on CPU"),
                                           ({"train.precision": "bf16", "deepspeed.zero_stage": 0}, "zero_stage >= 1")])
def test_precisions_the_cpu_cannot_train_in_are_refused(changes, words):
    with pytest.raises(TrainingError, match=words):
        precision.resolve_precision(_spec(**changes), torch.device("cpu"))


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="reads x86 /proc/cpuinfo")
def test_native_bf16_matches_the_cpu_flags():
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    assert mfu.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags or "amx_tile" in flags)


def test_matmul_peak_skips_sizes_that_would_exceed_its_budget(monkeypatch):
    sizes = []
    real_mm = torch.mm

    def mm(a, b):
        sizes.append(a.shape[0])
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", mm)
    start = time.perf_counter()
    peak = mfu.measure_matmul_peak(torch.float32, sizes=(8192,), repeats=2, budget_s=0.5)
    assert peak > 0 and set(sizes) == {mfu.PEAK_PROBE_SIZE}, sizes  # 8192^3 would take seconds a matmul
    assert time.perf_counter() - start < 5


def test_matmul_peak_is_measured_on_the_device_asked_for(monkeypatch):
    """The probe's matrices live on the device asked for, or a GPU's MFU would be divided by the CPU's peak."""
    devices = []
    real_mm = torch.mm

    def mm(a, b):
        devices.append((a.device.type, b.device.type))
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", mm)
    mfu.measure_matmul_peak(torch.float32, torch.device("meta"), sizes=(512,), repeats=1)  # meta: no compute
    assert devices and set(devices) == {("meta", "meta")}


def test_a_cpu_peak_measured_beside_busy_processes_says_so(tmp_path):
    """One spinning process per core takes about half of every core from the measurement (0.50-0.62
    measured on a 2-core VM, against 0.90 alone): its share falls below QUIET_CPU_SHARE, so the peak
    is not cached and the run is warned that its MFU reads high."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    spin = "import time\nend = time.time() + 20\nwhile time.time() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(max(cores, torch.get_num_threads()))]
    try:
        time.sleep(0.5)  # let them start spinning
        peak, share = mfu.measure_cpu_peak(torch.float32)
        with pytest.warns(mfu.BusyPeakWarning, match=r"measured while other processes used the CPU .* not cached"):
            busy = mfu.measured_peak_flops(torch.float32, torch.device("cpu"), cache_dir=tmp_path)
    finally:
        for process in spinners:
            process.kill()
            process.wait()
    assert peak > 0 and busy > 0 and share < mfu.QUIET_CPU_SHARE, share
    assert not (tmp_path / "matmul_peak.json").exists()


def _measure_with_share(monkeypatch, rate: float, share: float) -> list:
    """measure_cpu_peak patched to return (rate, share); the list counts the measurements."""
    calls = []
    monkeypatch.setattr(mfu, "measure_cpu_peak", lambda dtype: (calls.append(dtype), (rate, share))[1])
    return calls


def test_only_a_quiet_cpu_peak_is_cached(monkeypatch, tmp_path, recwarn):
    """A peak measured on a busy machine is not cached: kept, it would make every later MFU read ~1.6x
    too high (91.6 GFLOP/s measured while a test suite ran beside the trainer, 147 measured alone)."""
    calls = _measure_with_share(monkeypatch, 91.6e9, 0.55)
    for _ in range(2):  # busy: used for this run, measured again by the next
        with pytest.warns(mfu.BusyPeakWarning, match=r"91\.6 GFLOP/s.*got 55% of its threads' time"):
            assert mfu.measured_peak_flops(torch.float32, torch.device("cpu"), cache_dir=tmp_path) == 91.6e9
    assert len(calls) == 2 and not (tmp_path / "matmul_peak.json").exists()
    calls = _measure_with_share(monkeypatch, 147e9, 0.9)
    for _ in range(2):  # quiet: measured once, then read from the cache
        assert mfu.measured_peak_flops(torch.float32, torch.device("cpu"), cache_dir=tmp_path) == 147e9
    assert len(calls) == 1 and not recwarn.list
    cached = json.loads((tmp_path / "matmul_peak.json").read_text())
    assert cached == {mfu.cpu_peak_cache_key(torch.float32): 147e9}


def test_cpu_share_counts_the_largest_sizes_timed_matmuls_alone(monkeypatch):
    """measure_cpu_peak's share is CPU time over wall time x threads, of the largest size's timed
    matmuls only. Fake clocks: the setup (random matrices) takes 1 s of wall and 1 s of CPU time, on one
    thread; a matmul of the probe size 0.5 s of wall and 0.5 s of CPU time (one busy thread of two), of
    the larger sizes 0.5 s and 0.6 s. Counting the setup in would make a quiet machine's share fall with
    its core count (8 cores: 0.79 against QUIET_CPU_SHARE 0.8)."""
    clock = {"wall": 0.0, "cpu": 0.0}
    sizes = []

    def advance(wall, cpu):
        clock["wall"] += wall
        clock["cpu"] += cpu

    def randn(size, *args, **kwargs):
        sizes.append(size)
        advance(1.0, 1.0)
        return torch.zeros(1)

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(torch, "mm", lambda a, b: advance(0.5, 0.5 if sizes[-1] == mfu.PEAK_PROBE_SIZE else 0.6))
    monkeypatch.setattr(mfu.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(mfu.time, "process_time", lambda: clock["cpu"])
    # Every size runs (the fake clock's rate would have skipped them).
    monkeypatch.setattr(mfu, "measure_matmul_peak", functools.partial(mfu.measure_matmul_peak, budget_s=1e9))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    _, share = mfu.measure_cpu_peak(torch.float32)
    assert set(sizes) == {mfu.PEAK_PROBE_SIZE, *mfu.PEAK_MATMUL_SIZES}
    assert share == pytest.approx(0.6 / (0.5 * 2))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # 2 threads, 1 core: its time
    assert mfu.measure_cpu_peak(torch.float32)[1] == pytest.approx(0.6 / 0.5)


def _peak_on_a_fake_gpu(monkeypatch, name: str, dtype: torch.dtype) -> float | tuple:
    """peak_flops for a CUDA GPU called `name`; a measurement comes back as ("measured", dtype, device)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(mfu, "measure_matmul_peak", lambda dtype, device=None, **_: ("measured", dtype, device))
    return mfu.peak_flops(dtype, torch.device("cuda"))


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA GH200 480GB", 989e12), ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12), ("NVIDIA GeForce RTX 4090", 165e12),
])
def test_datasheet_peak_matches_the_gpu_model(monkeypatch, name, peak):
    assert _peak_on_a_fake_gpu(monkeypatch, name, torch.bfloat16) == peak


@pytest.mark.parametrize("name", ["NVIDIA L40S", "NVIDIA A10G", "Tesla T4"])
def test_a_gpu_missing_from_the_table_is_measured_on_itself(monkeypatch, name):
    """Names match word by word, not by substring: "NVIDIA L40S" contains "L4", whose peak (121 TFLOP/s)
    is about a third of an L40S's."""
    assert _peak_on_a_fake_gpu(monkeypatch, name, torch.bfloat16) == ("measured", torch.bfloat16, torch.device("cuda"))


def test_fp32_on_a_gpu_is_half_the_bf16_peak_only_with_tf32(monkeypatch):
    """Without TF32 (PyTorch's default) fp32 matmuls run on CUDA cores, 67 against 989 TFLOP/s on an
    H100: the table cannot say, so it is measured; the table's TF32 rate holds only where TF32 is allowed."""
    name, was = "NVIDIA H100 80GB HBM3", torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _peak_on_a_fake_gpu(monkeypatch, name, torch.float32) == ("measured", torch.float32, torch.device("cuda"))
        torch.set_float32_matmul_precision("high")  # allows TF32
        assert _peak_on_a_fake_gpu(monkeypatch, name, torch.float32) == 989e12 / 2
    finally:
        torch.set_float32_matmul_precision(was)


@pytest.mark.parametrize("native,method", [(True, "standard"), (False, "gram")])
def test_newton_schulz_runs_in_bf16_only_on_a_cpu_with_bf16(monkeypatch, native, method):
    """DeepSpeed's "standard" Newton-Schulz runs in bf16 on any CPU; "gram" in fp16 where oneDNN has
    it, else fp32."""
    from training import optim

    monkeypatch.setattr(optim, "cpu_has_native_bf16", lambda: native)
    spec = _spec()
    groups = optim.optimizer_groups(build(spec), spec, torch.device("cpu"))
    assert [g["ns_method"] for g in groups if g["name"] == "muon"] == [method]
