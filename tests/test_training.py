"""The training runtime end to end, as a user runs it: `python training/run.py` (one rank) and
`deepspeed --num_gpus 2 training/run.py` (two CPU ranks, marked slow), on tiny presets."""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import zoo
from training import checkpoints, trainer
from training.data import DataError
from training.distributed import set_cpu_threads
from training.ds_config import resolve_ds_config
from training.engine import initialize, unreported_grad_norm
from training.errors import TrainingError
from training.optim import lr_factor, optimizer_groups
from training.mfu import cpu_has_native_bf16
from zoo.host import usable_cpus
from zoo import presets
from zoo.checkpoint import load_run_folder
from zoo.presets import resolve
from zoo.overrides import with_changes

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "training" / "run.py")]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


@pytest.mark.parametrize("cores,ranks,threads", [(4, 1, 4), (4, 2, 2), (3, 2, 1), (1, 4, 1)])
def test_ranks_on_a_node_split_the_cores_this_process_may_use(monkeypatch, cores, ranks, threads):
    """os.cpu_count() counts every core of the machine; a container or `taskset` may allow fewer, and
    ranks that each took cpu_count // ranks threads oversubscribed them."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: chosen.append(n))
    chosen = []
    set_cpu_threads(ranks)
    assert chosen == [threads]
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # explicit: torch read it at start-up; left alone
    set_cpu_threads(ranks)
    assert chosen == [threads]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo_cache")


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


def test_train_end_to_end(cache_dir, tmp_path):
    from training import mfu as mfu_module
    from training.precision import DTYPES
    from zoo.describe import describe

    out = tmp_path / "run"
    proc = train(cache_dir, out, "--set", "train.steps=12", "--set", "train.eval_every=4", "--set", "train.ckpt_every=6",
                 "--set", "train.log_every=1", "--set", "train.micro_batch_size=4")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
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
                "val/ppl", "val/acc"):
        assert scalars(out, tag), f"{tag} not logged"
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


def test_resume_continues_exactly(cache_dir, tmp_path):
    common = ["--set", "train.precision=fp32", "--set", "train.log_every=1", "--set", "train.ckpt_every=3",
              "--set", "train.eval_every=100", "--set", "train.grad_accum=2"]
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
    assert scalars(straight, "lr/muon") == scalars(split, "lr/muon")


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


def test_lr_factor_shape():
    from zoo.overrides import with_changes

    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"train.steps": 100, "train.warmup_steps": 10, "train.min_lr_ratio": 0.1})
    assert lr_factor(0, spec) == pytest.approx(0.1) and lr_factor(9, spec) == pytest.approx(1.0)
    assert lr_factor(10, spec) == pytest.approx(1.0)
    assert lr_factor(55, spec) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, spec) == pytest.approx(0.1)


def test_optimizer_groups_put_routers_embeddings_and_norms_on_adam():
    import zoo

    spec = presets.get("deepseek_glm4", tiny=True)
    model = zoo.build(spec)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in optimizer_groups(model, spec)}
    named = dict(model.named_parameters())
    assert id(named["embed.weight"]) in groups["adam"]
    assert id(named["layers.1.ffn.router.weight"]) in groups["adam"]
    assert id(named["layers.1.ffn.experts.gate_up_proj"]) in groups["muon"]
    assert id(named["layers.0.attention.kv_b_proj.weight"]) in groups["muon"]
    assert id(named["layers.0.attention_norm.weight"]) in groups["adam_no_decay"]
    assert named["layers.1.ffn.experts.down_proj"].is_expert_group
    assert sum(len(g) for g in groups.values()) == len(named)


@pytest.fixture(scope="module")
def one_rank(one_thread):
    """The trainer's one-rank gloo group (training.distributed.init_distributed), for engines built in this process;
    yields the variables it sets (RANK, LOCAL_RANK, ...). They are set only while an engine runs: left
    in the environment, they would make later `training/run.py` subprocesses take themselves for launched ranks."""
    from training.distributed import init_distributed

    environ, threads, created = dict(os.environ), torch.get_num_threads(), not dist.is_initialized()
    if created:
        init_distributed()
    torch.set_num_threads(threads)  # init_distributed gives a lone rank every core
    launched = {k: v for k, v in os.environ.items() if environ.get(k) != v}
    os.environ.clear()
    os.environ.update(environ)
    yield launched
    if created:
        dist.destroy_process_group()


def _clip_spec(preset: str, stage: int, precision: str = "fp32", grad_clip: float = 1.0):
    return with_changes(presets.get(preset, tiny=True), {"deepspeed.zero_stage": stage, "train.precision": precision,
                                                         "train.grad_clip": grad_clip, "train.warmup_steps": 0})


def _batches(spec, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, spec.model.vocab_size, (2, 32), generator=g) for _ in range(n)]


def _train_in_process(spec, batches, launched: dict[str, str]):
    """The trainer's engine for `spec`, one optimizer step per batch: initial weights, final weights and
    the gradient norm DeepSpeed reports after each step."""
    torch.manual_seed(0)
    model = zoo.build(spec)
    initial = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    groups = optimizer_groups(model, spec)
    for group in groups:
        if group["use_muon"]:
            # Newton-Schulz's "gram" variant runs in fp32 on a CPU (DeepSpeed's ns_compute_dtype), "standard" in
            # bf16, which loses a scaled input's last bits: with it, clipped runs agree only to ~5%.
            group["ns_method"] = "gram"
    norms = []
    with pytest.MonkeyPatch.context() as env:
        for key, value in launched.items():
            env.setenv(key, value)
        engine, _, _ = initialize(model, spec, groups, resolve_ds_config(spec, None, 1))
        for batch in batches:
            out = engine(batch, labels=batch)
            engine.backward(out.loss)
            own = unreported_grad_norm(engine, spec.deepspeed.ep_size)  # ZeRO-0 in fp32: DeepSpeed reports none
            engine.step()
            norms.append(engine.get_global_grad_norm() if own is None else own)
    return initial, {n: p.detach().float() for n, p in engine.module.named_parameters()}, norms


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (1, "bf16"), (2, "bf16")])
def test_reported_grad_norm_is_the_raw_gradient_norm(one_rank, stage, precision):
    spec = _clip_spec("deepseek_glm4", stage, precision)
    (batch,) = _batches(spec, 1)
    torch.manual_seed(0)
    reference = zoo.build(spec)
    reference(batch, labels=batch).loss.backward()
    raw = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()])).item()
    _, _, norms = _train_in_process(spec, [batch], one_rank)
    # DeepSpeed took the norm after Newton-Schulz: ~40 here, the orthogonalised updates' norm. fp32 differs
    # from the reference in summation order only; bf16 in its forward pass (8 mantissa bits, ~0.4%).
    assert float(norms[0]) == pytest.approx(raw, rel=1e-5 if precision == "fp32" else 2e-2)


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")  # DeepSpeed's ZeRO-3 calls renamed c10d ops
@pytest.mark.parametrize("preset,stage", [("deepseek_glm4", 1), ("deepseek_glm4", 2), ("dense", 3)])
def test_zero_stages_clip_before_newton_schulz_like_zero0(one_rank, preset, stage):
    """Without a ZeRO optimizer DeepSpeed clips the raw gradients and MuonWithAuxAdam then orthogonalises them;
    ZeRO 1-3 must take the same steps. grad_clip is below every step's gradient norm (~1.8 here), so the
    clip acts at each step, and through Muon's momentum on the later steps' directions (without it the
    Muon weights end ~1e-2 away; with the old order, which clipped the updates, several times smaller)."""
    reference = _clip_spec(preset, 0, grad_clip=0.3)
    batches = _batches(reference, 3)
    initial, expected, _ = _train_in_process(reference, batches, one_rank)
    _, got, norms = _train_in_process(_clip_spec(preset, stage, grad_clip=0.3), batches, one_rank)
    for name in initial:
        # The same fp32 arithmetic but for the clip coefficient's last bits (measured 1e-5 relative).
        torch.testing.assert_close(got[name] - initial[name], expected[name] - initial[name], rtol=1e-3, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    assert min(float(n) for n in norms) > 0.3


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["preset", "path", "empty", "seq_len", "fp16", "resume", "ds_config", "ds_precision",
                                  "ds_not_object", "ds_bf16_bool", "ds_zero_int", "ds_bad_value", "ds_spec_path",
                                  "stop_after_zero", "stop_after_past", "hellaswag_too_long"])
def test_bad_input_is_one_line(cache_dir, tmp_path, case):
    out = tmp_path / "run"
    args, words = {
        "preset": (["--preset", "nope"], ["unknown preset 'nope'"]),
        "path": (["--set", "data.source=/no/such/file.txt"], ["/no/such/file.txt"]),
        "empty": (["--set", f"data.source={_write(tmp_path / 'empty.txt', '')}"], ["empty"]),
        "seq_len": (["--set", "data.seq_len=4096"], ["data.seq_len (4096)", "max_seq_len"]),
        "fp16": (["--set", "train.precision=fp16"], ["fp16", "CPU"]),
        "resume": (["--resume"], ["--resume", "no complete checkpoint"]),
        "ds_config": (["--ds-config", str(_write(tmp_path / "c.json", '{"gradient_clipping": 5.0}'))],
                      ["gradient_clipping=5.0", "train.grad_clip=1.0"]),
        "ds_precision": (["--set", "train.precision=fp32", "--ds-config",
                          str(_write(tmp_path / "p.json", '{"bf16": {"enabled": true}}'))],
                         ["enabled=True", "train.precision='fp32', so bf16.enabled=False"]),
        "ds_not_object": (["--ds-config", str(_write(tmp_path / "l.json", "[1, 2]"))], ["l.json", "JSON list", "object"]),
        "ds_bf16_bool": (["--ds-config", str(_write(tmp_path / "b.json", '{"bf16": true}'))],
                         ["b.json", '"bf16": true', "must be an object"]),
        "ds_zero_int": (["--ds-config", str(_write(tmp_path / "z.json", '{"zero_optimization": 2}'))],
                        ["z.json", '"zero_optimization": 2', "must be an object"]),
        "ds_bad_value": (["--set", "train.steps=1", "--ds-config",
                          str(_write(tmp_path / "v.json", '{"zero_optimization": {"reduce_bucket_size": "lots"}}'))],
                         ["v.json", "zero_optimization.reduce_bucket_size='lots'", "valid integer"]),
        "ds_spec_path": (["--set", "deepspeed.config=/nope.json"], ["deepspeed.config=/nope.json does not exist"]),
        "stop_after_zero": (["--stop-after", "0"], ["--stop-after 0", "train.steps=2"]),
        "stop_after_past": (["--stop-after", "3"], ["--stop-after 3", "train.steps=2"]),
        # Found before step 1: it used to stop the run at its first evaluation, before that step's checkpoint.
        "hellaswag_too_long": (["--set", "data.seq_len=64", "--set", "eval.hellaswag_limit=50", "--set",
                                f"eval.hellaswag_path={ROOT.parent / 'shared' / 'data' / 'hellaswag_val.jsonl'}"],
                               ["eval.hellaswag_limit=50", "longer than 64 tokens", "raise data.seq_len and model.max_seq_len to >="]),
    }[case]
    proc = train(cache_dir, out, *args)
    assert proc.returncode == 2, proc.stderr
    assert "step 1/" not in proc.stdout and not (out / "checkpoints").exists(), proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len([l for l in lines if "error" in l]) == 1, proc.stderr
    for word in words:
        assert word.lower() in proc.stderr.lower(), proc.stderr


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
    assert checkpoints.latest_tag(run) == "step_0000001"
    engine.crash = True
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(engine, run, 2, {}, keep_last=3)
    assert (run / "checkpoints" / "step_0000002").is_dir()
    assert checkpoints.latest_tag(run) == "step_0000001"
    (run / "checkpoints" / "latest").unlink()  # lost: the newest complete folder, not the half-written one
    assert checkpoints.latest_tag(run) == "step_0000001"
    shutil.rmtree(run / "checkpoints" / "step_0000001")
    assert checkpoints.latest_tag(run) is None and checkpoints.incomplete_tags(run) == ["step_0000002"]
    # Neither a fresh run nor a resume can use the half-written folder: --resume says so, a fresh run
    # is allowed (the trainer removes the folder first, so its saves cannot mix with it).
    (run / "spec.json").write_text(presets.get("deepseek_glm4", tiny=True).model_dump_json())
    with pytest.raises(TrainingError, match=r"\(step_0000002 never finished saving\); start it without --resume"):
        trainer.resolve_run(trainer.parse_args(["--out", str(run), "--resume"]))
    trainer.resolve_run(trainer.parse_args(["--tiny", "--out", str(run)]))
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
    assert checkpoints.latest_tag(run) == "step_0000001"


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
    assert checkpoints.latest_tag(run) == "step_0000005"


def test_a_load_failure_is_agreed_across_ranks_and_said_once():
    assert checkpoints.agreed_failure([None, None]) == ""
    assert checkpoints.agreed_failure(["EOFError: x", "EOFError: x"]) == "EOFError: x"  # a file every rank reads
    assert checkpoints.agreed_failure([None, "FileNotFoundError: shard"]) == "rank 1: FileNotFoundError: shard"


def test_resume_with_more_steps_says_how_the_lr_moves(tmp_path, capsys):
    run = tmp_path / "run"
    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"train.steps": 100, "train.warmup_steps": 10})
    (run / "checkpoints" / "step_0000100").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_0000100")
    (run / "spec.json").write_text(spec.model_dump_json())
    checkpoints.write_split_version(run)  # as the trainer writes it: this zoo's split
    extended, _, start = trainer.resolve_run(trainer.parse_args(["--out", str(run), "--resume",
                                                                 "--set", "train.steps=300"]))
    assert start == 100 and extended.train.steps == 300
    before, after = lr_factor(99, spec), lr_factor(100, extended)
    assert after > 5 * before  # the cosine restarts high: worth a line
    assert f"factor goes from {before:.3f} (step 100) to {after:.3f} (step 101)" in capsys.readouterr().out


def test_fp16_giving_up_on_the_loss_scale_is_a_one_line_stop():
    class Engine:
        def step(self):
            raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")

    with pytest.raises(trainer.NonFiniteLoss, match="overflow at step 7 even at the smallest loss scale"):
        trainer._step(Engine(), 7)


def test_nan_loss_stops_naming_the_step(cache_dir, tmp_path):
    # Weights drawn at std 1e38 overflow fp32, so the very first forward pass is NaN.
    proc = train(cache_dir, tmp_path / "run", "--set", "model.init_std=1e38", "--set", "train.precision=fp32",
                 "--set", "train.steps=3")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "loss is nan at step 1" in proc.stderr


@pytest.mark.parametrize("stage", [1, 0])
def test_diverged_gradients_stop_naming_the_step(cache_dir, tmp_path, stage):
    """A 1e38 learning rate overflows the weights after one step. ZeRO-0 in fp32 reports no gradient
    norm: there the trainer takes it before the update, which used to be applied and checkpointed."""
    out = tmp_path / "run"
    proc = train(cache_dir, out, "--set", "train.adam_lr=1e38", "--set", "train.muon_lr=1e38",
                 "--set", "train.warmup_steps=0", "--set", "train.precision=fp32", "--set", "train.steps=3",
                 "--set", f"deepspeed.zero_stage={stage}", "--set", "train.ckpt_every=1")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "gradient norm is" in proc.stderr and "at step 2" in proc.stderr
    assert checkpoints.latest_tag(out) == "step_0000001" and "step_0000001" in proc.stderr
    model, _ = load_run_folder(out)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_launcher() -> list[str]:
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(_free_port()), str(ROOT / "training" / "run.py")]


@pytest.mark.slow
def test_two_rank_zero2_matches_one_rank_on_the_same_global_batch(cache_dir, tmp_path):
    common = ["--set", "train.precision=fp32", "--set", "deepspeed.zero_stage=2", "--set", "train.steps=4",
              "--set", "train.log_every=1", "--set", "train.eval_every=100"]
    one = train(cache_dir, tmp_path / "one", *common, "--set", "train.micro_batch_size=4")
    assert one.returncode == 0, one.stderr
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        two = train(cache_dir, tmp_path / "two", *common, "--set", "train.micro_batch_size=2",
                    launcher=_deepspeed_launcher(), timeout=600)
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
                          launcher=_deepspeed_launcher(), timeout=600) for ep in (1, 2)}
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


def test_resume_across_a_new_split_version_is_refused_before_the_data(tmp_path):
    """The split version is read from the run folder by resolve_run, before the data is prepared: a new
    split trains another tokenizer, and build() would blame that on the corpus. A run folder without
    split.json (started before versions) is version 1."""
    run = tmp_path / "run"
    (run / checkpoints.CHECKPOINTS / "step_0000002").mkdir(parents=True)
    _write(run / "spec.json", resolve("dense", ["train.steps=3"], tiny=True).model_dump_json())
    _write(run / checkpoints.CHECKPOINTS / "step_0000002" / checkpoints.COMPLETE, "step_0000002\n")
    _write(run / checkpoints.CHECKPOINTS / checkpoints.LATEST, "step_0000002")
    args = trainer.parse_args(["--out", str(run), "--resume"])
    with pytest.raises(DataError, match=r"split changed since the run started \(split version 1 -> 2\)"):
        trainer.resolve_run(args)
    checkpoints.write_split_version(run)
    assert checkpoints.read_split_version(run) == 2 and trainer.resolve_run(args)[2] == 2


def test_resume_refuses_what_it_cannot_continue_and_keeps_its_ds_config(cache_dir, tmp_path):
    out = tmp_path / "run"
    custom = _write(tmp_path / "custom.json", '{"zero_optimization": {"stage": "auto", "reduce_bucket_size": 123456}}')
    common = ["--set", "train.eval_every=100", "--set", "train.precision=fp32"]
    first = train(cache_dir, out, "--set", "train.steps=3", "--stop-after", "2", "--ds-config", str(custom), *common)
    assert first.returncode == 0, first.stderr
    spec_json = (out / "spec.json").read_text()

    def refused(*args, words):
        # In process where the refusal comes from resolve_run (before anything starts): the one-line
        # printing is main's, checked through a subprocess by the last case and test_bad_input_is_one_line.
        with pytest.raises(TrainingError) as caught:
            trainer.resolve_run(trainer.parse_args(["--out", str(out), "--resume", *args]))
        for word in words:
            assert word in str(caught.value)

    refused("--stop-after", "2", words=["--stop-after 2", "(step 2)"])  # was silently ignored
    refused("--set", "train.steps=1", words=["checkpoint is at step 2", "train.steps=1"])  # printed "-1 this run"
    refused("--preset", "dense", words=["drop --preset"])  # was silently ignored
    refused("--tiny", words=["drop --tiny"])
    # The validation set: val/loss after the resume would be scored on other tokens, on the same curve.
    refused("--set", "eval.val_blocks=1", words=["cannot change eval.val_blocks"])
    proc = train(cache_dir, out, "--resume", "--ds-config", str(ROOT / "ds_configs" / "zero1_fp32.json"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "differs" in proc.stderr and "zero_optimization" in proc.stderr
    assert (out / "spec.json").read_text() == spec_json
    # HellaSwag endings longer than the run's 64 tokens: a resumed run cannot raise data.seq_len, so the
    # message offers only a lower eval.hellaswag_limit.
    hellaswag = ROOT.parent / "shared" / "data" / "hellaswag_val.jsonl"
    proc = train(cache_dir, out, "--resume", "--set", "eval.hellaswag_limit=50", "--set", f"eval.hellaswag_path={hellaswag}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "set eval.hellaswag_limit <= 8" in proc.stderr and "data.seq_len" not in proc.stderr, proc.stderr
    # Without --ds-config the run resumes with the one it started with, not the shipped default.
    second = train(cache_dir, out, "--resume")
    assert second.returncode == 0, second.stderr
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["reduce_bucket_size"] == 123456
    events = sorted(out.glob("events.out.tfevents.*"))
    finished = train(cache_dir, out, "--resume")
    assert finished.returncode == 0, finished.stderr
    assert "already finished" in finished.stdout and "nan" not in finished.stdout
    assert sorted(out.glob("events.out.tfevents.*")) == events  # no hparam/val_loss=nan written


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
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
               "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-c", AGREED_SIGNAL, str(signum)], env={**env, "RANK": str(rank)},
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank, signum in enumerate(signums)]
        results = [proc.communicate(timeout=120) for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), results
        assert [out.strip().splitlines()[-1] for out, _ in results] == ["15", "15"], (signums, results)


def test_an_explicit_omp_num_threads_is_kept(monkeypatch):
    """A plain `python training/run.py` (one rank) took every core even with OMP_NUM_THREADS=1."""
    import deepspeed

    from training.distributed import init_distributed

    environ, threads = dict(os.environ), torch.get_num_threads()
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)  # 8 usable cores
    try:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(key, None)
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)  # what torch took from OMP_NUM_THREADS at start-up
        init_distributed()
        assert torch.get_num_threads() == 1
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
            os.environ.pop(key)
        init_distributed()
        assert torch.get_num_threads() == 8  # unset: a lone rank gets every core
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)


def test_checkpoints_carry_the_cuda_generators_when_there_are_some(monkeypatch):
    from training.trainer import _restore_rng, _rng_state

    state = _rng_state()
    assert (state["cuda_rng"] is None) == (not torch.cuda.is_available())  # a CPU: recorded as absent
    expected = torch.rand(3)
    _restore_rng({"torch_rng": state["torch_rng"]})  # a checkpoint from before the field existed
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


@pytest.mark.parametrize("changes,world_size,words", [
    ({"deepspeed.zero_stage": 3}, 1, "zero_stage=3 serves dense presets only"),
    ({"deepspeed.ep_size": 2}, 3, "ep_size=2 must divide the number of ranks (3)"),
    ({"deepspeed.ep_size": 3}, 3, "must divide every MoE layer's n_experts"),
])
def test_layouts_deepspeed_cannot_train_are_refused_before_it_starts(changes, world_size, words):
    spec = with_changes(presets.get("deepseek_glm4", tiny=True), changes)
    with pytest.raises(TrainingError, match=re.escape(words)):
        trainer._check_layout(spec, world_size)
    trainer._check_layout(with_changes(presets.get("dense", tiny=True), {"deepspeed.zero_stage": 3}), 1)


class _Engine:
    """What trainer.evaluate uses of a DeepSpeed engine: `module`, and calling it runs the module's forward."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _partly_predictable_batch(model, rows: int, length: int, generator) -> torch.Tensor:
    """Random tokens, but every other position holds the model's own argmax for it given the tokens before
    (causal: setting token t + 1 leaves the prediction at t as it was). An untrained model's accuracy on
    random tokens is ~1/V, where a misaligned accuracy would go unseen."""
    vocab = model.lm_head.weight.shape[0]
    batch = torch.randint(0, vocab, (rows, length), generator=generator)
    with torch.no_grad():
        for t in range(1, length, 2):
            batch[:, t] = model(batch[:, :t]).logits[:, -1].argmax(-1)
    return batch


