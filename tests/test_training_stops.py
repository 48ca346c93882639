"""How a run stops: a NaN loss or diverged gradients (one line naming the step, exit 1), fp16 giving
up on its loss scale, and signals (a checkpoint, exit 0; a second Ctrl-C kills at once)."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from training import trainer
from zoo.checkpoint import latest_tag, load_run_folder

from _training import ROOT, RUN, free_port, train
from _training import cache_dir  # noqa: F401  (fixtures)


def test_fp16_giving_up_on_the_loss_scale_is_a_one_line_stop():
    class Engine:
        def step(self):
            raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")

    with pytest.raises(trainer.NonFiniteLoss, match="overflow at step 7 even at the smallest loss scale"):
        trainer._step(Engine(), 7)


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step(cache_dir, tmp_path):
    # Weights drawn at std 1e38 overflow fp32, so the very first forward pass is NaN.
    proc = train(cache_dir, tmp_path / "run", "--set", "model.init_std=1e38", "--set", "train.precision=fp32",
                 "--set", "train.steps=3")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "loss is nan at step 1" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 0])
def test_diverged_gradients_stop_naming_the_step(cache_dir, tmp_path, stage):
    """A 1e38 learning rate overflows the weights after one step. ZeRO-0 in fp32 reports no gradient
    norm: there the trainer takes it before the update, so that the update is neither applied nor checkpointed."""
    out = tmp_path / "run"
    proc = train(cache_dir, out, "--set", "train.adam_lr=1e38", "--set", "train.muon_lr=1e38",
                 "--set", "train.warmup_steps=0", "--set", "train.precision=fp32", "--set", "train.steps=3",
                 "--set", f"deepspeed.zero_stage={stage}", "--set", "train.ckpt_every=1")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "gradient norm is" in proc.stderr and "at step 2" in proc.stderr
    assert latest_tag(out) == "step_0000001" and "step_0000001" in proc.stderr
    model, _ = load_run_folder(out)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(cache_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "ZOO_CACHE": str(cache_dir)}
    proc = subprocess.Popen(RUN + ["--tiny", "--out", str(out), "--set", "train.steps=100000", "--set", "train.log_every=1",
                                   "--set", "train.eval_every=100000", "--set", "train.ckpt_every=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by signal" in stdout
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert int(tag.removeprefix("step_")) >= 3 and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_a_second_ctrl_c_kills_at_once(first):
    from training.trainer import StopFlag

    before = {sig: signal.getsignal(sig) for sig in StopFlag.SIGNALS}
    try:
        stop = StopFlag()
        assert all(signal.getsignal(sig) == stop._handle for sig in StopFlag.SIGNALS)
        stop._handle(first, None)
        assert stop.signum == first
        # The first signal asked for a checkpoint; a SIGINT now takes the default action (terminate) ...
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        # ... while a repeated SIGTERM (the deepspeed launcher's, on top of the job's own) still waits for it.
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


AGREED_SIGNAL = """
import os, sys, torch, torch.distributed as dist
from training.trainer import _agreed_signal
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
print(_agreed_signal(int(sys.argv[1]), torch.device("cpu")))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_agree_on_the_stop_signal():
    """Both ranks got SIGTERM (15): the stop message must say 15, not the sum 30; one rank alone: 15 too."""
    for signums in ((15, 15), (15, 0)):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
               "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-c", AGREED_SIGNAL, str(signum)], env={**env, "RANK": str(rank)},
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank, signum in enumerate(signums)]
        results = [proc.communicate(timeout=120) for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), results
        assert [out.strip().splitlines()[-1] for out, _ in results] == ["15", "15"], (signums, results)


def _file_size_limit(limit: int):
    def apply():  # in the child: writes past `limit` bytes fail with EFBIG instead of killing it (SIGXFSZ)
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_a_one_line_stop(cache_dir, tmp_path):
    """A real failed write: the file size limit (ulimit -f) below the checkpoint's optimizer states. torch.save
    reports it without an errno; the stop still says why, and leaves no half-written checkpoint."""
    assert train(cache_dir, tmp_path / "warm", "--set", "train.steps=1").returncode == 0  # data cached first
    out = tmp_path / "run"
    env = {**os.environ, "ZOO_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([*RUN, "--tiny", "--out", str(out), "--set", "train.steps=4", "--set", "train.ckpt_every=2"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
                          preexec_fn=_file_size_limit(300_000))
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not line.startswith("training: warning:")]  # a busy machine's MFU peak
    assert len(lines) == 1, proc.stderr
    (line,) = lines
    assert line.startswith(f"training: stopped: cannot write the step 2 checkpoint in {out}: File too large "
                           "(the file size limit, ulimit -f, is 300,000 bytes) (a checkpoint needs about "), line
    assert line.endswith("last good checkpoint: none"), line
    assert latest_tag(out) is None and not (out / "checkpoints" / "step_0000002").exists()
    assert not list(out.glob(".*.tmp"))  # nor a half-written copy of the weights
