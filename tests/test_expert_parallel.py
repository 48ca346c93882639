"""Expert parallelism: the all-to-all dispatcher equals the local one, and ep_size=2 trains like ep_size=1.

Multi-rank tests launch tests/_ep_worker.py on 2 CPU ranks (torchrun, gloo) and assert on the JSON
it writes. Tolerances, fp32: ep_size=2 does the same arithmetic as ep_size=1 except that each expert's
matmul sees a different number of rows (BLAS blocking) and expert gradients are reduced over a
different group, i.e. rounding-order differences of ~1 ulp (6e-8 relative) per op. Observed after
3 steps: loss <= 5e-7, weights <= 8e-7 (weights ~0.1). A real fault (a row sent to the wrong rank, a
missing expert, a wrong gradient divisor) moves the loss by > 1e-3, so 1e-5 separates the two.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import zoo
from training.expert_parallel import (
    check_ds_config,
    enable_expert_parallel,
    expert_parallel_dispatch,
    moe_param_groups,
)
from zoo import presets
from zoo.blocks.moe import GroupedExperts, dropless_dispatch

WORKER = Path(__file__).with_name("_ep_worker.py")
FP32_TOL = 1e-5
LAUNCH_TIMEOUT_S = 300


def _launch(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "DS_ACCELERATOR": "cpu"}
    # --standalone: a private rendezvous on a free port, so concurrent test runs cannot collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), *args, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if not out.exists():
        pytest.fail(f"worker wrote no result (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-process gloo group: the dispatcher's collectives over a group of one."""
    created = not dist.is_initialized()
    if created:
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


def _dispatch_pair(T, K, E, D=16, F=24):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=g)
    gate_up, down = torch.randn(E, 2 * F, D, generator=g) * 0.2, torch.randn(E, D, F, generator=g) * 0.2
    weights = torch.rand(T, K, generator=g)
    experts = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K)
    return x, weights, experts.long(), gate_up, down  # expert E-1 never chosen: an idle expert


def test_all_to_all_dispatch_on_one_rank_equals_dropless_dispatch(one_rank_group):
    x, weights, experts, gate_up, down = _dispatch_pair(T=29, K=2, E=6)
    ref_leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
    ep_leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
    y_ref, counts_ref = dropless_dispatch(ref_leaves[0], ref_leaves[1], experts, *ref_leaves[2:])
    y, counts = expert_parallel_dispatch(ep_leaves[0], ep_leaves[1], experts, *ep_leaves[2:], group=one_rank_group)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    # Same rows through the same per-expert matmuls in the same order: equal to fp32 rounding.
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(counts, counts_ref) and counts[-1] == 0
    for ep_leaf, ref_leaf in zip(ep_leaves, ref_leaves):
        torch.testing.assert_close(ep_leaf.grad, ref_leaf.grad, rtol=1e-6, atol=1e-6)


def test_dispatch_with_no_tokens_keeps_experts_in_the_graph(one_rank_group):
    """A rank receiving no row must still run the backward all-to-alls its peers wait on."""
    x, weights, experts, gate_up, down = _dispatch_pair(T=0, K=2, E=4)
    leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
    y, counts = expert_parallel_dispatch(leaves[0], leaves[1], experts, *leaves[2:], group=one_rank_group)
    assert y.shape == (0, 16) and counts.tolist() == [0, 0, 0, 0]
    y.sum().backward()
    assert torch.equal(leaves[2].grad, torch.zeros_like(gate_up))
    assert torch.equal(leaves[3].grad, torch.zeros_like(down))


def test_ep_size_must_divide_n_experts():
    model = zoo.build(presets.get("deepseek_glm4", tiny=True))  # 8 experts
    with pytest.raises(ValueError, match=r"ep_size \(3\) must divide n_experts \(8\)"):
        enable_expert_parallel(model, 3)
    with pytest.raises(ValueError, match="positive integer"):
        enable_expert_parallel(model, 0)


