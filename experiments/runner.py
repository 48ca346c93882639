"""Train every variant x seed of an experiment through the normal trainer, sequentially and resumably.

Each run is `python training/run.py --preset P --set ... --out RUNS/expN/VARIANT/seedS`, a subprocess
like any user's run. Runs go seed by seed (every variant of seed 0, then of seed 1, ...), so that the
paired comparisons of a partly done experiment already have whole seeds.

A finished run is summarised (experiments/summary.py) into `RESULTS/expN/runs/VARIANT/seedS.json`, the
file that is committed. A run is not trained again when its summary, or a finished run folder, has its
key: the spec, the data file's content hash, the split version and the zoo's results version. Anything
else is retrained, and the runner says why (a run folder of another key is set aside as
`seedS.stale`; `--report` trains nothing and moves nothing, and leaves such runs out). A finished summary of the same spec and key in another experiment is reused.

A run that was interrupted is resumed (`--resume`), so the command can be stopped and started again at will:
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

import shutil

from experiments import summary
from experiments.base import Experiment
from training import checkpoints
from training.precision import AUTO_CHOICES
from zoo.checkpoint import latest_tag, read_spec
from zoo.files import write_atomic
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
    summary: Path  # its summary, where the report reads it


def plan(experiment: Experiment, runs_root: Path, *, smoke: bool = False) -> list[tuple[str, int, Path]]:
    """(variant, seed, run folder) in training order: seed by seed."""
    return [(name, seed, runs_root / experiment.name / name / f"seed{seed}")
            for seed in experiment.seeds_for(smoke) for name in experiment.variants]


def run_experiment(experiment: Experiment, runs_root: Path, results_root: Path, *, smoke: bool = False,
                   train: bool = True, jobs: int = 1, log=print) -> list[Run]:
    """Every variant x seed, trained (or found summarised) and summarised under `results_root`; returns the
    runs in plan order. `train=False` (--report) trains nothing and returns the runs that are summarised.
    `jobs` > 1 trains that many runs at once, each on its share of the cores."""
    done: dict[Path, Run] = {}
    pending: list[tuple[str, str, int, Path, RunSpec, dict]] = []
    todo = plan(experiment, runs_root, smoke=smoke)
    for index, (name, seed, out) in enumerate(todo, 1):
        spec = experiment.spec(name, seed, smoke=smoke)
        key = summary.run_key(spec)
        tag = f"[{experiment.name} {index}/{len(todo)}] {name} seed {seed}"
        # A report where the data file is missing (a clone without ../shared) takes the summaries' hashes.
        trust = not train and key["data_sha256"].startswith(summary.UNHASHED) and spec.data.source != "builtin"
        if trust and index == 1:
            log(f"{experiment.name}: {spec.data.source} cannot be read here; the summaries' data hashes are "
                "taken as they are")
        path = summary.summary_path(results_root, experiment.name, name, seed)
        found = summary.read(path)
        if found is not None:
            why = _not_this_run(found, spec, key, trust_data=trust)
            if why is None:
                log(f"{tag}: summarised earlier ({_shown(path)})")
                done[out] = Run(experiment.name, name, seed, spec, out, path)
                continue
            log(f"{tag}: {_shown(path)} is another run ({why})")
        if _saved_spec(out) is not None:
            why = summary.mismatch(_recorded_key(out), key)
            if why is not None and train:
                stale = out.with_name(out.name + ".stale")
                log(f"{tag}: {out} is another run ({why}): set aside as {stale.name}")
                shutil.rmtree(stale, ignore_errors=True)
                out.rename(stale)
            elif why is not None:
                log(f"{tag}: {out} is another run ({why}): left out")
            elif _finished(out, spec, train=train, log=lambda line: log(f"{tag}: {line}")):
                _summarise(experiment, name, seed, out, path, key)
                log(f"{tag}: finished earlier ({out}); summarised in {_shown(path)}")
                done[out] = Run(experiment.name, name, seed, spec, out, path)
                continue
        donor = find_identical(results_root, spec, key) if spec.eval.hellaswag_limit == 0 else None
        if donor is not None:
            reused = {**summary.read(donor), "experiment": experiment.name, "variant": name, "seed": seed}
            summary.write(path, reused)
            log(f"{tag}: the same run is summarised in {_shown(donor)}; reusing it")
            done[out] = Run(experiment.name, name, seed, spec, out, path)
            continue
        if not train:
            log(f"{tag}: not trained yet (no summary of this run in {_shown(path)})")
            continue
        pending.append((tag, name, seed, out, spec, key))

    def work(item: tuple[str, str, int, Path, RunSpec, dict]) -> Run:
        tag, name, seed, out, spec, key = item
        start = time.perf_counter()
        train_one(experiment, name, seed, out, smoke=smoke, jobs=jobs, key=key)
        path = summary.summary_path(results_root, experiment.name, name, seed)
        _summarise(experiment, name, seed, out, path, key)
        log(f"{tag}: trained in {time.perf_counter() - start:.0f} s -> {out}; summarised in {_shown(path)}")
        return Run(experiment.name, name, seed, spec, out, path)

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
    return [done[out] for _, _, out in todo if out in done]


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _finished(out: Path, spec: RunSpec, *, train: bool, log) -> bool:
    """is_finished; with train=False (--report) a folder of another spec is left out, not an error."""
    try:
        return is_finished(out, spec)
    except RunFailed as err:
        if train:
            raise
        log(f"{err}: left out")
        return False


def _not_this_run(found: dict, spec: RunSpec, key: dict, *, trust_data: bool = False) -> str | None:
    """Why a summary is not the run (spec, key) (None: it is)."""
    if found.get("format") != summary.FORMAT or "key" not in found:
        return f"a summary of format {found.get('format')}, not {summary.FORMAT}"
    try:
        saved = summary.saved_spec(found)
    except SpecError as err:
        return f"a spec this zoo cannot read: {str(err).splitlines()[0]}"
    return summary.mismatch(summary.saved_key(found), key, trust_data=trust_data) or summary.spec_mismatch(
        saved, _as_trained(spec, saved), ignore=SAVING_CADENCE)


def _summarise(experiment: Experiment, name: str, seed: int, out: Path, path: Path, key: dict) -> None:
    record = _record(out)
    summary.write(path, summary.summarize(out, experiment=experiment.name, variant=name, seed=seed,
                                          spec=_saved_spec(out), key=key, wall_s=record.get("wall_s"),
                                          machine=record.get("machine")))


def _record(out: Path) -> dict:
    path = out / RUN_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _recorded_key(out: Path) -> dict | None:
    return _record(out).get("key")


def is_finished(out: Path, spec: RunSpec) -> bool:
    saved = _saved_spec(out)
    if saved is None or latest_tag(out) != checkpoints.tag_for(spec.train.steps):
        return False
    _check_same(out, saved, spec, allow_eval=False)
    return True


def find_identical(results_root: Path, spec: RunSpec, key: dict) -> Path | None:
    """A summary anywhere under `results_root` of a run with this spec (HellaSwag aside) and key."""
    for path in sorted(results_root.glob("*/runs/*/seed*.json")):
        found = summary.read(path)
        if found.get("format") != summary.FORMAT or "key" not in found:
            continue
        try:
            other = summary.saved_spec(found)
        except SpecError:  # a summary this zoo cannot read (from an older zoo): not this run
            continue
        if summary.mismatch(summary.saved_key(found), key) is None and \
                _without_hellaswag(other) == _without_hellaswag(_as_trained(spec, other)):
            return path
    return None


def train_one(experiment: Experiment, name: str, seed: int, out: Path, *, smoke: bool, jobs: int = 1,
              key: dict | None = None) -> None:
    """Train one run to its last step (resuming it if it was interrupted); `jobs`: how many runs share the
    cores; `key` (summary.run_key) is recorded with a run's first command."""
    env = _environment(smoke or jobs > 1, threads=max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None)
    key = key or summary.run_key(experiment.spec(name, seed, smoke=smoke))
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
            _trainer(out, ["--preset", preset, *_sets(sets), "--out", str(out), *stop], env,
                     first={"key": key, "machine": _machine(env, jobs)})
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


