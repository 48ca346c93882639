"""The benchmarks run end to end at toy size and report what they claim to measure."""

import argparse
import json
import math
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from benchmarks import moe_layer, train_step, train_step_contenders, train_step_report
from training import mfu
from zoo import presets
from zoo.describe import describe
from zoo.overrides import apply_sets

TOY = ["model.n_layers=1", "model.vocab_size=256", "data.seq_len=32", "train.micro_batch_size=2"]
TOY_CHILD = ["--preset", "perf_w1", *[f"--set={s}" for s in TOY], "--device", "cpu", "--probe-steps", "1",
             "--child", json.dumps(asdict(train_step_contenders.Candidate("zoo", "fp32")))]
# Repeated probes of one candidate reported step memories up to 8 MiB apart (53-59 MiB, zoo fp32, W1 at one
# layer and batch 1, 2-core EPYC; 34.0-34.1 MiB at TOY): page-granular RSS, threads' scratch. The errors this
# guards against are far larger: counting a parent's 1 GiB reads ~703 MiB at TOY, missing memory freed first ~15.
STEP_MEMORY_NOISE = 16 * 2**20
RUN_CHILD = "import sys\nfrom benchmarks.train_step import main\nmain(sys.argv[1:])"
# A parent holding 1 GiB (touched, so resident) launches the probe, as the benchmark's parent launches its own.
FROM_A_BIG_PARENT = ("import subprocess, sys\nbuf = bytearray(2**30)\nbuf[::4096] = b'\\1' * (2**30 // 4096)\n"
                     "done = subprocess.run([sys.executable, '-c', *sys.argv[1:]], capture_output=True, text=True)\n"
                     "print(done.stdout, end='')\nsys.exit(done.returncode)")
# 512 MiB allocated and freed before the model is built, kept resident for reuse as the benchmark keeps it.
AFTER_FREEING = ("import torch\nfrom training.allocator import retain_freed_memory\nretain_freed_memory()\n"
                 "x = torch.ones(2**27)\ndel x\n" + RUN_CHILD)


def _probe_step_bytes(code: str, *args: str) -> int:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=train_step.REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["step_bytes"]


@pytest.fixture(scope="module")
def plain_probe_step_bytes() -> int:
    return _probe_step_bytes(RUN_CHILD, *TOY_CHILD)


def _gradient_bytes() -> int:
    from zoo import presets
    from zoo.builders import build
    from zoo.overrides import apply_sets

    return sum(p.numel() * p.element_size() for p in build(apply_sets(presets.get("perf_w1"), TOY)).parameters())


@pytest.mark.slow
def test_probe_step_memory_is_not_the_parents_peak(plain_probe_step_bytes):
    """The probe reads its own resident high-water mark: getrusage's peak starts at the parent's, and from
    this parent it would say 1.1 GiB more."""
    from_big_parent = _probe_step_bytes(FROM_A_BIG_PARENT, RUN_CHILD, *TOY_CHILD)
    assert abs(from_big_parent - plain_probe_step_bytes) < STEP_MEMORY_NOISE, (from_big_parent, plain_probe_step_bytes)


@pytest.mark.slow
def test_probe_step_memory_counts_memory_freed_before_the_steps(plain_probe_step_bytes):
    """Memory freed before the steps (transformers' contender builds the zoo model and deletes it) stays
    resident for reuse; the steps reused it and the resident set hardly grew."""
    after_freeing = _probe_step_bytes(AFTER_FREEING, *TOY_CHILD)
    assert abs(after_freeing - plain_probe_step_bytes) < STEP_MEMORY_NOISE, (after_freeing, plain_probe_step_bytes)
    # Every parameter's fp32 gradient exists at the end of backward (set_to_none freed the last step's).
    assert min(after_freeing, plain_probe_step_bytes) > _gradient_bytes()