def test_ep_size_one_changes_nothing():
    model = zoo.build(presets.get("baseline", tiny=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enable_expert_parallel(model, 1)
    assert all(type(m) is GroupedExperts for m in model.modules() if isinstance(m, GroupedExperts))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ep_size_on_a_dense_model_is_refused():
    with pytest.raises(ValueError, match="no MoE layer"):
        enable_expert_parallel(zoo.build(presets.get("dense", tiny=True)), 2)


def test_moe_param_groups_keep_group_settings():
    dense, router = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(8, 4))
    expert = torch.nn.Parameter(torch.zeros(2, 4, 4))
    expert.allreduce, expert.group_name = False, "ep_size_2"
    only_experts = torch.nn.Parameter(torch.zeros(2, 4, 4))
    only_experts.allreduce, only_experts.group_name = False, "ep_size_2"
    groups = [
        dict(name="muon", params=[dense, expert], use_muon=True, lr=0.02, momentum=0.95, weight_decay=0.1),
        dict(name="adam", params=[router], use_muon=False, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0),
        dict(name="muon_experts_only", params=[only_experts], use_muon=True, lr=0.01, momentum=0.9, weight_decay=0.0),
    ]
    split = moe_param_groups(groups)
    assert [g["name"] for g in split] == ["muon", "adam", "ep_size_2", "ep_size_2"]  # the empty group dropped
    muon_experts = next(g for g in split if g.get("source_name") == "muon")
    assert muon_experts["params"] == [expert] and muon_experts["moe"] is True
    assert {k: muon_experts[k] for k in ("use_muon", "lr", "momentum", "weight_decay")} == {
        "use_muon": True, "lr": 0.02, "momentum": 0.95, "weight_decay": 0.1}
    assert next(g for g in split if g.get("source_name") == "muon_experts_only")["lr"] == 0.01
    assert split[0]["params"] == [dense] and split[1]["betas"] == (0.9, 0.95)
    assert groups[0]["params"] == [dense, expert]  # inputs untouched
    with pytest.raises(ValueError, match="unique 'name'"):
        moe_param_groups([dict(params=[dense]), dict(params=[router])])


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"zero_optimization": {"stage": 3}}, "ZeRO stage 1 or 2"),
        ({"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0}, "mean of the per-rank gradient norms"),
        ({"zero_optimization": {"stage": 2, "reduce_scatter": False}}, "reduce_scatter"),
    ],
)
def test_check_ds_config_refuses_what_breaks_expert_parallelism(config, match):
    check_ds_config(config, ep_size=1)  # all fine without expert parallelism
    with pytest.raises(ValueError, match=match):
        check_ds_config(config, ep_size=2)


@pytest.mark.slow
# sigmoid + bias / softmax + balance loss / an MTP module whose block is an MoE too
@pytest.mark.parametrize("preset", ["deepseek_glm4", "baseline", "deepseek_glm4_mtp"])
def test_ep2_trains_like_ep1_on_two_ranks(tmp_path, preset):
    r = _launch(tmp_path, "parity", "--preset", preset, "--steps", "3")
    assert r["idle_dispatch_max_err"] < 1e-6  # a rank that receives (and sends) nothing
    assert "must divide the world size (2)" in r["world_size_error"]
    assert len(r["loss_ep2"]) == 3
    assert r["loss_max_diff"] < FP32_TOL, (r["loss_ep1"], r["loss_ep2"])
    # Clipping is active (norms ~40 > 1) and the global norm counts every expert shard once. The worker
    # bypasses the trainer's engine setup, so this is DeepSpeed's ZeRO-2 norm of the orthogonalised Muon updates,
    # not the raw gradient norm the trainer logs and clips by (see GRAD_CLIP in tests/_ep_worker.py).
    norms_ep1, norms_ep2 = torch.tensor(r["grad_norm_ep1"]), torch.tensor(r["grad_norm_ep2"])
    torch.testing.assert_close(norms_ep2, norms_ep1, rtol=FP32_TOL, atol=0)
    assert r["weight_max_change"] > 1e-2  # the weights moved, so comparing them means something
    assert r["weight_max_diff"] < FP32_TOL
    assert r["same_keys_and_shapes"]  # full_state_dict gathers the unsharded layout
    assert r["state_spread_ep2"] == 0.0  # replicated weights (and gathered experts) equal on both ranks
    assert r["bias_spread_ep1"] == 0.0 and r["bias_spread_ep2"] == 0.0 and r["bias_max_diff"] == 0.0
    if preset != "baseline":
        assert r["bias_abs_max"] > 0  # the loss-free bias update ran
    moe_groups = [g for g in r["groups_ep2"] if g[1]]
    assert moe_groups == [["ep_size_2", True, True, 0.02, "muon"]]  # experts: Muon settings kept


@pytest.mark.slow
@pytest.mark.parametrize(("zero", "precision"), [(2, "fp32"), (0, "fp32"), (2, "bf16")])
def test_checkpoint_round_trip_with_ep2(tmp_path, zero, precision):
    r = _launch(tmp_path, "checkpoint", "--zero", str(zero), "--precision", precision,
                "--ckpt-dir", str(tmp_path / "ckpt"))
    assert r["client_step"] == 2
    assert {"expert_shard_ep000_of_002.pt", "expert_shard_ep001_of_002.pt"} <= set(r["files"])
    # Same weights, optimizer state and batch: the resumed step is bit-identical.
    assert r["resume_loss_diff"] == 0.0
    assert r["resume_weight_diff"] == 0.0
