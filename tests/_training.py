"""What the tests/test_training_*.py files share: the trainer run as a user runs it, its TensorBoard
scalars, a shared data cache, and the trainer's one-rank process group in this process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "training" / "run.py")]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """$ZOO_CACHE for the trainer: one per test session, so the tokenizer is trained once."""
    path = tmp_path_factory.getbasetemp() / "zoo_cache"
    path.mkdir(exist_ok=True)
    return path


def train(cache_dir, out, *args, timeout=300, launcher=None, tiny=None):
    """The trainer at --tiny size; a --resume takes its size from the run folder (it refuses --tiny)."""
    env = {**os.environ, "ZOO_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    tiny = "--resume" not in args if tiny is None else tiny
    command = (launcher or RUN) + [*(["--tiny"] if tiny else []), "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> list[str]:
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "training" / "run.py")]


_GROUP: dict[str, dict[str, str]] = {}  # the one-rank group's variables, once it exists


@pytest.fixture(scope="module")
def one_rank(request, one_thread):
    """The trainer's one-rank gloo group (training.distributed.init_distributed), for engines built in this process;
    returns the variables it sets (RANK, LOCAL_RANK, ...). They are set only while an engine runs: left
    in the environment, they would make later `training/run.py` subprocesses take themselves for launched ranks.
    The fixture is per module, the group per session: made by the first module that asks, destroyed at the
    session's end (DeepSpeed keeps the groups it was given)."""
    from training.distributed import init_distributed

    if "launched" not in _GROUP:
        environ, threads = dict(os.environ), torch.get_num_threads()
        if not dist.is_initialized():
            init_distributed()
            request.config.add_cleanup(dist.destroy_process_group)
        torch.set_num_threads(threads)  # init_distributed gives a lone rank every core
        _GROUP["launched"] = {k: v for k, v in os.environ.items() if environ.get(k) != v}
        os.environ.clear()
        os.environ.update(environ)
    return _GROUP["launched"]