def _environment(concurrent: bool, threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    if concurrent:
        # With more threads than free cores (runs side by side, or a co-tenant), spinning OpenMP threads
        # stall each other: a tiny linear layer took 40 ms instead of 0.2 ms, a 3-step smoke run 79 s
        # instead of 5. Sleeping waits avoid that. Real runs keep the default, for full speed on a
        # quiet machine.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is not None:  # runs side by side: each on its share of the cores, not all of them
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def _machine(env: dict[str, str], jobs: int) -> dict:
    """Where a run trains, for its summary: the CPU, its cores, the trainer's threads, the runs beside it."""
    from training.mfu import _cpu_name, cpu_has_native_bf16

    return {"cpu": _cpu_name(), "native_bf16": cpu_has_native_bf16(), "cores": os.cpu_count(),
            "threads": int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS", "").isdigit() else None,
            "runs_side_by_side": jobs}


def _trainer(out: Path, args: list[str], env: dict[str, str], first: dict | None = None) -> None:
    """Run the trainer with `args`, its output in train.log; the run record gains the command and its wall
    time, and `first` (the run's key and machine) with a run's first command."""
    command = [sys.executable, "training/run.py", *args]
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / RUN_RECORD
    if first is not None:  # before the trainer starts: a runner killed outright leaves a run it can still resume
        write_atomic(record_path, json.dumps({**_record(out), **first}, indent=2) + "\n")
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
            record = {"commands": [], "wall_s": 0.0, **_record(out)}
            record["commands"].append(command[1:])
            record["wall_s"] += time.perf_counter() - start
            write_atomic(record_path, json.dumps(record, indent=2) + "\n")
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
