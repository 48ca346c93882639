"""The trainer end to end, as a user runs it: `python training/run.py` on tiny presets, and
`deepspeed --num_gpus 2 training/run.py` on two CPU ranks (marked slow). What a run logs and saves,
exact resume, the LR schedule, HellaSwag during training, the precision it picks."""

import json
import math
import os
import re

import pytest
import torch

from training.mfu import cpu_has_native_bf16
from training.optim import lr_factor
from zoo.checkpoint import load_run_folder
from zoo.host import usable_cpus

from _training import ROOT, deepspeed_launcher, scalars, train
from _training import cache_dir  # noqa: F401  (fixtures)


def test_train_end_to_end(cache_dir, tmp_path):
    from training import mfu as mfu_module
    from training.precision import DTYPES
    from zoo.describe import describe

    out = tmp_path / "run"
    proc = train(cache_dir, out, "--set", "train.steps=12", "--set", "train.eval_every=4", "--set", "train.ckpt_every=6",
                 "--set", "train.log_every=1", "--set", "train.micro_batch_size=4")
    assert proc.returncode == 0, proc.stderr
    *_, last, timing = proc.stdout.strip().splitlines()
    # Where the time went, as shares of the wall time, and the peak memory split into what holds it.
    assert re.fullmatch(r"time: \d+ s: data \d+%, forward \d+%, backward \d+%, newton_schulz \d+%, adamw \d+%, "
                        r"zero \d+%, evaluation \d+%, checkpoint \d+%, logging \d+%, other \d+%; peak memory "
                        r"[\d.]+ GB: weights [\d.]+, gradients [\d.]+, optimizer states [\d.]+, rest [\d.]+", timing), timing
    assert last.startswith("done: 12 steps") and "val loss" in last and "tensorboard --logdir" in last
    for name in ("spec.json", "model.safetensors", "tokenizer.model", "ds_config.json", "checkpoints/latest"):
        assert (out / name).exists(), name
    ds_config = json.loads((out / "ds_config.json").read_text())
    # train.precision=auto: bf16 where the CPU has bf16 instructions, fp32 elsewhere; spec.json records it
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert json.loads((out / "spec.json").read_text())["train"]["precision"] == expected
    assert f", {expected}, ZeRO-1" in proc.stdout + proc.stderr
    assert ds_config["train_micro_batch_size_per_gpu"] == 4 and ds_config["bf16"]["enabled"] == (expected == "bf16")
    assert "auto" not in json.dumps(ds_config)
    val = scalars(out, "val/loss")
    assert sorted(val) == [4, 8, 12] and val[12] < val[4] < math.log(512)
    for tag in ("train/loss", "train/aux_loss", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "lr/muon",
                "lr/adam", "moe/layer_1/max_vio", "moe/layer_1/router_entropy", "moe/layer_1/routing_bias_norm",
                "val/ppl", "val/acc", "time/step", "time/forward", "time/backward", "time/newton_schulz",
                "time/adamw", "time/zero", "time/data", "time/logging"):
        assert scalars(out, tag), f"{tag} not logged"
    # Each step's phases fit inside its wall time (time/... are seconds per step since the previous log).
    step_time = scalars(out, "time/step")
    phases = [scalars(out, f"time/{name}") for name in ("data", "forward", "backward", "newton_schulz", "adamw",
                                                         "zero", "evaluation", "checkpoint", "logging")]
    assert sorted(step_time) == list(range(1, 13))
    for step, wall in step_time.items():
        assert 0 < sum(p.get(step, 0.0) for p in phases) <= wall * 1.001, step
    # The run folder rebuilds the trained model, whose validation loss is the logged one.
    model, spec = load_run_folder(out)
    assert spec.train.steps == 12 and spec.model.d_model == 64
    bias = model.layers[1].ffn.router.e_score_correction_bias
    assert bias.abs().sum() > 0, "the auxiliary-loss-free bias never moved"

    # MFU = tokens/s x describe's forward FLOPs per token x 3 / the peak the trainer divides by, which it
    # logs: on a CPU (fp32, or bf16 where it has bf16 instructions) the matmul peak it measured, cached in
    # $ZOO_CACHE under this CPU, dtype and the trainer's thread count (a lone rank takes every core unless
    # OMP_NUM_THREADS is set: training.distributed.set_cpu_threads) unless the machine was busy, which it says.
    # TensorBoard holds float32.
    (peak,) = scalars(out, "perf/peak_flops").values()
    threads = int(os.environ.get("OMP_NUM_THREADS", usable_cpus()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "get_num_threads", lambda: threads)
        key = mfu_module.cpu_peak_cache_key(DTYPES[expected])
    cache_file = cache_dir / "matmul_peak.json"
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key in cached:
        assert peak == pytest.approx(cached[key], rel=1e-6) and peak > 0
    else:
        assert "was measured while other processes used the CPU" in proc.stderr, (key, list(cached), proc.stderr)
    flops_per_token = describe(spec, seq_len=spec.data.seq_len)["flops_per_token"]
    tokens_per_s, mfu = scalars(out, "perf/tokens_per_s"), scalars(out, "perf/mfu")
    assert sorted(mfu) == sorted(tokens_per_s) == list(range(1, 13))
    for step, value in mfu.items():
        assert value == pytest.approx(tokens_per_s[step] * flops_per_token * 3 / peak, rel=1e-6), step
    # Perplexity is exp(validation loss) at every evaluation.
    ppl = scalars(out, "val/ppl")
    assert sorted(ppl) == [4, 8, 12]
    for step, loss in val.items():
        assert ppl[step] == pytest.approx(math.exp(loss), rel=2e-6)  # float32 loss ~6: exp moves its 6e-8 x 6
    # The MoE statistics agree with one another at every step: each expert's share of the step's loads sums
    # to 1, MaxVio = max load / mean load - 1 = E x the largest share - 1, the entropy of a distribution over
    # E experts lies in (0, ln E], and the bias norm logged at the last step is the saved router's.
    moe_layers = model.moe_layers()
    assert moe_layers
    for layer, moe in moe_layers.items():
        n_experts = moe.router.n_experts
        shares = [scalars(out, f"moe_load/layer_{layer}/expert_{e}") for e in range(n_experts)]
        max_vio = scalars(out, f"moe/layer_{layer}/max_vio")
        entropy = scalars(out, f"moe/layer_{layer}/router_entropy")
        for step in range(1, 13):
            step_shares = [share[step] for share in shares]
            assert sum(step_shares) == pytest.approx(1.0, rel=1e-5)
            assert max_vio[step] == pytest.approx(n_experts * max(step_shares) - 1, rel=1e-5, abs=1e-6)
            assert 0 < entropy[step] <= math.log(n_experts) + 1e-6
        assert max(max_vio.values()) > 0.05, "loads this unequal at no step: the check above would pass on zeros"
        bias_norm = moe.router.e_score_correction_bias.norm().item()
        assert scalars(out, f"moe/layer_{layer}/routing_bias_norm")[12] == pytest.approx(bias_norm, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resume_continues_exactly(cache_dir, tmp_path, optimizer):
    common = ["--set", "train.precision=fp32", "--set", "train.log_every=1", "--set", "train.ckpt_every=3",
              "--set", "train.eval_every=100", "--set", "train.grad_accum=2", "--set", f"train.optimizer={optimizer}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(cache_dir, straight, "--set", "train.steps=6", *common).returncode == 0
    first = train(cache_dir, split, "--set", "train.steps=6", "--stop-after", "3", *common)
    assert first.returncode == 0, first.stderr
    assert "stopped by --stop-after at step 3" in first.stdout
    second = train(cache_dir, split, "--resume", *common)
    assert second.returncode == 0, second.stderr
    a, b = scalars(straight, "train/loss"), scalars(split, "train/loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]
    lr = "lr/muon" if optimizer == "muon" else "lr/adam"
    assert scalars(straight, lr) == scalars(split, lr) and len(scalars(straight, lr)) == 6
    assert bool(scalars(straight, "lr/muon")) == (optimizer == "muon")  # adamw: no Muon group at all


@pytest.mark.slow
def test_lr_schedule_counts_optimizer_steps(cache_dir, tmp_path):
    out = tmp_path / "run"
    proc = train(cache_dir, out, "--set", "train.steps=6", "--set", "train.warmup_steps=2", "--set", "train.grad_accum=3",
                 "--set", "train.log_every=1", "--set", "train.eval_every=100", "--set", "train.muon_lr=0.01")
    assert proc.returncode == 0, proc.stderr
    spec = load_run_folder(out)[1]
    logged = scalars(out, "lr/muon")
    # Step 1 is the first of two warmup steps: half the peak (DeepSpeed has already stepped the scheduler
    # when engine.step() returns; get_last_lr() then read 0.01, the next step's LR).
    assert logged[1] == pytest.approx(0.005, rel=1e-6)
    for step in range(1, 7):  # optimizer step `step` runs at the LR after `step - 1` scheduler steps
        assert logged[step] == pytest.approx(0.01 * lr_factor(step - 1, spec), rel=1e-6)


@pytest.mark.slow
def test_hellaswag_during_training(cache_dir, tmp_path):
    data = ROOT.parent / "shared" / "data" / "hellaswag_val.jsonl"
    out = tmp_path / "run"
    proc = train(cache_dir, out, "--set", "train.steps=2", "--set", "train.eval_every=1", "--set", "eval.hellaswag_limit=8",
                 "--set", f"eval.hellaswag_path={data}")
    assert proc.returncode == 0, proc.stderr
    assert "HellaSwag acc_norm" in proc.stdout and "(n=8)" in proc.stdout
    acc = scalars(out, "hellaswag/acc_norm")
    assert sorted(acc) == [1, 2] and all(v in {i / 8 for i in range(9)} for v in acc.values())
    missing = train(cache_dir, tmp_path / "other", "--set", "eval.hellaswag_limit=8")
    assert missing.returncode == 2 and "eval.hellaswag_path" in missing.stderr
    # Another file: refused before training starts, not eval_every steps in, as a traceback.
    lambada = data.with_name("lambada_openai_test.jsonl")
    wrong = train(cache_dir, tmp_path / "wrong", "--set", "eval.hellaswag_limit=8", "--set", f"eval.hellaswag_path={lambada}")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr
    assert "line 1: not a HellaSwag record" in wrong.stderr and not (tmp_path / "wrong" / "checkpoints").exists()


@pytest.mark.slow
def test_explicit_bf16_warns_in_one_line_only_on_a_cpu_without_bf16(cache_dir, tmp_path):
    proc = train(cache_dir, tmp_path / "run", "--set", "train.precision=bf16", "--set", "train.steps=1",
                 "--set", "train.eval_every=1")
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "train.precision=bf16 on a CPU without" in line]
    assert len(warned) == (0 if cpu_has_native_bf16() else 1), proc.stderr
    assert all(line.startswith("training: warning: ") for line in warned)
    assert "resolve_precision(" not in proc.stderr  # no source line under it
    # Emulated bf16 has no matmul peak worth the name (it measured ~1 GFLOP/s, and MFU came out > 100%).
    mfu = scalars(tmp_path / "run", "perf/mfu")
    if cpu_has_native_bf16():
        assert len(mfu) == 1 and 0 < mfu[1] < 1
    else:
        assert mfu == {} and "mfu n/a" in proc.stdout + proc.stderr, proc.stdout


@pytest.mark.slow
def test_two_rank_zero2_matches_one_rank_on_the_same_global_batch(cache_dir, tmp_path):
    common = ["--set", "train.precision=fp32", "--set", "deepspeed.zero_stage=2", "--set", "train.steps=4",
              "--set", "train.log_every=1", "--set", "train.eval_every=100"]
    one = train(cache_dir, tmp_path / "one", *common, "--set", "train.micro_batch_size=4")
    assert one.returncode == 0, one.stderr
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        two = train(cache_dir, tmp_path / "two", *common, "--set", "train.micro_batch_size=2",
                    launcher=deepspeed_launcher(), timeout=600)
    finally:
        del os.environ["OMP_NUM_THREADS"]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = scalars(tmp_path / "one", "train/loss"), scalars(tmp_path / "two", "train/loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    # Same global batch, gradients averaged over ranks: equal up to fp32 summation order.
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])
    assert max(scalars(tmp_path / "two", "moe/routing_bias_rank_spread").values()) == 0.0


@pytest.mark.slow
def test_expert_parallel_matches_data_parallel_through_the_trainer(cache_dir, tmp_path):
    """ep_size=2 shards the experts over the two ranks; the loss curve must equal ep_size=1's."""
    common = ["--set", "train.precision=fp32", "--set", "deepspeed.zero_stage=2", "--set", "train.steps=3",
              "--set", "train.log_every=1", "--set", "train.eval_every=3", "--set", "train.micro_batch_size=2"]
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        runs = {ep: train(cache_dir, tmp_path / f"ep{ep}", *common, "--set", f"deepspeed.ep_size={ep}",
                          launcher=deepspeed_launcher(), timeout=600) for ep in (1, 2)}
    finally:
        del os.environ["OMP_NUM_THREADS"]
    for ep, proc in runs.items():
        assert proc.returncode == 0, (ep, proc.stderr[-3000:])
    a, b = scalars(tmp_path / "ep1", "train/loss"), scalars(tmp_path / "ep2", "train/loss")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    # fp32 and only the order of the sums differs, but Newton-Schulz runs in bf16 on a CPU ("standard"): after the
    # first update the last-bit differences come back as bf16 roundings of Muon's update (3e-5 measured at step 3).
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-4)
    # The same gradients in two layouts: the raw norm counts every expert shard once in both.
    norm1, norm2 = scalars(tmp_path / "ep1", "train/grad_norm"), scalars(tmp_path / "ep2", "train/grad_norm")
    assert norm2[1] == pytest.approx(norm1[1], rel=1e-5)
    assert max(scalars(tmp_path / "ep2", "moe/routing_bias_rank_spread").values()) == 0.0
    # The run folder holds all experts, gathered from both ranks, and reloads as one model.
    model, _ = load_run_folder(tmp_path / "ep2")
    assert model.layers[1].ffn.experts.gate_up_proj.shape[0] == 8
