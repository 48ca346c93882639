"""Experiments' runs: `python -m experiments expN --smoke` trains every variant through the trainer and
writes its results; finished runs are found and reused (train.precision=auto resolved or not), unreadable
ones refused in one line, interrupted ones resumed."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import EXPERIMENTS
from experiments.__main__ import main
from experiments.results import read_scalars

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ smoke


@pytest.fixture(scope="module")
def smoke_env(tmp_path_factory):
    return {"ZOO_CACHE": str(tmp_path_factory.mktemp("zoo_cache"))}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_smoke_writes_every_variant(name, smoke_env, tmp_path, monkeypatch):
    for key, value in smoke_env.items():
        monkeypatch.setenv(key, value)
    assert main([name, "--smoke", "--out", str(tmp_path)]) == 0
    experiment, folder = EXPERIMENTS[name], tmp_path / "results" / name
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == list(experiment.variants)
    tokens = experiment.smoke_budget.tokens(experiment.smoke_scale.seq_len)
    assert all(float(r["val_loss"]) > 0 and int(r["tokens"]) == tokens for r in rows)
    table = (folder / "table.md").read_text()
    assert "SMOKE" in table and all(f"| {v} |" in table for v in experiment.variants)
    assert f"per run in {experiment.smoke_budget.precision}; " in table
    assert (folder / "val_loss.png").stat().st_size > 0
    assert sorted(p.name for p in (folder / "tensorboard").iterdir()) == sorted(experiment.variants)
    moe = any(experiment.spec(v, 0).model.ffn.kind == "moe" for v in experiment.variants)
    assert (folder / "max_vio.png").is_file() == moe and (folder / "expert_load.png").is_file() == moe
    if experiment.sweep:
        assert (folder / f"loss_vs_{experiment.sweep.split('.')[-1]}.png").is_file()
    if experiment.budget.hellaswag_limit:
        assert all(r["hellaswag_acc_norm"] for r in rows)  # scored on the final model


@pytest.mark.slow
def test_finished_runs_are_skipped_and_a_changed_spec_is_refused(smoke_env, tmp_path):
    env = {**__import__("os").environ, **smoke_env}
    command = [sys.executable, "-m", "experiments", "exp4", "--smoke", "--out", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished earlier") == len(EXPERIMENTS["exp4"].variants)
    spec = tmp_path / "runs" / "exp4" / "sigmoid_bias" / "seed0" / "spec.json"
    spec.write_text(spec.read_text().replace('"steps": 3', '"steps": 4'))
    refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert refused.returncode == 1 and "holds a run with a different spec (train.steps)" in refused.stderr


# ------------------------------------------------------------------------------------------ train.precision=auto


def _trainer_device():
    """The device `training/run.py` trains on when the runner starts it: the first GPU, or the CPU."""
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _fake_finished_run(out: Path, spec, precision: str | None = None) -> None:
    """A run folder as the trainer leaves it, without training: spec.json with train.precision resolved
    (for this machine, or `precision` as another machine resolved it) and a complete final checkpoint."""
    from training import checkpoints
    from training.precision import resolve_precision
    from zoo.overrides import with_changes

    saved = (resolve_precision(spec, _trainer_device()) if precision is None
             else with_changes(spec, {"train.precision": precision}))
    tag = checkpoints.tag_for(spec.train.steps)
    (out / "checkpoints" / tag).mkdir(parents=True)
    (out / "checkpoints" / tag / checkpoints.COMPLETE).write_text("")
    (out / "checkpoints" / checkpoints.LATEST).write_text(tag)
    (out / "spec.json").write_text(saved.model_dump_json(indent=2) + "\n")


@pytest.mark.parametrize("precision", [None, "bf16", "fp32"], ids=["this_machine", "bf16", "fp32"])
def test_runs_saved_with_precision_auto_resolved_are_finished(precision, tmp_path):
    """The real budget asks train.precision=auto; the trainer saves bf16 or fp32 in spec.json. The runner
    must take that as its run (or `--report` would fail and exp1 never reach its HellaSwag phase), and a
    run trained elsewhere, where auto chose the other precision, is that run too."""
    from experiments import runner

    exp4 = EXPERIMENTS["exp4"]
    assert exp4.budget.precision == "auto"
    for name, seed, out in runner.plan(exp4, tmp_path):
        _fake_finished_run(out, exp4.spec(name, seed), precision)
    runs = runner.run_experiment(exp4, tmp_path, train=False, log=lambda line: None)  # what --report does
    assert [run.source for run in runs] == [out for _, _, out in runner.plan(exp4, tmp_path)]
    name, seed, out = runner.plan(exp4, tmp_path)[0]
    runner.train_one(exp4, name, seed, out, smoke=False)  # finished: checks the folder, trains nothing
    assert not (out / runner.LOG).exists()


def test_an_identical_run_saved_with_precision_auto_resolved_is_reused(tmp_path):
    from dataclasses import replace

    from experiments import runner

    exp4 = EXPERIMENTS["exp4"]
    one = replace(exp4, variants={"sigmoid_bias": exp4.variants["sigmoid_bias"]}, seeds=(0,))
    donor = tmp_path / "elsewhere" / "same" / "seed0"
    _fake_finished_run(donor, one.spec("sigmoid_bias", 0))
    [run] = runner.run_experiment(one, tmp_path, train=False, log=lambda line: None)
    assert run.source == donor


@pytest.mark.parametrize(("asked", "saved"), [("fp32", "bf16"), ("bf16", "fp32"), ("auto", "fp16")])
def test_a_run_in_a_precision_the_budget_does_not_allow_is_refused(asked, saved, tmp_path):
    """An explicit precision must match; auto matches what auto can resolve to (bf16, fp32), not fp16."""
    from dataclasses import replace

    from experiments import runner

    exp4 = EXPERIMENTS["exp4"]
    one = replace(exp4, variants={"sigmoid_bias": exp4.variants["sigmoid_bias"]}, seeds=(0,),
                  budget=replace(exp4.budget, precision=asked))
    [(name, seed, out)] = runner.plan(one, tmp_path)
    _fake_finished_run(out, one.spec(name, seed), saved)
    with pytest.raises(runner.RunFailed, match=rf"different spec \(train\.precision; it trained in {saved}, "):
        runner.run_experiment(one, tmp_path, train=False, log=lambda line: None)


def test_a_run_folder_this_zoo_cannot_read_is_one_line(tmp_path):
    """A spec.json this zoo's validators refuse (a top_k above n_experts, say)
    is one line naming the file and the field, not a pydantic traceback from deep in the runner."""
    from dataclasses import replace

    from experiments import runner

    exp4 = EXPERIMENTS["exp4"]
    one = replace(exp4, variants={"sigmoid_bias": exp4.variants["sigmoid_bias"]}, seeds=(0,))
    [(name, seed, out)] = runner.plan(one, tmp_path)
    _fake_finished_run(out, one.spec(name, seed))
    saved = json.loads((out / "spec.json").read_text())
    saved["model"]["ffn"]["top_k"] = saved["model"]["ffn"]["n_experts"] + 1
    (out / "spec.json").write_text(json.dumps(saved))
    with pytest.raises(runner.RunFailed) as caught:
        runner.run_experiment(one, tmp_path, train=False, log=lambda line: None)
    message = str(caught.value)
    assert "\n" not in message and str(out / "spec.json") in message and "model.ffn" in message, message
    assert "not a valid run spec for this version of the zoo" in message and "delete that folder" in message
    # Another experiment's unreadable folder is none of this run's business: looking for an identical
    # finished run to reuse passes over it.
    other = tmp_path / "exp3" / "top1" / "seed0"
    other.mkdir(parents=True)
    (other / "spec.json").write_text(json.dumps(saved))
    (out / "spec.json").unlink()
    assert runner.find_identical(tmp_path, one.spec(name, seed)) is None


@pytest.mark.slow
def test_a_run_with_precision_auto_trains_through_its_hellaswag_phase(smoke_env, tmp_path, monkeypatch):
    """The first phase saves spec.json with auto resolved; the runner must still take it as its own run
    for the final (HellaSwag) phase. The smoke budget asks fp32, so this one asks auto."""
    from dataclasses import replace

    from experiments import runner

    for key, value in smoke_env.items():
        monkeypatch.setenv(key, value)
    exp1 = EXPERIMENTS["exp1"]
    auto = replace(exp1, variants={"mlp": exp1.variants["mlp"]},
                   smoke_budget=replace(exp1.smoke_budget, precision="auto"))
    out = tmp_path / "run"
    runner.train_one(auto, "mlp", 0, out, smoke=True, concurrent=True)
    assert runner.is_finished(out, auto.spec("mlp", 0, smoke=True))
    assert runner._saved_spec(out).train.precision in ("bf16", "fp32")
    assert list(read_scalars(out)["hellaswag/acc_norm"]) == [auto.smoke_budget.steps]


# ------------------------------------------------------------------------------------------ interruptions


def test_budget_checkpoints_at_every_evaluation():
    """A run killed outright loses at most eval_every steps, not the whole run."""
    for experiment in EXPERIMENTS.values():
        for smoke in (False, True):
            budget, train = experiment.active_budget(smoke), experiment.spec(next(iter(experiment.variants)), 0,
                                                                            smoke=smoke).train
            assert train.ckpt_every == budget.eval_every < budget.steps


STEPS = 200  # a toy step takes ~0.1 s: enough of them that the Ctrl-C lands before the last
INTERRUPTIBLE = """
import sys
from dataclasses import replace
from pathlib import Path

