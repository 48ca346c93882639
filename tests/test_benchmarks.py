"""The benchmarks run end to end at toy size and report what they claim to measure."""

import argparse
import json
import math
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from benchmarks import moe_layer, train_step
from training import mfu
from zoo import presets
from zoo.describe import describe
from zoo.overrides import apply_sets

TOY = ["model.n_layers=1", "model.vocab_size=256", "data.seq_len=32", "train.micro_batch_size=2"]
TOY_CHILD = ["--preset", "perf_w1", *[f"--set={s}" for s in TOY], "--device", "cpu", "--probe-steps", "1",
             "--child", json.dumps(asdict(train_step.Candidate("zoo", "fp32")))]
# Repeated probes of one candidate reported step memories up to 8 MiB apart (53-59 MiB, zoo fp32, W1 at one
# layer and batch 1, 2-core EPYC; 34.0-34.1 MiB at TOY): page-granular RSS, threads' scratch. The defects this
# guards against moved TOY's figure from 87 MiB to 703 (a parent holding 1 GiB) and to 15 (memory freed first).
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
    """getrusage's peak, which the probe used, starts at the parent's: from this parent it said 1.1 GiB more."""
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
    assert abs(losses["zoo"] - losses["transformers"]) < train_step.LOSS_TOLERANCE
    assert result["fp32_logits_max_abs_diff"] <= train_step.LOGITS_TOLERANCE
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

    monkeypatch.setattr(train_step, "native_bf16", lambda device: native)
    assert train_step.default_precisions(torch.device("cpu")) == (["fp32", "bf16"] if native else ["fp32"])


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


@pytest.mark.parametrize("skew", [0.0, 0.4], ids=["balanced", "unequal-loads"])
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
    train_step.check_same_workload(spec, torch.device("cpu"))  # the same weights and config pass
    config_dict = hf.hf_config_dict

    def one_percent_off(spec, **kwargs):
        fields = config_dict(spec, **kwargs)
        return {**fields, "routed_scaling_factor": fields["routed_scaling_factor"] * 1.01}

    monkeypatch.setattr(hf, "hf_config_dict", one_percent_off)
    with pytest.raises(SystemExit, match="logits differ by up to"):
        train_step.check_same_workload(spec, torch.device("cpu"))


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
    """Emulated bf16 measured ~1 GFLOP/s on a 256^3 matmul and 3-5 in the model: MFU came out 106.7%."""
    monkeypatch.setattr(mfu, "cpu_has_native_bf16", lambda: False)
    calls = _fake_measurement(monkeypatch, 1e9)
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    assert math.isnan(mfu.peak_flops(torch.bfloat16, torch.device("cpu"), cache_dir=tmp_path)) and not calls
    assert mfu.peak_flops(torch.float32, torch.device("cpu"), cache_dir=tmp_path) == 1e9  # fp32 is still measured
    peaks = train_step.dtype_peaks(["fp32", "bf16"], torch.device("cpu"))
    assert peaks == {"fp32": {"measured": 1e9, "datasheet": None, "busy": False},
                     "bf16": {"measured": None, "datasheet": None, "busy": False}}
    row = train_step.report_line("zoo bf16", [0.1, 0.1], 100, 1e6, peaks["bf16"])
    assert row["mfu"] is None and row["peak_flops"] is None and not row["mfu_above_peak"]
    row["peak_step_memory_bytes"] = 2**20
    lines = train_step.results_table({"zoo": row}, {"bf16": peaks["bf16"]}, torch.device("cpu"))
    assert lines[1].split()[-2:] == ["n/a", "1"] and "bf16 n/a (this CPU has no bf16 instructions" in lines[2]


def test_a_peak_measured_on_a_busy_machine_is_flagged_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(mfu, "measure_cpu_peak", lambda dtype: (91.6e9, 0.55))
    peaks = train_step.dtype_peaks(["fp32"], torch.device("cpu"))
    assert peaks == {"fp32": {"measured": 91.6e9, "datasheet": None, "busy": True}}
    err = capsys.readouterr().err
    assert err.startswith("warning: the float32 matmul peak (91.6 GFLOP/s) was measured while other processes used "
                          "the CPU") and err.count("\n") == 1


