"""gpu_check's training sections: trainstep (benchmarks/train_step.py, the zoo against transformers at
~0.5B parameters) and train (the real DeepSpeed trainer, training/run.py), each in a subprocess with
a timeout, their figures read back from its JSON or its log."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_check_common import REPO, note, repo_pythonpath, run_command, say

# ~0.5B total parameters (~0.1B active) on the built-in corpus: the perf_0p5b preset (MLA attention,
# 64 experts top-6, T 1024).
TRAIN_PRESET = "perf_0p5b"


def train_sets(args) -> dict:
    sets = {}
    sets.update({
        "train.micro_batch_size": args.micro_batch,
        "train.steps": args.train_steps,
        "train.warmup_steps": 5,
        "train.log_every": 5,
        "train.eval_every": 10**6,
        "train.ckpt_every": 10**6,
        "train.keep_last": 1,
        "train.precision": "bf16",
        "deepspeed.zero_stage": 1,
        "eval.val_blocks": 2 * args.micro_batch,
    })
    if args.compile:
        sets["train.compile"] = True
    return sets


class GpuPoller:
    """Samples nvidia-smi's memory.used (MiB) and utilization.gpu (%) every 2 s in a thread."""

    def __init__(self):
        import threading

        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        import shutil

        if shutil.which("nvidia-smi"):
            self._thread.start()

    def stop(self):
        self._stop.set()

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                mem, util = (float(v) for v in out.strip().split(","))
                self.samples.append((mem, util))
            except Exception:
                pass
            self._stop.wait(2.0)


