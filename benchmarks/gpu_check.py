"""One-GPU health and speed check of Blueberry Zoo: `bash benchmarks/gpu_check.sh`, or
`python -m benchmarks.gpu_check` from the repository root.

Sections (each fails on its own, with one line, and the rest still run):
  env       device, driver-visible memory, torch and CUDA versions
  matmul    bf16 dense matmul TFLOP/s, 8192^3, mean of timed reps after warm-up (host clock between
            device synchronizations)
  flash     SDPA's FLASH_ATTENTION backend on our MHA/GQA/MLA blocks (bf16, forward + backward):
            which shapes it accepts, which backend runs by default, agreement with the math backend
            and an fp32 reference, timings; for MLA with qk dim != v dim also the padded-v variant
  grouped   `dropless_dispatch`'s torch._grouped_mm path (CUDA bf16) against the per-expert loop
            (bf16) and an fp32 loop reference, forward and backward, and both timed
  pytest    tests/test_devices.py (the CUDA paths against fp32 references), tests/test_moe.py and
            tests/test_attention.py under this machine's torch
  trainstep benchmarks/train_step.py on perf_0p5b (~0.5B total parameters) in bf16: the zoo against
            transformers' DeepseekV3ForCausalLM (grouped_mm experts, SDPA), tokens/s, MFU, memory
  train     the real trainer (training/run.py, DeepSpeed, ZeRO-1, bf16) at ~0.5B total parameters:
            tokens/s and MFU as the trainer prints them
  overhead  benchmarks/trainer_overhead.py on perf_0p5b: the trainer's step against the bare step,
            with the trainer's per-phase split (CUDA event times) and Newton-Schulz's FLOP/s

Exit status: 0 when CUDA is there (whatever the sections found; read the report), 2 without CUDA.
Options: --sections a,b,c   --train-steps N   --train-timeout S   --trainstep-timeout S   --overhead-timeout S
         --micro-batch N   --compile
"""
# The short sections (env, matmul, pytest) live here with main; the long ones in their own files:
# gpu_check_attention.py (flash), gpu_check_grouped.py (grouped), gpu_check_train.py (trainstep,
# train); what they share (the report, DEV, timing) in gpu_check_common.py.

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from benchmarks import gpu_check_common as common
from benchmarks.gpu_check_attention import section_flash
from benchmarks.gpu_check_common import header, note, run_command, say
from benchmarks.gpu_check_grouped import section_grouped
from benchmarks.gpu_check_train import section_train, section_trainstep

SECTIONS = ("env", "matmul", "flash", "grouped", "pytest", "trainstep", "train", "overhead")  # a full run's order


# --------------------------------------------------------------------------------------------- env
def section_env(args) -> None:
    import torch

    props = torch.cuda.get_device_properties(0)
    note(f"device: {torch.cuda.get_device_name(0)}, {props.multi_processor_count} SMs, "
         f"{props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}")
    note(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
         f"python {sys.version.split()[0]}")
    versions = []
    for name in ("deepspeed", "pydantic", "fiddle", "datasets", "pyarrow", "sentencepiece", "transformers"):
        try:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
        except Exception:
            versions.append(f"{name} MISSING")
    note("packages: " + ", ".join(versions))


# ------------------------------------------------------------------------------------------ matmul
def section_matmul(args) -> None:
    import torch

    from benchmarks.common import measured_cuda_peak
    from training.mfu import peak_flops

    n = 8192
    flops = measured_cuda_peak(torch.bfloat16, torch.device("cuda"), size=n, reps=10)
    note(f"matmul bf16 {n}^3: {flops / 1e12:.0f} TFLOP/s ({2 * n**3 / flops * 1e3:.2f} ms mean of 10 after 3 warm-ups, "
         "random data)")

    note(f"trainer's MFU peak for this GPU: {peak_flops(torch.bfloat16, torch.device('cuda')) / 1e12:.0f} TFLOP/s (training/mfu.py)")


# ------------------------------------------------------------------------------------------ pytest
def section_pytest(args) -> None:
    files = ["tests/test_devices.py", "tests/test_moe.py", "tests/test_attention.py"]  # test_devices: the CUDA paths
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    proc = run_command("pytest", cmd, args.pytest_timeout)
    if proc is None:
        return
    tail = [line for line in proc.stdout.splitlines() if line.strip()]
    for line in tail[-15:]:
        say("      " + line)
    summary = (tail or proc.stderr.strip().splitlines() or ["no output"])[-1]
    note(f"pytest {' '.join(files)}: exit {proc.returncode}: {summary}")


# ---------------------------------------------------------------------------------------- overhead
def section_overhead(args) -> None:
    cmd = [sys.executable, "-m", "benchmarks.trainer_overhead", "--preset", "perf_0p5b", "--reps", "4",
           "--set", f"train.micro_batch_size={args.micro_batch}", "--set", "data.seq_len=1024",
           "--set", "eval.val_blocks=2", "--out", "/tmp/gpu_check_overhead"]
    proc = run_command("overhead", cmd, args.overhead_timeout)
    if proc is None:
        return
    for line in proc.stdout.splitlines():
        say("      " + line)
    if proc.returncode != 0:
        note(f"overhead: exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:200]}")


RUNS = {"env": section_env, "matmul": section_matmul, "flash": section_flash, "grouped": section_grouped,
        "pytest": section_pytest, "trainstep": section_trainstep, "train": section_train,
        "overhead": section_overhead}  # one per SECTIONS


# -------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--train-timeout", type=int, default=100, help="seconds before the trainer is killed")
    p.add_argument("--pytest-timeout", type=int, default=60)
    p.add_argument("--trainstep-timeout", type=int, default=300)
    p.add_argument("--overhead-timeout", type=int, default=120)
    p.add_argument("--micro-batch", type=int, default=None, help="default: 32 on GPUs with >= 100 GiB, else 16 (seq 1024)")
    p.add_argument("--train-out", default="/tmp/gpu_check_run")
    p.add_argument("--compile", action="store_true", help="train with --set train.compile=true")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # dry run of flash/grouped on CPU
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")

    try:
        import torch
    except Exception as err:
        say(f"gpu_check: cannot import torch ({err}); nothing was measured")
        return 2
    if args.cpu_smoke:
        common.DEV = "cpu"
        say("gpu_check: --cpu-smoke: a dry run of the code paths on CPU; no figure below means anything")
        wanted = [s for s in wanted if s in ("flash", "grouped")]
        args.micro_batch = 1
    elif not torch.cuda.is_available():
        say(f"gpu_check: NO CUDA: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA GPU "
            f"on {os.uname().nodename}; this check needs an NVIDIA GPU, nothing was measured")
        return 2
    if args.micro_batch is None and common.DEV == "cuda":
        args.micro_batch = 32 if torch.cuda.get_device_properties(0).total_memory >= 100 * 2**30 else 16
    torch.backends.cuda.matmul.allow_tf32 = False

    t0 = time.perf_counter()
    say(f"Blueberry Zoo GPU check, {time.strftime('%Y-%m-%d %H:%M:%S')}; sections: {', '.join(wanted)}")
    for name in wanted:
        header(name)
        s0 = time.perf_counter()
        try:
            RUNS[name](args)
        except Exception as err:
            note(f"{name}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
            traceback.print_exc(limit=4)
        say(f"  ({name}: {time.perf_counter() - s0:.1f} s)")
    header("summary")
    for line in common.RESULTS:
        say("  " + line)
    say(f"  total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
