"""One rank of the expert-parallel tests (tests/test_expert_parallel.py launches it with torchrun).

    torchrun --standalone --nproc_per_node 2 tests/_ep_worker.py parity --preset deepseek_glm4 --out r.json
    torchrun --standalone --nproc_per_node 2 tests/_ep_worker.py checkpoint --ckpt-dir d --out r.json

parity: an all-to-all dispatch where one rank receives nothing, compared with the local dispatcher;
then the same tiny preset trained for a few steps on the same global batch with ep_size=1 (experts
replicated, ZeRO-2 data parallel) and ep_size=2 (experts sharded), the routing biases updated from
loads all-reduced over the world after each step, as the trainer does.
checkpoint: ep_size=2, train, save, restore into a fresh engine, compare the next step.

Rank 0 writes the measurements as JSON to --out; the test asserts on them.
"""

import argparse
import importlib
import json
import os
import time

import deepspeed
import torch
import torch.distributed as dist

import zoo
from training.expert_parallel import (
    check_ds_config,
    enable_expert_parallel,
    expert_checkpoint_context,
    expert_parallel_dispatch,
    full_state_dict,
    load_expert_shards,
    moe_param_groups,
    save_expert_shards,
)
from zoo import presets
from zoo.blocks.moe import dropless_dispatch
from zoo.blocks.routers import Router

MICRO_BATCH, SEQ = 2, 32
MUON_LR, ADAM_LR = 0.02, 3e-3
# On, so the global norm must count every expert shard once. This worker calls deepspeed.initialize
# directly, without the trainer's clip of the raw gradients before Newton-Schulz: under ZeRO-1/2 the norm
# DeepSpeed takes and clips by is that of the orthogonalised Muon updates (plus AdamW's raw gradients),
# far above 1, so every update is divided by it. Fine for comparing ep_size 1 and 2, which share that
# order; the trainer's raw-gradient clip is tested in tests/test_training_engine.py.
GRAD_CLIP = 1.0


def ds_config(zero_stage: int, precision: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        # ZeRO-0 clips MoE gradients by an approximate norm (check_ds_config refuses it with EP).
        "gradient_clipping": GRAD_CLIP if zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def param_groups(model) -> list[dict]:
    """The trainer's split: Muon for hidden matrices (experts per expert), AdamW for the rest."""
    special = {id(p) for p in model.vocab_parameters()}
    routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    muon, adam = [], []
    for p in model.parameters():
        p.use_muon = p.ndim >= 2 and id(p) not in special and id(p) not in routers
        p.is_expert_group = p.ndim == 3
        (muon if p.use_muon else adam).append(p)
    return [
        dict(name="muon", params=muon, use_muon=True, lr=MUON_LR, momentum=0.95, weight_decay=0.0),
        dict(name="adam", params=adam, use_muon=False, lr=ADAM_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0),
    ]


def make_engine(args, preset: str, ep_size: int, seed: int = 0):
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    torch.manual_seed(seed)
    model = zoo.build(presets.get(preset, tiny=True))
    enable_expert_parallel(model, ep_size)
    groups = moe_param_groups(param_groups(model)) if ep_size > 1 else param_groups(model)
    config = ds_config(args.zero, args.precision)
    check_ds_config(config, ep_size)
    engine, *_ = deepspeed.initialize(model=model, optimizer=MuonWithAuxAdam(groups), config=config)
    return engine, groups


def global_batch(vocab: int, world: int, steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (steps, world * MICRO_BATCH, SEQ), generator=g)


def train_step(engine, ids: torch.Tensor, grad_norms: list | None = None) -> float:
    """One optimizer step on this rank's rows, then the loss-free bias update on world-summed loads."""
    out = engine(ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    if grad_norms is not None:
        norm = engine.get_global_grad_norm()  # None under ZeRO-0
        grad_norms.append(float("nan") if norm is None else float(norm))
    loads = {i: s.load_E.clone() for i, s in out.router_stats.items()}
    for load in loads.values():
        dist.all_reduce(load)
    engine.module.update_routing_biases(loads)
    return out.loss.item()


def max_across_ranks(value: float) -> float:
    t = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def biases(model) -> torch.Tensor:
    return torch.cat([b.flatten() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")] or
                     [torch.zeros(0)])


def spread_across_ranks(t: torch.Tensor) -> float:
    """max |t_rank - t_rank'|: 0 when every rank holds the same tensor."""
    hi, lo = t.clone().double(), t.clone().double()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return (hi - lo).abs().max().item() if t.numel() else 0.0


def dispatch_with_idle_rank(rank: int, world: int) -> dict:
    """All assignments go to EP rank 0's experts, so rank 1 receives no row (and rank 1 sends none)."""
    E, D, F, K = 4, 8, 12, 2
    L = E // world
    g = torch.Generator().manual_seed(7)
    gate_up = torch.randn(E, 2 * F, D, generator=g) * 0.3
    down = torch.randn(E, D, F, generator=g) * 0.3
    T = 9 if rank == 0 else 0
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(10 + rank))
    experts = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(9)])[:T]
    weights = torch.rand(T, K, generator=g)

    leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
    y_ref, counts_ref = dropless_dispatch(*leaves[:2], experts, *leaves[2:])
    y_ref.square().sum().backward()
    # The local dispatcher leaves expert gradients None on a rank without tokens.
    grad_gate_up, grad_down = (torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in leaves[2:])
    dist.all_reduce(grad_gate_up)  # an expert's gradient collects every rank's tokens
    dist.all_reduce(grad_down)

    local = slice(rank * L, (rank + 1) * L)
    x_ep, w_ep = x.clone().requires_grad_(), weights.clone().requires_grad_()
    gu_ep, dn_ep = gate_up[local].clone().requires_grad_(), down[local].clone().requires_grad_()
    y, counts = expert_parallel_dispatch(x_ep, w_ep, experts, gu_ep, dn_ep, group=dist.group.WORLD)
    y.square().sum().backward()
    err = max(
        (y - y_ref).abs().max().item() if T else 0.0,
        (x_ep.grad - leaves[0].grad).abs().max().item() if T else 0.0,
        (w_ep.grad - leaves[1].grad).abs().max().item() if T else 0.0,
        (gu_ep.grad - grad_gate_up[local]).abs().max().item(),
        (dn_ep.grad - grad_down[local]).abs().max().item(),
        float((counts != counts_ref).any()),
    )
    return {"idle_dispatch_max_err": max_across_ranks(err)}


