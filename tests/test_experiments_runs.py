"""Experiments' runs: `python -m experiments expN --smoke` trains every variant through the trainer and
writes its results; finished runs are summarised, found and reused only when their spec, data file, split
version and results version match (train.precision=auto resolved or not), unreadable ones refused in one
line, interrupted ones resumed; the committed results rebuild byte for byte from their summaries."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import EXPERIMENTS
from experiments.__main__ import main
from experiments import summary
from experiments.summary import read_scalars

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
    for plot in ("val_loss.png", "val_loss_vs_flops.png", "val_loss_vs_time.png"):
        assert (folder / plot).stat().st_size > 0
    assert sorted(p.name for p in (folder / "runs").iterdir()) == sorted(experiment.variants)
    moe = any(experiment.spec(v, 0).model.ffn.kind == "moe" for v in experiment.variants)
    for plot in ("max_vio.png", "max_vio_global.png", "expert_load.png"):
        assert (folder / plot).is_file() == moe
    readme = (folder / "README.md").read_text()
    assert all(h.claim in readme for h in experiment.hypotheses) and "**inconclusive**" in readme  # 1 seed
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
    assert again.stdout.count("summarised earlier") == len(EXPERIMENTS["exp4"].variants)
    # Without its summary, the finished run folder is found and summarised again, identically.
    path = tmp_path / "results" / "exp4" / "runs" / "sigmoid_bias" / "seed0.json"
    before = path.read_bytes()
    path.unlink()
    third = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert third.returncode == 0 and third.stdout.count("finished earlier") == 1, third.stdout + third.stderr
    assert path.read_bytes() == before
    path.unlink()
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

    from experiments import runner
    from torch.utils.tensorboard import SummaryWriter

    saved = (resolve_precision(spec, _trainer_device()) if precision is None
             else with_changes(spec, {"train.precision": precision}))
    tag = checkpoints.tag_for(spec.train.steps)
    (out / "checkpoints" / tag).mkdir(parents=True)
    (out / "checkpoints" / tag / checkpoints.COMPLETE).write_text("")
    (out / "checkpoints" / checkpoints.LATEST).write_text(tag)
    (out / "spec.json").write_text(saved.model_dump_json(indent=2) + "\n")
    (out / runner.RUN_RECORD).write_text(json.dumps({"key": summary.run_key(spec), "wall_s": 1.0}))
    with SummaryWriter(log_dir=str(out)) as writer:  # what the report reads: a validation curve
        for step, loss in ((spec.train.steps // 2, 5.0), (spec.train.steps, 4.0)):
            writer.add_scalar("val/loss", loss, step)


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
    runs = runner.run_experiment(exp4, tmp_path, tmp_path / "results", train=False, log=lambda line: None)
    assert [run.out for run in runs] == [out for _, _, out in runner.plan(exp4, tmp_path)]  # --report's way
    assert all(run.summary.is_file() for run in runs)
    name, seed, out = runner.plan(exp4, tmp_path)[0]
    runner.train_one(exp4, name, seed, out, smoke=False)  # finished: checks the folder, trains nothing
    assert not (out / runner.LOG).exists()


def _one(variant="sigmoid_bias", **changes):
    from dataclasses import replace

    exp4 = EXPERIMENTS["exp4"]
    return replace(exp4, variants={variant: exp4.variants[variant]}, seeds=(0,), hypotheses=(), **changes)


def _summarised(tmp_path, experiment, name="sigmoid_bias", seed=0, folder=None) -> Path:
    """A finished run of `experiment`, summarised into tmp_path/results as the runner does."""
    from experiments import runner

    out = folder or tmp_path / "train" / experiment.name / name / f"seed{seed}"
    _fake_finished_run(out, experiment.spec(name, seed))
    path = summary.summary_path(tmp_path / "results", experiment.name, name, seed)
    runner._summarise(experiment, name, seed, out, path, summary.run_key(experiment.spec(name, seed)))
    return path


def test_an_identical_run_summarised_by_another_experiment_is_reused(tmp_path):
    from dataclasses import replace

    from experiments import runner

    one = _one()
    donor = _summarised(tmp_path, replace(one, name="exp9"))
    lines = []
    [run] = runner.run_experiment(one, tmp_path / "runs", tmp_path / "results", train=False, log=lines.append)
    assert "reusing it" in lines[0] and run.summary != donor
    assert summary.read(run.summary)["values"] == summary.read(donor)["values"]
    assert summary.read(run.summary)["experiment"] == one.name


@pytest.mark.parametrize("field, value, why", [
    ("split_version", 1, "its split version is 1, now "),
    ("results_version", 0, "its results version is 0, now "),
    ("data_sha256", "0" * 64, "its data file differs (sha256 000000000000..., now "),
])
def test_a_run_of_another_split_data_file_or_results_version_is_not_reused(tmp_path, monkeypatch, field, value, why):
    """Neither a committed summary, nor a finished run folder, nor another experiment's summary of the same
    spec is reused when its key differs: the runner says why; --report leaves them out and moves nothing,
    training sets the folder aside and trains the run afresh."""
    from dataclasses import replace

    from experiments import runner

    one = _one()
    out = tmp_path / "runs" / one.name / "sigmoid_bias" / "seed0"
    path = _summarised(tmp_path, one, folder=out)
    _summarised(tmp_path, replace(one, name="exp9"))  # a donor for the same spec
    for donor in sorted((tmp_path / "results").glob("*/runs/*/seed0.json")):
        stale = summary.read(donor)
        stale["key"][field] = value
        summary.write(donor, stale)
    recorded = json.loads((out / runner.RUN_RECORD).read_text())
    recorded["key"][field] = value
    (out / runner.RUN_RECORD).write_text(json.dumps(recorded))
    lines = []
    assert runner.run_experiment(one, tmp_path / "runs", tmp_path / "results", train=False, log=lines.append) == []
    assert f"{path} is another run ({why}" in lines[0], lines
    assert f"{out} is another run ({why}" in lines[1] and lines[1].endswith("left out"), lines
    assert "not trained yet" in lines[2], lines
    assert (out / "spec.json").is_file()  # --report moves nothing

    trained = []

    def train_one(experiment, name, seed, folder, **kwargs):  # stands in for the trainer
        trained.append(folder)
        _fake_finished_run(folder, experiment.spec(name, seed))

    monkeypatch.setattr(runner, "train_one", train_one)
    lines = []
    [run] = runner.run_experiment(one, tmp_path / "runs", tmp_path / "results", log=lines.append)
    assert f"{out} is another run ({why}" in lines[1] and "set aside as seed0.stale" in lines[1], lines
    assert trained == [out] and (out.with_name("seed0.stale") / "spec.json").is_file()
    assert summary.mismatch(summary.saved_key(summary.read(run.summary)), summary.run_key(one.spec("sigmoid_bias", 0))) is None


def test_data_fingerprint_is_the_files_content(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one corpus")
    b.write_text("one corpus")
    assert summary.data_fingerprint(str(a)) == summary.data_fingerprint(str(b))  # content, not name
    b.write_text("one corpus.")
    assert summary.data_fingerprint(str(a)) != summary.data_fingerprint(str(b))
    assert summary.data_fingerprint("builtin") == "unhashed:builtin"


@pytest.mark.parametrize(("asked", "saved"), [("fp32", "bf16"), ("bf16", "fp32"), ("auto", "fp16")])
def test_a_run_in_a_precision_the_budget_does_not_allow_is_refused(asked, saved, tmp_path):
    """An explicit precision must match; auto matches what auto can resolve to (bf16, fp32), not fp16."""
    from dataclasses import replace

    from experiments import runner

    exp4 = EXPERIMENTS["exp4"]
    one = _one(budget=replace(exp4.budget, precision=asked))
    [(name, seed, out)] = runner.plan(one, tmp_path)
    _fake_finished_run(out, one.spec(name, seed), saved)
    with pytest.raises(runner.RunFailed, match=rf"different spec \(train\.precision; it trained in {saved}, "):
        runner.run_experiment(one, tmp_path, tmp_path / "results", log=lambda line: None)  # before any training
    lines = []  # --report leaves it out instead
    assert runner.run_experiment(one, tmp_path, tmp_path / "results", train=False, log=lines.append) == []
    assert "different spec" in lines[0] and lines[0].endswith("left out"), lines


def test_a_run_folder_this_zoo_cannot_read_is_one_line(tmp_path):
    """A spec.json this zoo's validators refuse (a top_k above n_experts, say)
    is one line naming the file and the field, not a pydantic traceback from deep in the runner."""
    from dataclasses import replace

    from experiments import runner

    one = _one()
    [(name, seed, out)] = runner.plan(one, tmp_path)
    _fake_finished_run(out, one.spec(name, seed))
    saved = json.loads((out / "spec.json").read_text())
    saved["model"]["ffn"]["top_k"] = saved["model"]["ffn"]["n_experts"] + 1
    (out / "spec.json").write_text(json.dumps(saved))
    with pytest.raises(runner.RunFailed) as caught:
        runner.run_experiment(one, tmp_path, tmp_path / "results", train=False, log=lambda line: None)
    message = str(caught.value)
    assert "\n" not in message and str(out / "spec.json") in message and "model.ffn" in message, message
    assert "not a valid run spec for this version of the zoo" in message and "delete that folder" in message
    # Another experiment's unreadable summary is none of this run's business: looking for an identical
    # finished run to reuse passes over it.
    other = summary.summary_path(tmp_path / "results", "exp3", "top1", 0)
    summary.write(other, {"key": {**summary.run_key(one.spec(name, seed)), "spec": saved}})
    assert runner.find_identical(tmp_path / "results", one.spec(name, seed), summary.run_key(one.spec(name, seed))) is None


@pytest.mark.slow
def test_a_run_with_precision_auto_trains_through_its_hellaswag_phase(smoke_env, tmp_path, monkeypatch):
    """The first phase saves spec.json with auto resolved; the runner must still take it as its own run
    for the final (HellaSwag) phase. The smoke budget asks fp32, so this one asks auto."""
    from dataclasses import replace

    from experiments import runner

    for key, value in smoke_env.items():
        monkeypatch.setenv(key, value)
    exp1 = EXPERIMENTS["exp1"]
    auto = replace(exp1, variants={"mlp": exp1.variants["mlp"]}, hypotheses=(),
                   smoke_budget=replace(exp1.smoke_budget, precision="auto", hellaswag_limit=8))
    out = tmp_path / "run"
    runner.train_one(auto, "mlp", 0, out, smoke=True, jobs=2)
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
    run_experiment(experiment, Path(sys.argv[1]), Path(sys.argv[1]) / "results", smoke=True)
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
    """A budget that scores HellaSwag does so on the final model: a run interrupted at step 1 must go on to
    step 2 without it, then run step 3 with it, resuming as often as its phases need."""
    from experiments import runner

    for key, value in smoke_env.items():
        monkeypatch.setenv(key, value)
    from dataclasses import replace

    exp1, out = EXPERIMENTS["exp1"], tmp_path / "run"
    exp1 = replace(exp1, smoke_budget=replace(exp1.smoke_budget, hellaswag_limit=8))
    preset, sets = exp1.command_args("mlp", 0, smoke=True, hellaswag=False)
    runner._trainer(out, ["--preset", preset, *runner._sets(sets), "--out", str(out), "--stop-after", "1"],
                    runner._environment(True), first={"key": summary.run_key(exp1.spec("mlp", 0, smoke=True))})
    runner.train_one(exp1, "mlp", 0, out, smoke=True, jobs=2)
    assert runner.is_finished(out, exp1.spec("mlp", 0, smoke=True))
    assert list(read_scalars(out)["hellaswag/acc_norm"]) == [3]  # scored on the final model only


def test_a_report_without_the_data_file_takes_the_summaries_hashes(tmp_path):
    """A clone without ../shared cannot hash the corpus: --report still rebuilds from the committed summaries
    (their recorded hash stands), where training would refuse them."""
    from dataclasses import replace

    from experiments import runner

    one = _one(budget=replace(EXPERIMENTS["exp4"].budget, source="../shared/data/not_here.parquet"))
    path = _summarised(tmp_path, one)
    found = summary.read(path)
    assert found["key"]["data_sha256"] == "unhashed:../shared/data/not_here.parquet"
    found["key"]["data_sha256"] = "ab" * 32  # as the machine that had the file recorded it
    summary.write(path, found)
    lines = []
    [run] = runner.run_experiment(one, tmp_path / "runs", tmp_path / "results", train=False, log=lines.append)
    assert run.summary == path and "cannot be read here" in lines[0] and "summarised earlier" in lines[1]


def test_scalars_a_killed_process_logged_past_its_checkpoint_are_dropped(tmp_path):
    """A process killed at step 35 after its checkpoint at 20 logged steps 30 (with an evaluation's time);
    the resumed process logs 21-40 again. Only the resumed values count, or the training time would
    subtract the dead process's evaluation from the live process's step."""
    from torch.utils.tensorboard import SummaryWriter

    for name, points in (("1", {10: 1.0, 20: 1.0, 30: 1.0}), ("2", {21: 2.0, 30: 2.0, 40: 2.0})):
        with SummaryWriter(log_dir=str(tmp_path / name)) as writer:
            for step, value in points.items():
                writer.add_scalar("time/step", value, step)
            if name == "1":
                writer.add_scalar("time/evaluation", 0.5, 30)
        [events] = (tmp_path / name).glob("events.out.tfevents.*")
        events.rename(tmp_path / f"events.out.tfevents.{name}")
    with SummaryWriter(log_dir=str(tmp_path / "3")) as writer:  # what add_hparams writes at the end: step 0
        writer.add_scalar("hparam/val_loss", 3.0, 0)
    [events] = (tmp_path / "3").glob("events.out.tfevents.*")
    events.rename(tmp_path / "events.out.tfevents.3")
    scalars = read_scalars(tmp_path)
    assert scalars["time/step"] == {10: 1.0, 20: 1.0, 21: 2.0, 30: 2.0, 40: 2.0}
    assert scalars["hparam/val_loss"] == {0: 3.0}
    assert "time/evaluation" not in scalars
    assert summary._training_seconds(scalars) == {10: 10.0, 20: 20.0, 21: 22.0, 30: 40.0, 40: 60.0}


def test_a_summary_that_is_not_json_is_another_run(tmp_path):
    from experiments import runner

    one = _one()
    path = _summarised(tmp_path, one)
    path.write_text("{cut short")
    lines = []
    assert runner.run_experiment(one, tmp_path / "runs", tmp_path / "results", train=False, log=lines.append) == []
    assert "is another run (a summary of format unreadable, not 1)" in lines[0], lines
