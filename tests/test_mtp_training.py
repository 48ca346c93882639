"""Training with multi-token prediction, as a user runs it (`python training/run.py --preset deepseek_glm4_mtp`):
each depth's loss in TensorBoard apart from the main one, the logged loss decomposing into them, validation
per depth, and an exact resume under ZeRO-2. (Expert parallelism with MTP: tests/test_expert_parallel.py.)"""

import pytest

from _training import scalars, train
from _training import cache_dir  # noqa: F401  (fixtures)

DEPTH, WEIGHT = 2, 0.3


@pytest.mark.slow
def test_mtp_run_logs_each_depth_apart(cache_dir, tmp_path):
    out = tmp_path / "run"
    proc = train(cache_dir, out, "--preset", "deepseek_glm4_mtp", "--set", f"model.mtp.depth={DEPTH}",
                 "--set", "train.precision=fp32", "--set", "train.steps=4", "--set", "train.log_every=1",
                 "--set", "train.eval_every=2")
    assert proc.returncode == 0, proc.stderr
    assert "MTP 1 loss" in proc.stdout and "MTP 2 loss" in proc.stdout and "draft acceptance" in proc.stdout
    loss, ce, aux = (scalars(out, f"train/{name}") for name in ("loss", "ce_loss", "aux_loss"))
    depths = [scalars(out, f"train/mtp_loss_{k}") for k in range(1, DEPTH + 1)]
    assert sorted(loss) == [1, 2, 3, 4] and all(sorted(d) == [1, 2, 3, 4] for d in depths)
    for step in loss:  # the loss the run optimised is main + aux + weight x mean over depths (float32 logs)
        mtp = sum(d[step] for d in depths) / DEPTH
        assert loss[step] == pytest.approx(ce[step] + aux[step] + WEIGHT * mtp, rel=1e-5)
        assert all(4 < d[step] < 8 for d in depths)  # near ln 512 = 6.2 at the start: real cross-entropies
    for k in range(1, DEPTH + 1):
        for name in ("loss", "acc", "draft_acceptance"):
            assert sorted(scalars(out, f"val/mtp_{name}_{k}")) == [2, 4], (name, k)
    assert scalars(out, f"moe/layer_{3 + DEPTH - 1}/max_vio"), "the MTP modules' MoE layers are not logged"


@pytest.mark.slow
def test_mtp_resume_continues_exactly_under_zero2(cache_dir, tmp_path):
    """(ZeRO-1, the default, trains the run above; its resume is the one tests/test_training_loop.py checks.)"""
    common = ["--preset", "deepseek_glm4_mtp", "--set", "train.precision=fp32", "--set", "train.log_every=1",
              "--set", "train.ckpt_every=2", "--set", "train.eval_every=100", "--set", "train.grad_accum=2",
              "--set", "deepspeed.zero_stage=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(cache_dir, straight, "--set", "train.steps=4", *common).returncode == 0
    first = train(cache_dir, split, "--set", "train.steps=4", "--stop-after", "2", *common)
    assert first.returncode == 0, first.stderr
    second = train(cache_dir, split, "--resume", *common[2:])  # the preset comes from the run folder
    assert second.returncode == 0, second.stderr
    for tag in ("train/loss", "train/mtp_loss_1"):
        a, b = scalars(straight, tag), scalars(split, tag)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4], tag
        assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)], tag