def world_size_error(preset: str, world: int) -> str:
    try:
        enable_expert_parallel(zoo.build(presets.get(preset, tiny=True)), 2 * world)
    except ValueError as err:
        return str(err)
    return ""


def parity(args, rank: int, world: int) -> dict:
    result = dispatch_with_idle_rank(rank, world)
    result["world_size_error"] = world_size_error(args.preset, world)
    vocab = presets.get(args.preset, tiny=True).model.vocab_size
    batch = global_batch(vocab, world, args.steps)
    mine = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    runs = {}
    for ep_size in (1, 2):
        engine, groups = make_engine(args, args.preset, ep_size)
        start, grad_norms = time.perf_counter(), []
        losses = [train_step(engine, batch[step, mine], grad_norms) for step in range(args.steps)]
        seconds = time.perf_counter() - start
        runs[ep_size] = dict(
            losses=losses,
            grad_norms=grad_norms,
            state=full_state_dict(engine.module),
            biases=biases(engine.module),
            seconds_per_step=max_across_ranks(seconds / args.steps),
            groups=[(g["name"], bool(g.get("moe")), g.get("use_muon"), g.get("lr"), g.get("source_name"))
                    for g in groups],
        )
    one, two = runs[1], runs[2]
    reference = zoo.build(presets.get(args.preset, tiny=True)).state_dict()
    result.update(
        loss_ep1=one["losses"],
        loss_ep2=two["losses"],
        grad_norm_ep1=one["grad_norms"],
        grad_norm_ep2=two["grad_norms"],
        loss_max_diff=max_across_ranks(max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))),
        weight_max_diff=max_across_ranks(max((one["state"][k] - two["state"][k]).abs().max().item()
                                             for k in one["state"])),
        weight_max_change=max((one["state"][k] - reference[k]).abs().max().item() for k in reference),
        same_keys_and_shapes={k: tuple(v.shape) for k, v in reference.items()}
        == {k: tuple(v.shape) for k, v in two["state"].items()},
        state_spread_ep2=max(spread_across_ranks(v.float()) for v in two["state"].values()),
        bias_spread_ep1=spread_across_ranks(one["biases"]),
        bias_spread_ep2=spread_across_ranks(two["biases"]),
        bias_max_diff=max_across_ranks((one["biases"] - two["biases"]).abs().max().item()
                                       if one["biases"].numel() else 0.0),
        bias_abs_max=one["biases"].abs().max().item() if one["biases"].numel() else 0.0,
        seconds_per_step_ep1=one["seconds_per_step"],
        seconds_per_step_ep2=two["seconds_per_step"],
        groups_ep2=two["groups"],
    )
    return result


def checkpoint(args, rank: int, world: int) -> dict:
    preset = "deepseek_glm4"
    batch = global_batch(presets.get(preset, tiny=True).model.vocab_size, world, 3)
    mine = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)

    engine, _ = make_engine(args, preset, ep_size=2)
    for step in range(2):
        train_step(engine, batch[step, mine])
    with expert_checkpoint_context(engine):
        engine.save_checkpoint(args.ckpt_dir, tag="step2", client_state={"step": 2})
    save_expert_shards(engine, args.ckpt_dir, "step2")
    loss_straight = train_step(engine, batch[2, mine])
    state_straight = full_state_dict(engine.module)

    fresh, _ = make_engine(args, preset, ep_size=2, seed=99)  # different weights: the load must restore them
    with expert_checkpoint_context(fresh):
        _, client_state = fresh.load_checkpoint(args.ckpt_dir)  # tag from `latest`
    load_expert_shards(fresh, args.ckpt_dir)
    loss_resumed = train_step(fresh, batch[2, mine])
    state_resumed = full_state_dict(fresh.module)
    return dict(
        client_step=client_state["step"],
        resume_loss_diff=max_across_ranks(abs(loss_straight - loss_resumed)),
        resume_weight_diff=max_across_ranks(max((state_straight[k] - state_resumed[k]).abs().max().item()
                                                for k in state_straight)),
        files=sorted(os.listdir(os.path.join(args.ckpt_dir, "step2"))),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["parity", "checkpoint"])
    parser.add_argument("--preset", default="deepseek_glm4")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--out", required=True)
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank

    # init_distributed JIT-compiles a shared-memory op (20 s cold) that only inference uses.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    result = (parity if args.scenario == "parity" else checkpoint)(args, rank, world)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    # Multi-rank DeepSpeed runs on gloo sometimes abort in interpreter teardown after all work is done
    # (notes/deepspeed_cpu.md, section 4); the result is written, so leave without teardown.
    os._exit(0)


if __name__ == "__main__":
    main()
