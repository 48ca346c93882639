"""gpu_check's sections run only on a GPU machine; these run the parts that read a subprocess's report on
CPU, with the subprocess faked, so a name lost or a format drifted shows here and not first on the GPU."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

from benchmarks import train_step_report
from training import mfu

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
    rows = {side: train_step_report.report_line(label, [seconds] * 3, 2 * 1024, 224e6, peaks)
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
    """A trainer without a peak prints `mfu n/a`, one above it `106.7%!`: both are logged steps all the same."""
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
    """The timeout holds within a line: a trainer that prints half a line and hangs must not keep a
    readline() waiting past --train-timeout."""
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
    """The section ends when the trainer exits, not at end of file: a process the trainer started may still
    hold its stdout, and waiting for it would report a finished run as TIMED OUT."""
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
    """With pytest's stdout empty the note holds stderr's last line as text, not as a list `['...']`."""
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
    """The section seeds before it builds a block: the first case's weights (and so its error figures) must
    not depend on whatever drew from the generator before."""
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
    """Each path names its impl: impl="auto" would fall back to the loop where the widths miss grouped_mm's
    alignment (and pick padded_bmm on CPU), and the loop needs no patch of the private
    `_grouped_mm_available`. fp32's reference is the loop."""
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