def test_evaluate_is_token_weighted_cross_entropy_and_next_token_accuracy():
    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"train.precision": "fp32"})
    model = zoo.build(spec)
    g = torch.Generator().manual_seed(3)
    # Two batches of different sizes (3 x 24 and 1 x 16 tokens): a mean of per-batch means would weigh
    # the second batch's 15 targets like the first one's 69.
    batches = [_partly_predictable_batch(model, 3, 24, g), _partly_predictable_batch(model, 1, 16, g)]
    got = trainer.evaluate(_Engine(model), batches, torch.device("cpu"))
    assert model.training, "evaluate hands the model back in training mode"

    model.eval()
    nll, correct, wrong_alignment, count = 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch).logits  # (B, T, V): position t predicts token t + 1
            targets = batch[:, 1:]
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum")
            correct += (logits[:, :-1].argmax(-1) == targets).sum().item()
            wrong_alignment += (logits[:, 1:].argmax(-1) == targets).sum().item()
            count += targets.numel()
    loss = nll.item() / count
    # fp32 throughout; the model's mean and this sum differ in summation order only (~1e-7 relative).
    assert got["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert got["val/ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert got["val/acc"] == correct / count
    # At least the 3 * 12 + 1 * 8 planted predictions are right; logits[:, 1:] (an untrained model with tied
    # embeddings mostly predicts the token it reads) scores otherwise, so a misaligned evaluate fails above.
    assert correct >= 44 and wrong_alignment != correct


def test_observer_logs_expert_loads_max_vio_entropy_and_bias_norm(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.observe import Observer
    from zoo.blocks.moe import RouterStats

    def stats(entropy):
        return RouterStats(load_E=torch.zeros(1), max_vio=torch.tensor(-1.0), entropy=torch.tensor(entropy),
                           aux_loss=torch.tensor(0.0))

    # Layer 1: a sigmoid router with a bias; layer 3: a softmax router, none. Loads summed over a step.
    loads = {1: torch.tensor([6.0, 2.0, 0.0, 4.0]), 3: torch.tensor([5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 9.0])}
    observer = Observer(tmp_path, total_steps=10, start_step=0, enabled=True)
    observer.routers(7, {1: stats(1.25), 3: stats(2.0)}, loads, {1: torch.tensor([0.003, -0.004, 0.0, 0.0])})
    observer.close()

    # MaxVio (Wang et al. 2024, arXiv:2408.15664, the loss-free balancing paper): max load / mean load - 1.
    expected = {
        "moe/layer_1/max_vio": 6 / 3 - 1, "moe/layer_3/max_vio": 9 / 5.5 - 1,
        "moe/layer_1/router_entropy": 1.25, "moe/layer_3/router_entropy": 2.0,
        "moe/layer_1/routing_bias_norm": 0.005,
        **{f"moe_load/layer_1/expert_{e}": share for e, share in enumerate([0.5, 1 / 6, 0.0, 1 / 3])},
        **{f"moe_load/layer_3/expert_{e}": 5 / 44 for e in range(7)}, "moe_load/layer_3/expert_7": 9 / 44,
    }
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected), "no other scalars; no bias norm for the softmax router"
    for tag, value in expected.items():
        (event,) = events.Scalars(tag)
        assert event.step == 7 and event.value == pytest.approx(value, rel=1e-6, abs=1e-7), tag  # float32
    histogram = events.Histograms("moe/layer_1/expert_share")[0].histogram_value
    assert (histogram.num, histogram.min, histogram.max) == (4, 0.0, 0.5)
    assert histogram.sum == pytest.approx(1.0) and histogram.sum_squares == pytest.approx(0.25 + 1 / 36 + 1 / 9)


def test_routing_biases_move_on_the_loads_of_the_whole_accumulation_window(one_rank, cache_dir, tmp_path, monkeypatch):
    """README: the biases move once per optimizer step, on expert loads summed over the accumulation
    window. The trainer's loop, in this process, for one step of two micro-batches: the loads it hands to
    update_routing_biases are the sum of the two forwards' loads, and the bias moves by
    bias_update_rate * sign(mean load - load) of that sum (DeepSeek-V3's auxiliary-loss-free rule)."""
    from zoo.blocks.model import DecoderLM

    micro_loads, updates = [], []
    forward, update = DecoderLM.forward, DecoderLM.update_routing_biases

    def recording_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:  # not the validation at the end
            micro_loads.append({i: s.load_E.detach().clone() for i, s in out.router_stats.items()})
        return out

    def recording_update(self, loads):
        routers = {i: m.router for i, m in self.moe_layers().items()}
        before = {i: r.e_score_correction_bias.clone() for i, r in routers.items()}
        update(self, loads)
        updates.append(({i: load.clone() for i, load in loads.items()}, before,
                        {i: r.e_score_correction_bias.clone() for i, r in routers.items()}, routers))

    monkeypatch.setattr(DecoderLM, "forward", recording_forward)
    monkeypatch.setattr(DecoderLM, "update_routing_biases", recording_update)
    monkeypatch.setattr(trainer, "_save", lambda *args: None)  # checkpoints are tested elsewhere
    monkeypatch.setattr(trainer, "peak_flops", lambda dtype, device: math.nan)  # no MFU: no peak to measure
    for key, value in {**one_rank, "ZOO_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)  # OMP_NUM_THREADS: init_distributed leaves the thread count alone
    handlers = {sig: signal.getsignal(sig) for sig in trainer.StopFlag.SIGNALS}
    try:
        args = trainer.parse_args(["--tiny", "--out", str(tmp_path / "run"), "--set", "train.steps=1",
                                   "--set", "train.grad_accum=2", "--set", "train.precision=fp32"])
        assert trainer.train(args) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    assert len(micro_loads) == 2 and len(updates) == 1
    loads, before, after, routers = updates[0]
    assert sorted(loads) == sorted(routers) == sorted(micro_loads[0]) and loads  # sigmoid routers, every MoE layer
    last_alone_differs = False
    for i, router in routers.items():
        summed = micro_loads[0][i] + micro_loads[1][i]  # integer counts in float32: exact
        torch.testing.assert_close(loads[i], summed, rtol=0, atol=0)
        step = router.bias_update_rate * torch.sign(summed.mean() - summed)
        torch.testing.assert_close(after[i], before[i] + step, rtol=0, atol=1e-9)
        last = micro_loads[1][i]
        last_alone_differs |= not torch.equal(torch.sign(summed.mean() - summed), torch.sign(last.mean() - last))
    assert last_alone_differs, "the last micro-batch alone moves the biases alike here: the check could not fail"


def test_an_fp16_overflow_skips_the_step_and_leaves_the_routing_biases(one_rank, cache_dir, tmp_path, monkeypatch):
    """When fp16's loss scaler finds an overflowed gradient, DeepSpeed skips the update (was_step_applied()
    is False) and counts it in engine.skipped_steps. The weights did not move, so the trainer's loop must
    leave the routers' auxiliary-loss-free biases as they were, and it logs train/skipped_steps.

    fp16 is refused on a CPU, so this run's spec says fp16 while DeepSpeed trains it in fp32 under ZeRO-1,
    and step 2's gradients are made inf: ZeRO's optimizer then takes the branch its fp16 loss scaler
    takes on an overflow (no update, gradients zeroed, `overflow` set, which the engine turns into
    skipped_steps += 1 and was_step_applied() False). Everything else is the trainer's own loop, in this
    process; what is checked is what it leaves behind: the biases and weights each forward sees, and
    the TensorBoard scalars."""
    import deepspeed

    from training import precision
    from training.mfu import cpu_peak_cache_key

    overflow_step, steps = 2, 3
    real_resolve, real_initialize = precision.resolve_precision, deepspeed.initialize

    def resolve_without_the_cpu_refusal(spec, device):
        return spec if spec.train.precision == "fp16" else real_resolve(spec, device)

    # Replaced in every training module that imported it by name: the test holds wherever the loop moves.
    holders = [m for name, m in list(sys.modules.items())
               if name.split(".")[0] == "training" and getattr(m, "resolve_precision", None) is real_resolve]
    assert holders
    for module in holders:
        monkeypatch.setattr(module, "resolve_precision", resolve_without_the_cpu_refusal)

    seen = []  # (training?, routing biases, a weight) as each forward starts
    inf_grad = []  # the hook that overflows step 2's gradients, while it is registered

    def before_forward(model, args):
        biases = {i: m.router.e_score_correction_bias.clone() for i, m in model.moe_layers().items()}
        weight = model.embed.weight
        seen.append((model.training, biases, weight.detach().clone()))
        while inf_grad:
            inf_grad.pop().remove()
        if model.training and sum(training for training, _, _ in seen) == overflow_step:
            inf_grad.append(weight.register_hook(lambda grad: torch.full_like(grad, math.inf)))

    def initialize_in_fp32(**kwargs):
        config = kwargs["config"]
        assert config["fp16"]["enabled"], "the trainer asked DeepSpeed for fp16"
        kwargs["config"] = {**config, "fp16": {**config["fp16"], "enabled": False}}
        kwargs["model"].register_forward_pre_hook(before_forward)
        return real_initialize(**kwargs)

    monkeypatch.setattr(deepspeed, "initialize", initialize_in_fp32)
    # The fp16 peak MFU divides by, as if measured and cached: measuring would time fp16 matmuls on a CPU,
    # the slow path the refusal is about.
    peaks = cache_dir / "matmul_peak.json"
    cached = json.loads(peaks.read_text()) if peaks.is_file() else {}
    peaks.write_text(json.dumps({**cached, cpu_peak_cache_key(torch.float16): 1e15}))
    for key, value in {**one_rank, "ZOO_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)  # OMP_NUM_THREADS: init_distributed leaves the thread count alone
    handlers = {sig: signal.getsignal(sig) for sig in trainer.StopFlag.SIGNALS}
    out = tmp_path / "run"
    try:
        args = trainer.parse_args(["--tiny", "--out", str(out), "--set", f"train.steps={steps}",
                                   "--set", "train.precision=fp16", "--set", "deepspeed.zero_stage=1",
                                   "--set", "train.log_every=1", "--set", f"train.eval_every={steps}",
                                   "--set", "eval.val_blocks=1"])
        assert trainer.train(args) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    assert [training for training, _, _ in seen] == [True] * steps + [False]  # then one validation batch
    biases, weights = [b for _, b, _ in seen], [w for _, _, w in seen]  # before steps 1..3, after step 3
    assert biases[0] and all(len(b) == len(biases[0]) for b in biases)  # the preset has sigmoid routers
    for step in range(1, steps + 1):
        before, after = step - 1, step
        if step == overflow_step:
            assert torch.equal(weights[after], weights[before]), "DeepSpeed applied the overflowed step"
            for i in biases[before]:
                torch.testing.assert_close(biases[after][i], biases[before][i], rtol=0, atol=0,
                                           msg=f"layer {i}'s routing bias moved on the skipped step {step}")
        else:
            assert not torch.equal(weights[after], weights[before]), f"step {step} was not applied"
            assert all(not torch.equal(biases[after][i], biases[before][i]) for i in biases[before]), step
    assert scalars(out, "train/skipped_steps") == {1: 0, 2: 1, 3: 1}
    assert math.isinf(scalars(out, "train/grad_norm")[overflow_step])  # DeepSpeed's report of an overflow
