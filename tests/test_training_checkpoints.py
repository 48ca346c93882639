"""Checkpoints: marked complete only once every rank has written its part, pruned, resumed from after
damage, and carrying the random generators."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from training import checkpoints, plan, trainer
from training.errors import TrainingError
from zoo import presets
from zoo.checkpoint import latest_tag

from _training import train
from _training import cache_dir, one_rank  # noqa: F401  (fixtures)


@pytest.mark.slow
def test_corrupted_checkpoint_is_one_line_and_deleting_it_falls_back(cache_dir, tmp_path):
    out = tmp_path / "run"
    assert train(cache_dir, out, "--set", "train.steps=2", "--set", "train.eval_every=100",
                 "--set", "train.ckpt_every=1").returncode == 0
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert tag == "step_0000002"
    (out / "checkpoints" / tag / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    proc = train(cache_dir, out, "--resume", "--set", "train.steps=4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unreadable" in proc.stderr and tag in proc.stderr and "delete that folder" in proc.stderr
    shutil.rmtree(out / "checkpoints" / tag)  # as the message says: the run goes on from step 1
    proc = train(cache_dir, out, "--resume", "--set", "train.steps=4")
    assert proc.returncode == 0, proc.stderr
    assert "done: 4 steps (3 this run)" in proc.stdout, proc.stdout


class _FakeEngine:
    """What checkpoints.save asks of a DeepSpeed engine; `crash` kills the save after its files."""

    def __init__(self, events: list):
        self.events, self.crash = events, False

    def save_checkpoint(self, directory, tag, client_state, save_latest=True):
        assert not save_latest  # DeepSpeed's rank 0 would write `latest` before the other ranks' files
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        (Path(directory) / tag / "mp_rank_00_model_states.pt").write_bytes(b"half" if self.crash else b"weights")
        self.events.append(f"save {tag}")
        if self.crash:
            raise KeyboardInterrupt  # killed before the barrier


@pytest.fixture
def fake_saves(one_rank, monkeypatch):
    """(engine, events): checkpoints.save on one gloo rank, with barriers and rank 0's writes logged."""
    for key, value in one_rank.items():
        monkeypatch.setenv(key, value)
    events = []
    barrier, write = dist.barrier, checkpoints.write_atomic
    monkeypatch.setattr(checkpoints.dist, "barrier", lambda: (events.append("barrier"), barrier())[1])
    monkeypatch.setattr(checkpoints, "write_atomic",
                        lambda path, text: (events.append(f"write {path.name}"), write(path, text))[1])
    return _FakeEngine(events), events


def test_a_checkpoint_counts_only_once_every_rank_wrote_it(fake_saves, tmp_path):
    """`complete` and `latest` are written after the barrier that follows every rank's files and the
    run folder; a save that dies half-way leaves the previous checkpoint in charge."""
    engine, events = fake_saves
    run = tmp_path / "run"
    checkpoints.save(engine, run, 1, {}, keep_last=3, before_commit=lambda: events.append("run folder"))
    assert events == ["barrier", "save step_0000001", "run folder", "barrier", "write complete", "write latest",
                      "barrier"]
    assert latest_tag(run) == "step_0000001"
    engine.crash = True
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(engine, run, 2, {}, keep_last=3)
    assert (run / "checkpoints" / "step_0000002").is_dir()
    assert latest_tag(run) == "step_0000001"
    (run / "checkpoints" / "latest").unlink()  # lost: the newest complete folder, not the half-written one
    assert latest_tag(run) == "step_0000001"
    shutil.rmtree(run / "checkpoints" / "step_0000001")
    assert latest_tag(run) is None and checkpoints.incomplete_tags(run) == ["step_0000002"]
    # Neither a fresh run nor a resume can use the half-written folder: --resume says so, a fresh run
    # is allowed (the trainer removes the folder first, so its saves cannot mix with it).
    (run / "spec.json").write_text(presets.get("deepseek_glm4", tiny=True).model_dump_json())
    with pytest.raises(TrainingError, match=r"\(step_0000002 never finished saving\); start it without --resume"):
        plan.resolve_run(trainer.parse_args(["--out", str(run), "--resume"]))
    plan.resolve_run(trainer.parse_args(["--tiny", "--out", str(run)]))
    assert checkpoints.remove_incomplete(run) == ["step_0000002"] and not checkpoints.incomplete_tags(run)


def test_resaving_a_tag_unmarks_it_until_the_save_completes(fake_saves, tmp_path):
    """Resumed from step 1 with a complete step 2 ahead of it (rolled back by hand), a crash while
    saving step 2 again must not leave the half-rewritten folder marked complete."""
    engine, _ = fake_saves
    run = tmp_path / "run"
    for step in (1, 2):
        checkpoints.save(engine, run, step, {}, keep_last=3)
    (run / "checkpoints" / "latest").write_text("step_0000001")
    engine.crash = True
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(engine, run, 2, {}, keep_last=3)
    (run / "checkpoints" / "latest").unlink()
    assert latest_tag(run) == "step_0000001"


def test_pruning_keeps_the_newest_complete_checkpoints_and_drops_unfinished_ones(fake_saves, tmp_path):
    engine, _ = fake_saves
    run = tmp_path / "run"
    for step in (1, 2):
        checkpoints.save(engine, run, step, {}, keep_last=2)
    engine.crash = True
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(engine, run, 4, {}, keep_last=2)  # dies: step 4 is left unfinished
    engine.crash = False
    for step in (3, 5):  # resumed from step 2
        checkpoints.save(engine, run, step, {}, keep_last=2)
    # Counting folders by name would have kept the unfinished step 4 and dropped the complete step 3.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000003", "step_0000005"]
    assert latest_tag(run) == "step_0000005"


def test_a_load_failure_is_agreed_across_ranks_and_said_once():
    assert checkpoints.agreed_failure([None, None]) == ""
    assert checkpoints.agreed_failure(["EOFError: x", "EOFError: x"]) == "EOFError: x"  # a file every rank reads
    assert checkpoints.agreed_failure([None, "FileNotFoundError: shard"]) == "rank 1: FileNotFoundError: shard"


def test_checkpoints_carry_the_cuda_generators_when_there_are_some(monkeypatch):
    from training.trainer import _restore_rng, _rng_state

    state = _rng_state()
    assert (state["cuda_rng"] is None) == (not torch.cuda.is_available())  # a CPU: recorded as absent
    expected = torch.rand(3)
    _restore_rng({"torch_rng": state["torch_rng"]})  # a checkpoint without the field: CPU generator only
    assert torch.equal(torch.rand(3), expected)

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["gpu0", "gpu1"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    assert _rng_state()["cuda_rng"] == ["gpu0", "gpu1"]
    _restore_rng({**state, "cuda_rng": ["gpu0", "gpu1"]})
    _restore_rng({**state, "cuda_rng": ["gpu0"]})  # saved on another number of devices: left alone
    _restore_rng({**state, "cuda_rng": None})  # saved on a CPU
    assert restored == [["gpu0", "gpu1"]]