def test_mfu_above_100_percent_is_flagged_never_plain():
    assert mfu.format_mfu(0.438) == "43.8%" and mfu.format_mfu(None) == mfu.format_mfu(math.nan) == "n/a"
    assert mfu.format_mfu(1.067) == "106.7%!"
    peaks = {"measured": 1e9, "datasheet": None}
    row = train_step.report_line("zoo bf16", [0.1, 0.1], 100, 1e6, peaks)  # 3e9 FLOP/s achieved
    assert row["mfu"] == pytest.approx(3.0) and row["mfu_above_peak"]
    table = train_step.results_table({"zoo": row}, {"bf16": peaks}, torch.device("cpu"))
    assert "300.0%!" in table[1] and table[-1] == mfu.MFU_ABOVE_PEAK_NOTE


def test_cuda_mfu_is_against_the_measured_peak_and_the_datasheet_is_separate(monkeypatch):
    """The benchmark's MFU used the datasheet peak on CUDA while the line said "measured"."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    calls = _fake_measurement(monkeypatch, 783e12)
    cuda = torch.device("cuda")
    peaks = train_step.dtype_peaks(["bf16"], cuda)
    assert peaks == {"bf16": {"measured": 783e12, "datasheet": 989e12, "busy": False}} and calls == [(torch.bfloat16, "cuda")]
    row = train_step.report_line("zoo bf16 compiled", [0.085] * 3, 32 * 1024, 224e6, peaks["bf16"])
    achieved = 32 * 1024 / 0.085 * 224e6 * mfu.TRAIN_FLOPS_PER_FORWARD_FLOP
    assert row["mfu"] == pytest.approx(achieved / 783e12) and row["peak_flops"] == 783e12
    assert row["mfu_datasheet"] == pytest.approx(achieved / 989e12) and row["datasheet_peak_flops"] == 989e12
    lines = train_step.results_table({"zoo": row}, peaks, cuda)
    assert mfu.format_mfu(row["mfu"]) in lines[1] and mfu.format_mfu(row["mfu_datasheet"]) not in lines[1]
    assert "measured on this cuda" in lines[2] and "bf16 783 TFLOP/s" in lines[2]
    assert lines[3] == ("MFU against the datasheet's peak instead (bf16 989 TFLOP/s): zoo bf16 compiled "
                        + mfu.format_mfu(row["mfu_datasheet"]))
    assert len(calls) == 1  # measured once, reused by the row and the table


def test_cpu_peak_cache_tells_apart_cpus_with_one_name(monkeypatch, tmp_path):
    """A VM shows "AMD EPYC" for an AVX2 host and for one with avx512_bf16; their peaks shared a cache entry."""
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


# gpu_check's sections run only on a GPU machine; these run the parts that read a subprocess's report on
# CPU, with the subprocess faked, so a name lost or a format drifted shows here and not first on the GPU.
def test_gpu_check_runs_every_section_in_order():
    from benchmarks import gpu_check

    assert tuple(gpu_check.RUNS) == gpu_check.SECTIONS


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA exit")
def test_gpu_check_without_cuda_measures_nothing_and_exits_2(capsys):
    from benchmarks import gpu_check

    assert gpu_check.main(["--sections", "env"]) == 2
    assert "NO CUDA" in capsys.readouterr().out


def _trainer_progress_line(step: int, total: int, loss: float, tps: float, utilisation: float) -> str:
    """A progress line as the trainer prints it off a terminal (trainer.py's postfix, Observer.progress)."""
    import contextlib
    import io
    import types

    from training.observe import Observer

    observer = Observer.__new__(Observer)
    observer.enabled, observer.interactive, observer.bar = True, False, types.SimpleNamespace(total=total)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        observer.progress(step, {"loss": f"{loss:.3f}", "tok/s": f"{tps:,.0f}", "mfu": mfu.format_mfu(utilisation)})
    return out.getvalue()


def test_gpu_check_train_section_reads_the_trainers_log(monkeypatch, tmp_path):
    import zoo.describe
    from benchmarks import gpu_check_common, gpu_check_train

    logged = [(1, 8.51, 351.0, 0.0), (5, 6.0, 140_000.0, 0.095), (10, 4.32, 120_000.0, 0.081)]
    log = "".join(_trainer_progress_line(s, 10, loss, tps, u) for s, loss, tps, u in logged) + "done: 10 steps\n"
    commands = []
    real_popen = subprocess.Popen

    def fake_trainer(cmd, **kwargs):
        if cmd[1:2] != ["training/run.py"]:  # the `import datasets` probe (subprocess.run calls Popen)
            return real_popen(cmd, **kwargs)
        commands.append(cmd)
        return real_popen([sys.executable, "-c", f"import sys; sys.stdout.write({log!r})"], **kwargs)

    monkeypatch.setattr(gpu_check_train.subprocess, "Popen", fake_trainer)
    monkeypatch.setattr(zoo.describe, "describe", lambda spec, seq_len: {"total_params": 509e6, "active_params": 99e6,
                                                                         "flops_per_token": 224e6})
    monkeypatch.setattr(gpu_check_common, "RESULTS", [])
    args = argparse.Namespace(micro_batch=2, train_steps=10, compile=False, train_out=str(tmp_path / "run"),
                              train_timeout=60)
    gpu_check_train.section_train(args)
    assert commands[0][1:5] == ["training/run.py", "--preset", gpu_check_train.TRAIN_PRESET, "--out"]
    assert "train.micro_batch_size=2" in commands[0] and "train.steps=10" in commands[0]
    notes = gpu_check_common.RESULTS
    assert notes[0] == "train model: perf_0p5b: 509M total, 99M active per token, 224 MFLOP/token forward at T=1024"
    assert notes[1].startswith("train: exit 0 after ") and notes[1].endswith(
        "logged steps 1: 351 tok/s 0.0%, 5: 140,000 tok/s 9.5%, 10: 120,000 tok/s 8.1%")
    assert notes[2] == ("train: median over logged steps > 1: 130,000 tokens/s, MFU 8.8% "
                        "(trainer's figures; loss 8.51 -> 4.32)")
    assert notes[3] == "train: done: 10 steps"


def test_gpu_check_trainstep_section_reads_the_benchmarks_json(monkeypatch, tmp_path):
    from benchmarks import gpu_check_common, gpu_check_train

    peaks = {"measured": 783e12, "datasheet": 989e12}
    rows = {side: train_step.report_line(label, [seconds] * 3, 2 * 1024, 224e6, peaks)
            for side, label, seconds in (("zoo", "zoo bf16", 0.085), ("transformers", "transformers bf16", 0.34))}
    rows["zoo"]["peak_step_memory_bytes"] = 25 * 2**30
    out, profile = tmp_path / "run_trainstep.json", tmp_path / "run_trainstep_profile.txt"

    def fake_benchmark(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "benchmarks.train_step", "--preset"] and cmd[cmd.index("--json") + 1] == str(out)
        out.write_text(json.dumps({"results": rows, "speedup": 4.0}))
        profile.write_text("zoo bf16: 2 train steps, 323.3 ms wall under the profiler\nrest\n")
        return subprocess.CompletedProcess(cmd, 0, "table\n", "")

    monkeypatch.setattr(gpu_check_train.subprocess, "run", fake_benchmark)
    monkeypatch.setattr(gpu_check_common, "RESULTS", [])
    args = argparse.Namespace(micro_batch=2, compile=False, train_out=str(tmp_path / "run"), trainstep_timeout=60)
    gpu_check_train.section_trainstep(args)
    zoo_row = rows["zoo"]
    assert gpu_check_common.RESULTS == [
        f"trainstep perf_0p5b batch 2x1024: zoo bf16: 85 ms/step, {zoo_row['tokens_per_s']:,.0f} tokens/s, "
        f"MFU {mfu.format_mfu(zoo_row['mfu'])} (of the measured 783 TFLOP/s), "
        f"{mfu.format_mfu(zoo_row['mfu_datasheet'])} of the datasheet's 989 TFLOP/s, step memory 25.0 GiB",
        f"trainstep perf_0p5b batch 2x1024: transformers bf16: 340 ms/step, "
        f"{rows['transformers']['tokens_per_s']:,.0f} tokens/s, MFU {mfu.format_mfu(rows['transformers']['mfu'])} "
        f"(of the measured 783 TFLOP/s), {mfu.format_mfu(rows['transformers']['mfu_datasheet'])} of the datasheet's "
        "989 TFLOP/s, step memory 0.0 GiB",
        "trainstep: zoo / transformers speed 4.00x",
        f"trainstep profile ({profile}): zoo bf16: 2 train steps, 323.3 ms wall under the profiler",
    ]


def _fake_trainer(monkeypatch, gpu_check_train, code: str) -> None:
    """training/run.py replaced by `python -c code`; other commands (the `import datasets` probe) run."""
    import zoo.describe

    real_popen = subprocess.Popen

    def popen(cmd, **kwargs):
        return real_popen([sys.executable, "-c", code] if cmd[1:2] == ["training/run.py"] else cmd, **kwargs)

    monkeypatch.setattr(gpu_check_train.subprocess, "Popen", popen)
    monkeypatch.setattr(zoo.describe, "describe", lambda spec, seq_len: {"total_params": 509e6, "active_params": 99e6,
                                                                         "flops_per_token": 224e6})


@pytest.mark.parametrize("logged,per_step,median", [
    ([(1, 8.51, 351.0, None), (5, 6.0, 140_000.0, None), (10, 4.32, 120_000.0, None)],  # no peak: `mfu n/a`
     "1: 351 tok/s n/a, 5: 140,000 tok/s n/a, 10: 120,000 tok/s n/a", "n/a"),
    ([(1, 8.51, 351.0, 0.5), (5, 6.0, 140_000.0, 1.067), (10, 4.32, 120_000.0, 1.2)],  # above the peak: `106.7%!`
     "1: 351 tok/s 50.0%, 5: 140,000 tok/s 106.7%!, 10: 120,000 tok/s 120.0%!", "113.3%!"),
], ids=["mfu-n/a", "mfu-above-peak"])
def test_gpu_check_train_section_reads_steps_without_an_mfu_figure(monkeypatch, tmp_path, logged, per_step, median):
    """The step regex wanted `mfu <number>%`: a trainer without a peak prints `mfu n/a`, and those steps
    were reported as "no step logged"."""
    from benchmarks import gpu_check_common, gpu_check_train

    log = "".join(_trainer_progress_line(s, 10, loss, tps, u) for s, loss, tps, u in logged)
    _fake_trainer(monkeypatch, gpu_check_train, f"import sys; sys.stdout.write({log!r})")
    monkeypatch.setattr(gpu_check_common, "RESULTS", [])
    gpu_check_train.section_train(argparse.Namespace(micro_batch=2, train_steps=10, compile=False,
                                                     train_out=str(tmp_path / "run"), train_timeout=60))
    steps, summary = [n for n in gpu_check_common.RESULTS if n.startswith("train: ")][:2]
    assert steps.endswith("logged steps " + per_step), steps
    assert summary == f"train: median over logged steps > 1: 130,000 tokens/s, MFU {median} " \
                      "(trainer's figures; loss 8.51 -> 4.32)"


def test_gpu_check_train_timeout_holds_on_a_partial_line(monkeypatch, tmp_path):
    """The timeout was checked between lines: a trainer that printed half a line and hung kept readline()
    waiting past --train-timeout, until it exited on its own."""
    import time

    from benchmarks import gpu_check_common, gpu_check_train

    hang = 20  # seconds the fake trainer sleeps after its partial line; the timeout is 2
    _fake_trainer(monkeypatch, gpu_check_train,
                  f"import sys, time; sys.stdout.write('step 1/10 loss'); sys.stdout.flush(); time.sleep({hang})")
    monkeypatch.setattr(gpu_check_common, "RESULTS", [])
    start = time.perf_counter()
    gpu_check_train.section_train(argparse.Namespace(micro_batch=2, train_steps=10, compile=False,
                                                     train_out=str(tmp_path / "run"), train_timeout=2))
    assert time.perf_counter() - start < hang / 2
    status = [n for n in gpu_check_common.RESULTS if n.startswith("train: ")][0]
    assert status.startswith("train: TIMED OUT after ") and status.endswith("last lines: step 1/10 loss"), status


def test_gpu_check_train_ends_when_the_trainer_exits_though_a_child_holds_its_pipe(monkeypatch, tmp_path):
    """Reading until end of file waited out --train-timeout when a process the trainer started still
    held its stdout, and reported a finished run as TIMED OUT."""
    import time

    from benchmarks import gpu_check_common, gpu_check_train

    held = 30  # seconds the child keeps the pipe open; the timeout is 8
    _fake_trainer(monkeypatch, gpu_check_train,
                  f"import subprocess; subprocess.Popen(['sleep', '{held}']); "
                  "print('step 1/10 loss 6.000 tok/s 1,000 mfu 1.0%', flush=True)")
    monkeypatch.setattr(gpu_check_common, "RESULTS", [])
    start = time.perf_counter()
    gpu_check_train.section_train(argparse.Namespace(micro_batch=2, train_steps=10, compile=False,
                                                     train_out=str(tmp_path / "run"), train_timeout=8))
    assert time.perf_counter() - start < 8
    status = [n for n in gpu_check_common.RESULTS if n.startswith("train: ")][0]
    assert status.startswith("train: exit 0 after "), status


def test_gpu_check_pytest_note_is_a_string_when_pytest_prints_nothing(monkeypatch):
    """With pytest's stdout empty the note printed stderr's last line as a list: `exit 1: ['...']`."""
    from benchmarks import gpu_check, gpu_check_common

    outputs = iter([("", "Traceback (most recent call last):\nImportError: no module named pytest\n"), ("", "")])

    def fake_pytest(cmd, **kwargs):
        out, err = next(outputs)
        return subprocess.CompletedProcess(cmd, 1, out, err)

    monkeypatch.setattr(gpu_check_common.subprocess, "run", fake_pytest)
    monkeypatch.setattr(gpu_check_common, "RESULTS", [])
    args = argparse.Namespace(pytest_timeout=60)
    gpu_check.section_pytest(args)
    gpu_check.section_pytest(args)
    assert [n.split(": exit ")[1] for n in gpu_check_common.RESULTS] == [
        "1: ImportError: no module named pytest", "1: no output"]


def test_gpu_check_flash_seeds_the_first_cases_weights(monkeypatch):
    """torch.manual_seed(0) ran after the block was built: the first case's weights (and so its error
    figures) depended on whatever had drawn from the generator before, and varied run to run."""
    from benchmarks import gpu_check_attention, gpu_check_common

    first = gpu_check_attention.attention_cases()[0]
    monkeypatch.setattr(gpu_check_attention, "attention_cases", lambda: [first])
    built, build = [], gpu_check_attention.build_attention

    def build_and_stop(spec):  # the weights are all this test needs: the case stops there
        built.append([p.detach().clone() for p in build(spec).parameters()])
        raise RuntimeError("stop")

    monkeypatch.setattr(gpu_check_attention, "build_attention", build_and_stop)
    monkeypatch.setattr(gpu_check_common, "DEV", "cpu")
    monkeypatch.setattr(gpu_check_common, "RESULTS", [])
    for seed in (1, 2):  # two different histories of the generator before the section
        torch.manual_seed(seed)
        gpu_check_attention.section_flash(argparse.Namespace())
    assert len(built) == 2
    for a, b in zip(*built):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gpu_check_grouped_times_the_implementation_it_names(monkeypatch):
    """The "grouped" path called dropless_dispatch with impl="auto", which falls back to the loop where
    the widths miss grouped_mm's alignment (and picks padded_bmm on CPU), and forced the loop by patching
    the private `_grouped_mm_available`. Each path now names its impl; fp32's reference is the loop."""
    import zoo.blocks.moe as moe_mod
    from benchmarks import gpu_check_common, gpu_check_grouped

    impls = []
    real = moe_mod.dropless_dispatch

    def spy(*args, **kwargs):
        impls.append((kwargs.get("impl", "auto"), args[0].dtype))
        return real(*args, **kwargs)

    monkeypatch.setattr(moe_mod, "dropless_dispatch", spy)
    monkeypatch.setattr(moe_mod, "_grouped_mm_available", lambda x: pytest.fail("_grouped_mm_available consulted"))
    monkeypatch.setattr(gpu_check_grouped, "cuda_time_ms", lambda fn, warmup, reps: (fn(), 1.0)[1])
    monkeypatch.setattr(gpu_check_common, "DEV", "cpu")
    monkeypatch.setattr(gpu_check_common, "RESULTS", [])
    gpu_check_grouped.section_grouped(argparse.Namespace())
    assert not any("FAILED" in n for n in gpu_check_common.RESULTS), gpu_check_common.RESULTS
    assert {impl for impl, dtype in impls if dtype == torch.float32} == {"loop"}
    assert {impl for impl, dtype in impls if dtype == torch.bfloat16} == {"grouped_mm", "loop"}
    assert all("EQUAL" in n for n in gpu_check_common.RESULTS if "tol" in n)
