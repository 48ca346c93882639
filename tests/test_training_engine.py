"""The DeepSpeed engine in this process: CPU threads per rank, optimizer groups, the LR schedule, and
gradient clipping before Newton-Schulz under every ZeRO stage."""

import os

import pytest
import torch

import zoo
from training.distributed import set_cpu_threads
from training.ds_config import resolve_ds_config
from training.engine import initialize, unreported_grad_norm
from training.optim import lr_factor, optimizer_groups
from zoo import presets
from zoo.overrides import with_changes

from _training import one_rank  # noqa: F401  (fixtures)


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


def test_an_explicit_omp_num_threads_is_kept(monkeypatch):
    """A plain `python training/run.py` (one rank) keeps OMP_NUM_THREADS=1 rather than taking every core."""
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


def test_adamw_puts_every_parameter_on_adam_at_its_lr():
    from zoo.overrides import with_changes

    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"train.optimizer": "adamw", "train.adam_lr": 1e-3})
    model = zoo.build(spec)
    groups = optimizer_groups(model, spec)
    assert [g["name"] for g in groups] == ["adam", "adam_no_decay"]
    assert all(not g["use_muon"] and g["lr"] == 1e-3 for g in groups)
    assert not any(p.use_muon for p in model.parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_muon_experts_false_puts_the_expert_stacks_on_adamw():
    from zoo.overrides import with_changes

    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"train.muon_experts": False})
    model = zoo.build(spec)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in optimizer_groups(model, spec)}
    named = dict(model.named_parameters())
    assert id(named["layers.1.ffn.experts.gate_up_proj"]) in groups["adam"]
    assert id(named["layers.1.ffn.experts.down_proj"]) in groups["adam"]
    assert id(named["layers.0.attention.kv_b_proj.weight"]) in groups["muon"]  # other matrices stay on Muon
    assert all(p.ndim == 2 for p in model.parameters() if p.use_muon)


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
    Muon weights end ~1e-2 away; clipping the orthogonalised updates instead shrinks them several times)."""
    reference = _clip_spec(preset, 0, grad_clip=0.3)
    batches = _batches(reference, 3)
    initial, expected, _ = _train_in_process(reference, batches, one_rank)
    _, got, norms = _train_in_process(_clip_spec(preset, stage, grad_clip=0.3), batches, one_rank)
    for name in initial:
        # The same fp32 arithmetic but for the clip coefficient's last bits (measured 1e-5 relative).
        torch.testing.assert_close(got[name] - initial[name], expected[name] - initial[name], rtol=1e-3, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    assert min(float(n) for n in norms) > 0.3