def _datasets_stub_dir() -> str | None:
    """zoo/corpus.py imports `datasets` at the top but needs it only for hub/json/parquet sources;
    when it cannot be imported here, give the trainer a stub so the built-in corpus still works."""
    probe = subprocess.run([sys.executable, "-c", "import datasets"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": repo_pythonpath()})
    if probe.returncode == 0:
        return None
    reason = (probe.stderr.strip().splitlines() or ["?"])[-1]
    stub = Path("/tmp/gpu_check_datasets_stub/datasets")
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(
        "def load_dataset(*a, **k):\n    raise RuntimeError('datasets is a stub (gpu_check): builtin corpus only')\n")
    note(f"train: `import datasets` fails here ({reason[:150]}); the trainer runs with a stub (built-in corpus only)")
    return str(stub.parent)


# A progress line as training/observe.py prints it off a terminal with trainer.py's postfix:
# "step 5/40 loss 6.000 tok/s 140,000 mfu 9.5%"; mfu is training/mfu.py's format_mfu: "n/a" without a
# peak, "106.7%!" above it.
STEP_LINE = re.compile(r"step (\d+)/(\d+) loss ([\d.]+) tok/s ([\d,]+) mfu (n/a|([\d.]+)%!?)")


POLL_S = 0.5  # how often read_lines looks whether the trainer has exited
EXIT_GRACE_S = 2.0  # how long its output may trail its exit (a child still holding the pipe)


def read_lines(proc, deadline: float) -> tuple[list[str], bool]:
    """proc's stdout lines, echoed as they come, until it closes or the perf_counter `deadline`;
    then (lines, timed out). A thread reads, so a partial line (readline() waits for its end)
    cannot hold the deadline: at the deadline proc's process group is killed, which ends the pipe."""
    import queue
    import signal
    import threading

    assert proc.stdout is not None
    got: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            got.put(line)
        got.put(None)  # end of output

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    lines, timed_out, exited_at = [], False, None
    try:
        while True:
            now = time.perf_counter()
            try:
                line = got.get(timeout=max(0.0, min(POLL_S, deadline - now)))
            except queue.Empty:
                if time.perf_counter() >= deadline:
                    timed_out = True
                    break
                if proc.poll() is not None:
                    # It exited, but a process it started may still hold the pipe open: stop after a
                    # grace period for the last lines rather than wait for the deadline.
                    exited_at = exited_at or time.perf_counter()
                    if time.perf_counter() - exited_at > EXIT_GRACE_S:
                        break
                continue
            if line is None:
                break
            lines.append(line.rstrip())
            if line.strip():
                say("    | " + line.rstrip()[:400])
    finally:
        if timed_out or proc.poll() is None or exited_at is not None:  # the last: what it left running
            try:
                os.killpg(proc.pid, signal.SIGKILL if timed_out else signal.SIGTERM)
            except ProcessLookupError:
                pass
    if timed_out:  # what the reader still held (a partial line) comes once the kill closes the pipe
        reader.join(timeout=10)
        while not got.empty():
            line = got.get()
            if line is not None:
                lines.append(line.rstrip())
    return lines, timed_out


def section_train(args) -> None:
    import json

    from training.mfu import format_mfu

    sets = train_sets(args)
    try:
        from zoo.describe import describe
        from zoo.presets import resolve

        spec = resolve(TRAIN_PRESET, [], False)
        d = describe(spec, seq_len=1024)
        note(f"train model: {TRAIN_PRESET}: {d['total_params'] / 1e6:.0f}M total, "
             f"{d['active_params'] / 1e6:.0f}M active per token, {d['flops_per_token'] / 1e6:.0f} MFLOP/token forward at T=1024")
    except Exception as err:
        note(f"train model: describe failed: {type(err).__name__}: {str(err)[:200]}")
    out = Path(args.train_out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "training/run.py", "--preset", TRAIN_PRESET, "--out", str(out)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    say("  $ " + " ".join(["python", *cmd[1:]]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ZOO_CACHE": os.environ.get("ZOO_CACHE", "/tmp/gpu_check_zoo_cache")}
    stub = _datasets_stub_dir()
    env["PYTHONPATH"] = os.pathsep.join(([stub] if stub else []) + [repo_pythonpath()])
    poller = GpuPoller()
    poller.start()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        lines, timed_out = read_lines(proc, start + args.train_timeout)
    finally:
        code = proc.wait()
        poller.stop()
    wall = time.perf_counter() - start
    steps = []
    for line in lines:
        m = STEP_LINE.search(line)
        if m:
            utilisation = None if m[5] == "n/a" else float(m[6]) / 100
            steps.append((int(m[1]), float(m[3]), float(m[4].replace(",", "")), utilisation))
    status = "TIMED OUT" if timed_out else f"exit {code}"
    if steps:
        steady = [s for s in steps if s[0] > 1] or steps
        tps = statistics.median(s[2] for s in steady)
        measured = [s[3] for s in steady if s[3] is not None]  # none where the trainer had no peak
        mfu = statistics.median(measured) if measured else None
        note(f"train{' (compile)' if args.compile else ''}: {status} after {wall:.0f} s; logged steps "
             + ", ".join(f"{s[0]}: {s[2]:,.0f} tok/s {format_mfu(s[3])}" for s in steps))
        note(f"train{' (compile)' if args.compile else ''}: median over logged steps > 1: {tps:,.0f} tokens/s, "
             f"MFU {format_mfu(mfu)} "
             f"(trainer's figures; loss {steps[0][1]:.2f} -> {steps[-1][1]:.2f})")
    else:
        errs = [line for line in lines if "error" in line.lower() or "Error" in line][-3:]
        note(f"train: {status} after {wall:.0f} s, no step logged; last lines: " + " / ".join((errs or lines[-3:]))[:400])
    for line in lines:
        if line.startswith("done:") or "start-up" in line or "val loss" in line:
            note("train: " + line[:300])
    if poller.samples:
        mem = max(m for m, _ in poller.samples)
        busy = [u for _, u in poller.samples if u > 0]
        note(f"train: nvidia-smi every 2 s during the run: peak memory used {mem / 1024:.1f} GiB, "
             f"mean utilisation {statistics.mean(busy) if busy else 0:.0f}% over {len(busy)} busy samples")


def section_trainstep(args) -> None:
    import json

    from training.mfu import MFU_ABOVE_PEAK_NOTE, format_mfu

    out, profile = Path(args.train_out + "_trainstep.json"), Path(args.train_out + "_trainstep_profile.txt")
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--preset", TRAIN_PRESET, "--precisions", "bf16",
           "--hf-experts", "grouped_mm", "--hf-attention", "sdpa", "--reps", "10", "--json", str(out),
           "--profile", str(profile)]
    cmd += ["--set", f"train.micro_batch_size={args.micro_batch}"] + (["--compile"] if args.compile else [])
    proc = run_command("trainstep", cmd, args.trainstep_timeout)
    if proc is None:
        return
    for line in (proc.stdout + proc.stderr).splitlines()[-25:]:
        say("    | " + line[:300])
    if proc.returncode or not out.exists():
        note(f"trainstep: exit {proc.returncode}; see the lines above")
        return
    result = json.loads(out.read_text())
    for row in result["results"].values():
        memory = row.get("peak_step_memory_bytes") or 0
        measured = f" (of the measured {row['peak_flops'] / 1e12:.0f} TFLOP/s)" if row.get("peak_flops") else ""
        datasheet = (f", {format_mfu(row['mfu_datasheet'])} of the datasheet's {row['datasheet_peak_flops'] / 1e12:.0f}"
                     " TFLOP/s" if row.get("mfu_datasheet") is not None else "")
        note(f"trainstep {TRAIN_PRESET} batch {args.micro_batch}x1024: {row['label']}: {row['step_ms']:.0f} ms/step, "
             f"{row['tokens_per_s']:,.0f} tokens/s, MFU {format_mfu(row['mfu'])}{measured}{datasheet}, "
             f"step memory {memory / 2**30:.1f} GiB")
        if row.get("mfu_above_peak"):
            note("trainstep: " + MFU_ABOVE_PEAK_NOTE)
    if "speedup" in result:
        note(f"trainstep: zoo / transformers speed {result['speedup']:.2f}x")
    if profile.exists():
        note(f"trainstep profile ({profile}): " + profile.read_text().splitlines()[0])