@pytest.mark.slow
def test_train_step_benchmark_compares_the_same_workload(tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = ["--preset", "perf_w1", *[f"--set={s}" for s in TOY], "--hf-experts", "eager", "--hf-attention", "sdpa",
            "--precisions", "fp32,bf16", "--probe-steps", "1", "--warmup", "1", "--reps", "2", "--json", str(out)]
    assert train_step.main(argv) == 0
    result = json.loads(out.read_text())
    losses = result["fp32_loss"]
    assert abs(losses["zoo"] - losses["transformers"]) < train_step_contenders.LOSS_TOLERANCE
    assert result["fp32_logits_max_abs_diff"] <= train_step_contenders.LOGITS_TOLERANCE
    assert len(result["probes"]) == 4 and all(p.get("seconds", 0) > 0 for p in result["probes"])
    # Model FLOPs are describe's forward FLOPs per token of the benchmarked spec, x 3 for a train step; MFU
    # divides them by the matmul peak measured for the row's dtype (measured again where the machine was
    # busy, so this process cannot re-read it from $ZOO_CACHE: the result's peak is the one it used).
    spec = apply_sets(presets.get("perf_w1"), TOY)
    assert result["forward_flops_per_token"] == describe(spec, seq_len=spec.data.seq_len)["flops_per_token"]
    assert result["tokens_per_step"] == spec.train.micro_batch_size * spec.data.seq_len
    for side in ("zoo", "transformers"):
        row = result["results"][side]
        assert row["tokens_per_s"] > 0 and row["peak_step_memory_bytes"] > 0  # /proc is here: measured
        assert row["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / (row["step_ms"] / 1e3))
        assert row["achieved_flops"] == pytest.approx(
            row["tokens_per_s"] * result["forward_flops_per_token"] * mfu.TRAIN_FLOPS_PER_FORWARD_FLOP, rel=1e-12)
        precision = row["label"].split()[1]
        peak = result["peak_flops"][precision]["measured"]
        if precision == "bf16" and not mfu.cpu_has_native_bf16():  # emulated: no peak
            assert peak is None and row["mfu"] is None and row["peak_flops"] is None
        else:
            assert row["peak_flops"] == peak > 0
            assert row["mfu"] == pytest.approx(row["achieved_flops"] / peak, rel=1e-12)
    assert result["speedup"] == pytest.approx(result["results"]["transformers"]["step_ms"]
                                              / result["results"]["zoo"]["step_ms"])
    assert "zoo / transformers speed" in capsys.readouterr().out


@pytest.mark.parametrize("native", [True, False])
def test_train_step_probes_bf16_only_where_the_device_has_it(monkeypatch, native):
    import torch

    monkeypatch.setattr(train_step_contenders, "native_bf16", lambda device: native)
    assert train_step_contenders.default_precisions(torch.device("cpu")) == (["fp32", "bf16"] if native else ["fp32"])


@pytest.mark.parametrize("argv,words", [
    (["--preset", "perf_w1", "--set", "model.nosuch=1"], "nosuch"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "perf_w1", "--json", "/nonexistent/dir/r.json"], "does not exist"),
    (["--preset", "baseline", "--set", "model.n_layers=1"], "--no-hf"),  # a softmax router: no HF format
])
def test_train_step_benchmark_bad_input_is_one_line_exit_2(argv, words, capsys):
    assert train_step.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("skew", [0.0, pytest.param(0.4, marks=pytest.mark.slow)], ids=["balanced", "unequal-loads"])
def test_moe_layer_dispatchers_agree_with_the_fp32_reference(skew):
    args = argparse.Namespace(hf_experts=["eager", "grouped_mm"], warmup=0, reps=1, skew=skew)
    rows = moe_layer.run(moe_layer.WORKLOADS["w1"], "bf16", args)
    names = [r["name"] for r in rows]
    assert names[:3] == ["zoo grouped_mm", "zoo padded_bmm", "zoo loop"] and names[-1].startswith("dense")
    for row in rows[:-1]:
        assert row["ms"] > 0, row
        out_err, dx_err = (float(part.split()[1]) for part in row["check"].split(", "))
        assert out_err < 2e-2 and dx_err < 2e-2, row


def test_moe_layer_skew_makes_expert_loads_unequal():
    import torch

    def imbalance(skew):
        w = moe_layer.WORKLOADS["w2"]
        counts = torch.bincount(moe_layer.routing(w, skew=skew)[1].flatten(), minlength=w.n_experts).float()
        return (counts.max() / counts.mean()).item()

    assert imbalance(0.0) < 1.5 < 3.0 < imbalance(0.4)


def test_same_workload_check_compares_the_logits(monkeypatch):
    """routed_scaling_factor 1% off in transformers' config moves the toy loss by 2.8e-4, under
    LOSS_TOLERANCE, and the logits by 2e-2: only the logits catch it."""
    from zoo import presets
    from zoo.interop import hf
    from zoo.overrides import apply_sets

    spec = apply_sets(presets.get("perf_w1"), TOY)
    train_step_contenders.check_same_workload(spec, torch.device("cpu"))  # the same weights and config pass
    config_dict = hf.hf_config_dict

    def one_percent_off(spec, **kwargs):
        fields = config_dict(spec, **kwargs)
        return {**fields, "routed_scaling_factor": fields["routed_scaling_factor"] * 1.01}

    monkeypatch.setattr(hf, "hf_config_dict", one_percent_off)
    with pytest.raises(SystemExit, match="logits differ by up to"):
        train_step_contenders.check_same_workload(spec, torch.device("cpu"))


def _fake_measurement(monkeypatch, rate: float) -> list:
    """measure_matmul_peak patched to return `rate`; the list collects each call's dtype and device."""
    calls = []

    def measure(dtype, device=None, **_):
        calls.append((dtype, "cpu" if device is None else device.type))
        return rate

    monkeypatch.setattr(mfu, "measure_matmul_peak", measure)
    monkeypatch.setattr(mfu, "measure_cpu_peak", lambda dtype: (measure(dtype), 1.0))  # a quiet machine
    return calls


def test_bf16_without_bf16_instructions_has_no_peak_nor_mfu(monkeypatch, tmp_path):
    """Emulated bf16 measured ~1 GFLOP/s on a 256^3 matmul and 3-5 in the model: against that "peak" MFU
    would read 106.7%, so there is none."""
    monkeypatch.setattr(mfu, "cpu_has_native_bf16", lambda: False)
    calls = _fake_measurement(monkeypatch, 1e9)
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    assert math.isnan(mfu.peak_flops(torch.bfloat16, torch.device("cpu"), cache_dir=tmp_path)) and not calls
    assert mfu.peak_flops(torch.float32, torch.device("cpu"), cache_dir=tmp_path) == 1e9  # fp32 is still measured
    peaks = train_step_report.dtype_peaks(["fp32", "bf16"], torch.device("cpu"))
    assert peaks == {"fp32": {"measured": 1e9, "datasheet": None, "busy": False},
                     "bf16": {"measured": None, "datasheet": None, "busy": False}}
    row = train_step_report.report_line("zoo bf16", [0.1, 0.1], 100, 1e6, peaks["bf16"])
    assert row["mfu"] is None and row["peak_flops"] is None and not row["mfu_above_peak"]
    row["peak_step_memory_bytes"] = 2**20
    lines = train_step_report.results_table({"zoo": row}, {"bf16": peaks["bf16"]}, torch.device("cpu"))
    assert lines[1].split()[-2:] == ["n/a", "1"] and "bf16 n/a (this CPU has no bf16 instructions" in lines[2]


def test_a_peak_measured_on_a_busy_machine_is_flagged_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(mfu, "measure_cpu_peak", lambda dtype: (91.6e9, 0.55))
    peaks = train_step_report.dtype_peaks(["fp32"], torch.device("cpu"))
    assert peaks == {"fp32": {"measured": 91.6e9, "datasheet": None, "busy": True}}
    err = capsys.readouterr().err
    assert err.startswith("warning: the float32 matmul peak (91.6 GFLOP/s) was measured while other processes used "
                          "the CPU") and err.count("\n") == 1


def test_mfu_above_100_percent_is_flagged_never_plain():
    assert mfu.format_mfu(0.438) == "43.8%" and mfu.format_mfu(None) == mfu.format_mfu(math.nan) == "n/a"
    assert mfu.format_mfu(1.067) == "106.7%!"
    peaks = {"measured": 1e9, "datasheet": None}
    row = train_step_report.report_line("zoo bf16", [0.1, 0.1], 100, 1e6, peaks)  # 3e9 FLOP/s achieved
    assert row["mfu"] == pytest.approx(3.0) and row["mfu_above_peak"]
    table = train_step_report.results_table({"zoo": row}, {"bf16": peaks}, torch.device("cpu"))
    assert "300.0%!" in table[1] and table[-1] == mfu.MFU_ABOVE_PEAK_NOTE


def test_cuda_mfu_is_against_the_measured_peak_and_the_datasheet_is_separate(monkeypatch):
    """MFU is against the peak measured on the GPU, as the table's line says; the datasheet's is a column apart."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    calls = _fake_measurement(monkeypatch, 783e12)
    cuda = torch.device("cuda")
    peaks = train_step_report.dtype_peaks(["bf16"], cuda)
    assert peaks == {"bf16": {"measured": 783e12, "datasheet": 989e12, "busy": False}} and calls == [(torch.bfloat16, "cuda")]
    row = train_step_report.report_line("zoo bf16 compiled", [0.085] * 3, 32 * 1024, 224e6, peaks["bf16"])
    achieved = 32 * 1024 / 0.085 * 224e6 * mfu.TRAIN_FLOPS_PER_FORWARD_FLOP
    assert row["mfu"] == pytest.approx(achieved / 783e12) and row["peak_flops"] == 783e12
    assert row["mfu_datasheet"] == pytest.approx(achieved / 989e12) and row["datasheet_peak_flops"] == 989e12
    lines = train_step_report.results_table({"zoo": row}, peaks, cuda)
    assert mfu.format_mfu(row["mfu"]) in lines[1] and mfu.format_mfu(row["mfu_datasheet"]) not in lines[1]
    assert "measured on this cuda" in lines[2] and "bf16 783 TFLOP/s" in lines[2]
    assert lines[3] == ("MFU against the datasheet's peak instead (bf16 989 TFLOP/s): zoo bf16 compiled "
                        + mfu.format_mfu(row["mfu_datasheet"]))
    assert len(calls) == 1  # measured once, reused by the row and the table


def test_cpu_peak_cache_tells_apart_cpus_with_one_name(monkeypatch, tmp_path):
    """A VM shows "AMD EPYC" for an AVX2 host and for one with avx512_bf16: the cache key holds the CPU's
    capability too, so each keeps its own peak."""
    monkeypatch.setattr(mfu, "_cpu_name", lambda: "AMD EPYC")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(mfu, "cpu_has_native_bf16", lambda: False)
    _fake_measurement(monkeypatch, 147e9)
    assert mfu.peak_flops(torch.float32, torch.device("cpu"), cache_dir=tmp_path) == 147e9
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(mfu, "cpu_has_native_bf16", lambda: True)
    _fake_measurement(monkeypatch, 229e9)
    assert mfu.peak_flops(torch.float32, torch.device("cpu"), cache_dir=tmp_path) == 229e9
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(mfu, "cpu_has_native_bf16", lambda: False)
    assert mfu.peak_flops(torch.float32, torch.device("cpu"), cache_dir=tmp_path) == 147e9  # cached, not 229
    assert len(json.loads((tmp_path / "matmul_peak.json").read_text())) == 2