from experiments.base import SMOKE_BUDGET, Experiment, Variant
from experiments.runner import run_experiment

budget = replace(SMOKE_BUDGET, steps=STEPS, eval_every=STEPS // 2, log_every=1)
experiment = Experiment(name="interrupt", title="-", hypothesis="-", base="exp1_mlp", variants={"mlp": Variant()},
                        budget=budget, smoke_budget=budget, seeds=(0,))
try:
    run_experiment(experiment, Path(sys.argv[1]), smoke=True)
except KeyboardInterrupt:  # the runner's Interrupted, once its trainers have stopped
    sys.exit(3)
""".replace("STEPS", str(STEPS))


@pytest.mark.slow
def test_ctrl_c_saves_the_trainers_progress_and_the_runner_resumes(smoke_env, tmp_path):
    """Ctrl-C reaches the runner (the trainer runs in its own session): it must pass the stop on and wait
    for the trainer's checkpoint rather than kill it."""
    import os
    import signal
    import time

    from training import checkpoints
    from zoo.checkpoint import latest_tag

    env = {**os.environ, **smoke_env}
    command = [sys.executable, "-c", INTERRUPTIBLE, str(tmp_path)]
    run, log = tmp_path / "interrupt" / "mlp" / "seed0", tmp_path / "interrupt" / "mlp" / "seed0" / "train.log"
    # Ctrl-C as in a terminal: a shell's background job (CI scripts run as one) inherits SIGINT ignored.
    runner = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (log.is_file() and f"\nstep 2/{STEPS}" in log.read_text()):
        assert runner.poll() is None and time.monotonic() < deadline, runner.stdout.read()
        time.sleep(0.05)
    runner.send_signal(signal.SIGINT)
    output, _ = runner.communicate(timeout=300)
    assert runner.returncode == 3, output
    text = log.read_text()
    assert "stopped by signal 2" in text, text
    saved = int(latest_tag(run).removeprefix("step_"))
    assert 2 <= saved < STEPS
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert latest_tag(run) == checkpoints.tag_for(STEPS)
    assert f"done: {STEPS} steps ({STEPS - saved} this run)" in log.read_text()


@pytest.mark.slow
def test_an_interrupted_run_with_hellaswag_resumes_through_its_final_phase(smoke_env, tmp_path, monkeypatch):
    """exp1 scores HellaSwag on the final model: a run interrupted at step 1 must go on to step 2 without
    it, then run step 3 with it, resuming as often as its phases need."""
    from experiments import runner

    for key, value in smoke_env.items():
        monkeypatch.setenv(key, value)
    exp1, out = EXPERIMENTS["exp1"], tmp_path / "run"
    preset, sets = exp1.command_args("mlp", 0, smoke=True, hellaswag=False)
    runner._trainer(out, ["--preset", preset, *runner._sets(sets), "--out", str(out), "--stop-after", "1"],
                    runner._environment(True))
    runner.train_one(exp1, "mlp", 0, out, smoke=True, concurrent=True)
    assert runner.is_finished(out, exp1.spec("mlp", 0, smoke=True))
    assert list(read_scalars(out)["hellaswag/acc_norm"]) == [3]  # scored on the final model only
