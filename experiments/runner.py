"""Train every variant x seed of an experiment through the normal trainer, sequentially and resumably.

Each run is `python training/run.py --preset P --set ... --out RUNS/expN/VARIANT/seedS`, a subprocess
like any user's run. A run whose folder holds its spec and the final checkpoint is skipped; one that
was interrupted is resumed (`--resume`), so the command can be stopped and started again at will:
Ctrl-C or SIGTERM is passed on to the trainers, which save a checkpoint at the end of their step, and
the runner waits for them (a second Ctrl-C kills them at once). A folder holding a different spec is
an error, never silently reused or overwritten.

HellaSwag, when the budget asks for it, is scored on the final model only: the run stops after its
second-to-last step (`--stop-after`) and is resumed with HellaSwag switched on, so the last step's
evaluation scores it. Resuming continues exactly, so the run is the same as one uninterrupted run;
the trainer would otherwise score HellaSwag at every validation step.

`train.precision=auto` (the budgets' default) is resolved by the trainer, per device, before it saves
spec.json: bf16 where the device computes it natively, else fp32 (training/precision.py). A run folder
whose spec asked auto is the run if it trained in either, whichever machine trained it: a finished run
trained in bf16 on a GPU is reported as it is on a CPU-only machine, and an unfinished one resumes in the
precision it began in (slow on a CPU without bf16 instructions; the trainer warns). An explicit precision
must match. The table says which precision the runs trained in, so a mixed experiment shows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from experiments.base import Experiment
from training import checkpoints
from training.precision import AUTO_CHOICES
from zoo.checkpoint import latest_tag, read_spec
from zoo.overrides import SpecError, diff, with_changes
from zoo.specs import RunSpec

ROOT = Path(__file__).resolve().parents[1]
# How often a run saves: never its result, so a folder saved at another cadence (runs begun before Budget
# checkpointed periodically) is still this run.
SAVING_CADENCE = ("train.ckpt_every", "train.keep_last")
RUN_RECORD = "experiment_run.json"  # what the runner adds to a run folder: commands and wall time
LOG = "train.log"


class RunFailed(RuntimeError):
    pass


class Interrupted(KeyboardInterrupt):
    """The runner was asked to stop (Ctrl-C, SIGTERM); its trainers saved checkpoints."""


# Trainers are started in their own session, so a terminal's Ctrl-C reaches the runner only and the
# runner passes one stop signal on; these are the ones running, for that.
_TRAINERS: set[subprocess.Popen] = set()
_TRAINERS_LOCK = threading.Lock()
_STOPPING = threading.Event()  # no new trainer starts once set


def stop_trainers(signum: int) -> None:
    """Send `signum` to every running trainer: SIGINT/SIGTERM save and stop after the step, SIGKILL at once."""
    _STOPPING.set()
    with _TRAINERS_LOCK:
        for proc in _TRAINERS:
            if proc.poll() is None:
                proc.send_signal(signum)


@dataclass(frozen=True)
class Run:
    experiment: str
    variant: str
    seed: int
    spec: RunSpec
    out: Path  # where this run trains
    source: Path  # where its results are read from: `out`, or an identical finished run elsewhere


def plan(experiment: Experiment, runs_root: Path, *, smoke: bool = False) -> list[tuple[str, int, Path]]:
    return [(name, seed, runs_root / experiment.name / name / f"seed{seed}")
            for name in experiment.variants for seed in experiment.seeds_for(smoke)]


def run_experiment(experiment: Experiment, runs_root: Path, *, smoke: bool = False, train: bool = True,
                   jobs: int = 1, log=print) -> list[Run]:
    """Every variant x seed, trained (or found finished); returns where each one's results are, in plan
    order. `jobs` > 1 trains that many runs at once (for smoke runs, whose cost is start-up, not compute:
    timings of concurrent runs share the CPU and mean little)."""
    done: dict[Path, Run] = {}
    pending: list[tuple[str, str, int, Path, RunSpec]] = []
    todo = plan(experiment, runs_root, smoke=smoke)
    for index, (name, seed, out) in enumerate(todo, 1):
        spec = experiment.spec(name, seed, smoke=smoke)
        tag = f"[{experiment.name} {index}/{len(todo)}] {name} seed {seed}"
        if is_finished(out, spec):
            log(f"{tag}: finished earlier ({out})")
            done[out] = Run(experiment.name, name, seed, spec, out, out)
            continue
        donor = find_identical(runs_root, spec) if spec.eval.hellaswag_limit == 0 else None
        if donor is not None:
            log(f"{tag}: the same spec already ran in {donor}; reusing it")
            done[out] = Run(experiment.name, name, seed, spec, out, donor)
            continue
        if not train:
            raise RunFailed(f"{tag}: no finished run in {out}; run without --report to train it")
        pending.append((tag, name, seed, out, spec))

    def work(item: tuple[str, str, int, Path, RunSpec]) -> Run:
        tag, name, seed, out, spec = item
        start = time.perf_counter()
        train_one(experiment, name, seed, out, smoke=smoke, concurrent=smoke or jobs > 1)
        log(f"{tag}: trained in {time.perf_counter() - start:.0f} s -> {out}")
        return Run(experiment.name, name, seed, spec, out, out)

    _STOPPING.clear()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        try:
            for run in pool.map(work, pending):
                done[run.out] = run
        except KeyboardInterrupt:
            log("experiments: stopping; each running trainer saves a checkpoint after its current step "
                "(Ctrl-C again to kill them without one); the same command resumes")
            stop_trainers(signal.SIGINT)
            try:
                pool.shutdown(wait=True, cancel_futures=True)
            except KeyboardInterrupt:
                stop_trainers(signal.SIGKILL)
            raise Interrupted() from None
    return [done[out] for _, _, out in todo]


def is_finished(out: Path, spec: RunSpec) -> bool:
    saved = _saved_spec(out)
    if saved is None or latest_tag(out) != checkpoints.tag_for(spec.train.steps):
        return False
    _check_same(out, saved, spec, allow_eval=False)
    return True


def find_identical(runs_root: Path, spec: RunSpec) -> Path | None:
    """A finished run anywhere under `runs_root` that trained exactly this spec (HellaSwag aside)."""
    for saved in sorted(runs_root.glob("*/*/*/spec.json")):
        try:
            other = _saved_spec(saved.parent)
        except RunFailed:  # a folder this zoo cannot read (another experiment's, from an older zoo): not this run
            continue
        if (other is not None and _without_hellaswag(other) == _as_trained(spec, other)
                and is_finished(saved.parent, other)):
            return saved.parent
    return None


def train_one(experiment: Experiment, name: str, seed: int, out: Path, *, smoke: bool,
              concurrent: bool = False) -> None:
    """Train one run to its last step (resuming it if it was interrupted); `concurrent`: it may share
    the cores with other runs."""
    env = _environment(concurrent)
    spec = experiment.spec(name, seed, smoke=smoke)
    steps, hellaswag = spec.train.steps, spec.eval.hellaswag_limit > 0
    # With HellaSwag the run stops after its second-to-last step; the last one runs with it switched on.
    penultimate = steps - 1 if hellaswag and steps > 1 else None
    # Each pass runs one phase from wherever the folder stands (fresh, mid-run, at the penultimate
    # step) and looks again: a start, a resume to the penultimate step and the final step at most.
    for _ in range(3):
        saved, last = _saved_spec(out), _latest_step(out)
        if saved is not None and last is not None:
            _check_same(out, saved, spec, allow_eval=True)
            if last >= steps:
                break
        before = last or 0
        final = penultimate is None or before >= penultimate
        stop = [] if final else ["--stop-after", str(penultimate)]
        if saved is None or last is None:
            preset, sets = experiment.command_args(name, seed, smoke=smoke, hellaswag=final)
            _trainer(out, ["--preset", preset, *_sets(sets), "--out", str(out), *stop], env)
        else:
            # Resuming may only change eval and budget fields; before the last step, HellaSwag stays off.
            evals = [f"eval.hellaswag_limit={spec.eval.hellaswag_limit}",
                     f"eval.hellaswag_path={json.dumps(spec.eval.hellaswag_path)}"] if final and hellaswag else []
            cadence = [f"train.ckpt_every={spec.train.ckpt_every}"]  # runs begun before Budget saved periodically
            _trainer(out, ["--out", str(out), "--resume", *_sets(evals + cadence), *stop], env)
        if (_latest_step(out) or 0) <= before:
            break  # no progress: reported below
    if not is_finished(out, spec):
        raise RunFailed(f"{out}: the trainer exited 0 but the run is not finished; see {out / LOG}")


def _latest_step(out: Path) -> int | None:
    tag = latest_tag(out)
    return int(tag.removeprefix("step_")) if tag else None


def _environment(concurrent: bool) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    if concurrent:
        # With more threads than free cores (runs side by side, or a co-tenant), spinning OpenMP threads
        # stall each other: a tiny linear layer took 40 ms instead of 0.2 ms, a 3-step smoke run 79 s
        # instead of 5. Sleeping waits avoid that. Real runs keep the default, for full speed on a
        # quiet machine.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _trainer(out: Path, args: list[str], env: dict[str, str]) -> None:
    command = [sys.executable, "training/run.py", *args]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / LOG, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        with _TRAINERS_LOCK:
            if _STOPPING.is_set():
                raise Interrupted()
            # Its own session: a terminal's Ctrl-C reaches only the runner, which passes it on once.
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            _TRAINERS.add(proc)
        try:
            # No timeout: a stopped trainer needs its current step and a checkpoint save.
            _wait(proc)
        finally:
            with _TRAINERS_LOCK:
                _TRAINERS.discard(proc)
            record_path = out / RUN_RECORD
            record = json.loads(record_path.read_text()) if record_path.is_file() else {"commands": [], "wall_s": 0.0}
            record["commands"].append(command[1:])
            record["wall_s"] += time.perf_counter() - start
            record_path.write_text(json.dumps(record, indent=2) + "\n")
    if _STOPPING.is_set():
        raise Interrupted()
    if proc.returncode != 0:
        tail = "\n".join((out / LOG).read_text().splitlines()[-15:])
        raise RunFailed(f"{out}: the trainer exited {proc.returncode}:\n{tail}")


def _wait(proc: subprocess.Popen) -> None:
    """Wait for a trainer. An interrupt while waiting in the main thread (train_one called directly; the
    runner's pool threads never see one) stops it and waits for its checkpoint; a second one kills it."""
    try:
        proc.wait()
    except KeyboardInterrupt:
        stop_trainers(signal.SIGINT)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        raise Interrupted() from None


def _sets(sets: list[str]) -> list[str]:
    return [arg for item in sets for arg in ("--set", item)]


def _saved_spec(out: Path) -> RunSpec | None:
    path = out / "spec.json"
    if not path.is_file():
        return None
    try:
        return read_spec(path)
    except SpecError as err:
        raise RunFailed(f"{err}: delete that folder, or pass another --runs") from None


def _without_hellaswag(spec: RunSpec) -> RunSpec:
    return with_changes(spec, {"eval.hellaswag_limit": 0, "eval.hellaswag_path": None})


def _as_trained(spec: RunSpec, saved: RunSpec) -> RunSpec:
    """`spec` as the trainer that wrote `saved` resolved it: `train.precision=auto` becomes the precision
    the run trained in, when auto can resolve to it (bf16 or fp32, by the device that trained it)."""
    if spec.train.precision == "auto" and saved.train.precision in AUTO_CHOICES:
        return with_changes(spec, {"train.precision": saved.train.precision})
    return spec


def _check_same(out: Path, saved: RunSpec, spec: RunSpec, *, allow_eval: bool) -> None:
    """A run folder must hold this very run (its first phase, while `allow_eval`): else stop and say so."""
    changed = [path for path, _, _ in diff(saved, _as_trained(spec, saved))
               if not (allow_eval and path.startswith("eval.hellaswag")) and path not in SAVING_CADENCE]
    if changed:
        why = ""
        if "train.precision" in changed:
            allowed = (f"auto, which trains in {' or '.join(AUTO_CHOICES)} by device" if spec.train.precision == "auto"
                       else spec.train.precision)
            why = f"; it trained in {saved.train.precision}, this run asks {allowed}"
        raise RunFailed(f"{out} holds a run with a different spec ({', '.join(changed[:5])}"
                        f"{', ...' if len(changed) > 5 else ''}{why}): delete that folder, or pass another --runs")
