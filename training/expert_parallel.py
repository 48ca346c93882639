"""Expert parallelism: shard every zoo MoE layer's experts over DeepSpeed's expert-parallel groups.

Legend: T = tokens on this rank, D = d_model, F = expert hidden size, E = experts of the layer,
P = ep_size ranks in an expert-parallel (EP) group, L = E / P experts local to a rank, K = experts
per token, A = T*K assignments this rank sends, R = rows it receives.

Every rank builds the full model with the same seed, then `enable_expert_parallel` keeps rank p's
experts [p*L, (p+1)*L) of each stacked weight and swaps the layer's `GroupedExperts` for
`ExpertParallelExperts`, whose dispatch is an all-to-all over the EP group:

    sort the A assignments by expert (so they are grouped by destination rank)
    -> all_to_all the per-expert counts (int64), so every rank knows what it receives
    -> all_to_all the rows -> run each local expert on its rows (`dropless_dispatch`, K = 1)
    -> all_to_all the outputs back -> scale by the combine weights -> scatter-add into tokens.

The router, the shared experts and everything else stay replicated and data-parallel. Experts are
marked as DeepSpeed MoE parameters (`allreduce=False`, `group_name="ep_size_<P>"`), so the engine
reduces their gradients over the expert-data-parallel group only, and ZeRO-1/2 partition them
there. DeepSpeed honours that marking only in a model holding a `deepspeed.moe.layer.MoE`, hence
the second base class of `ExpertParallelExperts` (its `__init__` is never run; we swap classes).
Layout is DeepSpeed's legacy E+D one: EP groups are consecutive ranks ([0,1], [2,3] for world 4,
P = 2), expert-data-parallel groups strided ([0,2], [1,3]).

Known limits: ZeRO-3 (DeepSpeed refuses native MoE layers there); DeepSpeed's own MoE checkpoint
path (it expects its `deepspeed_moe.experts.deepspeed_experts.<i>` naming), replaced here by
`expert_checkpoint_context` + `save_expert_shards` / `load_expert_shards`.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import deepspeed.comm
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from torch import nn

from zoo.blocks.moe import GroupedExperts, dropless_dispatch

EXPERT_PARAM_NAMES = ("gate_up_proj", "down_proj")


def ep_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel and expert-data-parallel groups of this size."""
    return f"ep_size_{ep_size}"


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single over rows; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x_ND, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out_MD = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out_MD, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out_MD

    @staticmethod
    def backward(ctx, grad_MD):
        grad_ND = grad_MD.new_empty((sum(ctx.in_splits), *grad_MD.shape[1:]))
        dist.all_to_all_single(grad_ND, grad_MD.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_ND, None, None, None


def expert_parallel_dispatch(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    gate_up_L2FD: torch.Tensor,
    down_LDF: torch.Tensor,
    *,
    group,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dropless_dispatch` with the E experts spread over the P ranks of `group`, L per rank.

    `experts_TK` holds global expert ids; this rank holds experts [p*L, (p+1)*L). Returns the combined
    output (T, D) and this rank's own assignment counts over all E experts (for router statistics).
    Collective: every rank of `group` must call it, also with nothing to send or receive.
    """
    P, L = dist.get_world_size(group), gate_up_L2FD.shape[0]
    T, K = experts_TK.shape
    E = P * L
    flat_experts_A = experts_TK.reshape(-1)
    order_A = flat_experts_A.argsort(stable=True)  # grouped by expert, hence by destination rank
    token_A = order_A // K
    counts_E = torch.bincount(flat_experts_A, minlength=E)  # int64
    recv_counts_PL = torch.empty_like(counts_E)  # [source rank, local expert]
    dist.all_to_all_single(recv_counts_PL, counts_E, group=group)
    recv_counts_PL = recv_counts_PL.view(P, L)
    send_splits = counts_E.view(P, L).sum(dim=1).tolist()
    recv_splits = recv_counts_PL.sum(dim=1).tolist()

    x_RD = _AllToAll.apply(x_TD[token_A], recv_splits, send_splits, group)  # by source, then local expert
    if x_RD.shape[0] > 0:
        # The same per-expert compute as the local dispatcher: each received row is one assignment
        # (K = 1, weight 1, exact) to its local expert; it sorts by expert and puts rows back in place.
        local_expert_R = torch.arange(L, device=x_TD.device).repeat(P).repeat_interleave(recv_counts_PL.reshape(-1))
        ones_R1 = torch.ones(x_RD.shape[0], 1, device=x_TD.device, dtype=weights_TK.dtype)
        y_RD, _ = dropless_dispatch(x_RD, ones_R1, local_expert_R[:, None], gate_up_L2FD, down_LDF)
    else:
        # Nothing came in. Stay in the graph anyway, so this rank joins the backward all-to-alls its
        # peers wait on and its experts get a (zero) gradient like every other rank's.
        y_RD = x_RD * 0 + (gate_up_L2FD.sum() + down_LDF.sum()).to(x_RD.dtype) * 0
    y_AD = _AllToAll.apply(y_RD, send_splits, recv_splits, group)  # back in the sorted order of `order_A`

    y_AD = y_AD * weights_TK.reshape(-1)[order_A, None].to(y_AD.dtype)
    y_TD = torch.zeros_like(x_TD).index_add_(0, token_A, y_AD.to(x_TD.dtype))
    return y_TD, counts_E


class ExpertParallelExperts(GroupedExperts, DeepSpeedMoE):
    """This rank's L of a layer's E experts, fed by all-to-all over the EP group.

    Made from a `GroupedExperts` by `enable_expert_parallel` (class swap, no `__init__`). Inherits
    from DeepSpeed's MoE only for the engine's `isinstance` test (`has_moe_layers`) and the
    attributes it reads (`num_experts`, `set_deepspeed_parallelism`).
    """

    n_experts: int  # E, the layer's experts (all ranks together)
    num_experts: int  # E, DeepSpeed's name
    num_local_experts: int  # L
    ep_size: int
    ep_rank: int
    expert_group_name: str
    ep_group: object

    def forward(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return expert_parallel_dispatch(
            x_TD, weights_TK, experts_TK, self.gate_up_proj, self.down_proj, group=self.ep_group
        )

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, **_) -> None:
        """Called by `deepspeed.initialize`; the groups already exist (`enable_expert_parallel`)."""
        if use_data_before_expert_parallel_:
            raise ValueError(
                "use_data_before_expert_parallel_=true in the DeepSpeed config is not supported with "
                "enable_expert_parallel (experts were sharded for the E+D layout); remove it from the config"
            )
        self.ep_group = groups._get_expert_parallel_group(self.expert_group_name)

    def extra_repr(self) -> str:
        return (
            f"experts {self.ep_rank * self.num_local_experts}..{(self.ep_rank + 1) * self.num_local_experts - 1} "
            f"of {self.num_experts}, ep_size={self.ep_size}"
        )


def expert_parallel_layers(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """Qualified name -> every sharded expert module in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def enable_expert_parallel(model: nn.Module, ep_size: int) -> None:
    """Shard every `GroupedExperts` in `model` over EP groups of `ep_size` ranks, in place.

    Call after `deepspeed.init_distributed` and before `deepspeed.initialize` (and before building
    optimizer param groups: expert parameters are replaced), on a model every rank built with the same
    seed. `ep_size == 1` changes nothing.
    """
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive integer, got {ep_size!r}")
    if ep_size == 1:
        return
    if expert_parallel_layers(model):
        raise ValueError("enable_expert_parallel was already applied to this model")
    layers = {name: m for name, m in model.named_modules() if type(m) is GroupedExperts}
    if not layers:
        raise ValueError(f"ep_size={ep_size} but the model has no MoE layer (GroupedExperts) to shard; use ep_size=1")
    for name, experts in layers.items():
        if experts.n_experts % ep_size:
            raise ValueError(
                f"ep_size ({ep_size}) must divide n_experts ({experts.n_experts}) of {name}; "
                f"choose an ep_size among the divisors of {experts.n_experts}"
            )
    if not deepspeed.comm.is_initialized():
        raise RuntimeError(
            "enable_expert_parallel needs DeepSpeed's process group: call deepspeed.init_distributed() first"
        )
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must divide the world size ({world}); choose a divisor of {world}")

    group_name = ep_group_name(ep_size)
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_rank = groups._get_expert_parallel_rank(group_name)
    ep_group = groups._get_expert_parallel_group(group_name)

    for experts in layers.values():
        L = experts.n_experts // ep_size
        local = slice(ep_rank * L, (ep_rank + 1) * L)
        for param_name in EXPERT_PARAM_NAMES:
            full = getattr(experts, param_name)
            shard = nn.Parameter(full.detach()[local].clone(), requires_grad=full.requires_grad)
            shard.__dict__.update(full.__dict__)  # keep tags set before (use_muon, is_expert_group, ...)
            shard.allreduce = False  # => deepspeed.moe.utils.is_moe_param
            shard.group_name = group_name
            setattr(experts, param_name, shard)
        experts.__class__ = ExpertParallelExperts
        experts.num_experts, experts.num_local_experts = experts.n_experts, L
        experts.ep_size, experts.ep_rank = ep_size, ep_rank
        experts.expert_group_name, experts.ep_group = group_name, ep_group
        # Read by DeepSpeed code that inspects MoE layers (flops profiler, residual MoE).
        experts.enable_expert_tensor_parallelism, experts.use_residual = False, False


def check_ds_config(config: dict, ep_size: int) -> None:
    """Refuse, before `deepspeed.initialize`, the DeepSpeed settings under which expert parallelism fails
    deep inside DeepSpeed or silently trains differently from ep_size=1."""
    if ep_size == 1:
        return
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage == 3:
        raise ValueError(
            f"ep_size={ep_size} needs ZeRO stage 1 or 2: DeepSpeed refuses MoE layers under ZeRO-3; "
            "set deepspeed.zero_stage=1 or 2, or ep_size=1"
        )
    if stage == 0 and config.get("gradient_clipping", 0.0) > 0:
        raise ValueError(
            f"ep_size={ep_size} with ZeRO-0 and gradient_clipping>0: DeepSpeed's ZeRO-0 clipping uses the mean of "
            "the per-rank gradient norms, not the global norm, so training would differ from ep_size=1; "
            "use ZeRO stage 1 or 2 (exact), or gradient_clipping=0"
        )
    if stage in (1, 2) and not zero.get("reduce_scatter", True):
        raise ValueError(
            f"ep_size={ep_size} needs zero_optimization.reduce_scatter=true (DeepSpeed's ZeRO-1/2 MoE path "
            "asserts it); remove the setting from the DeepSpeed config"
        )
    if stage == 2 and not zero.get("contiguous_gradients", True):
        raise ValueError(
            f"ep_size={ep_size} needs zero_optimization.contiguous_gradients=true under ZeRO-2 (DeepSpeed's "
            "MoE path asserts it); remove the setting from the DeepSpeed config"
        )
    if config.get("use_data_before_expert_parallel_", False):
        raise ValueError(
            "use_data_before_expert_parallel_ is not supported with enable_expert_parallel (experts are "
            "sharded for DeepSpeed's default E+D group layout); remove it from the DeepSpeed config"
        )


def moe_param_groups(param_groups: list[dict]) -> list[dict]:
    """Split client-optimizer param groups into dense and expert groups, as DeepSpeed's ZeRO needs.

    Each input group needs a unique "name". Its expert parameters move to a group named
    "ep_size_<P>" with "moe": True (ZeRO looks the expert-data-parallel group up by that name) that
    keeps every other key of its source (use_muon, lr, betas, ...) and records the source's name
    under "source_name". Groups left without parameters are dropped. Inputs are not modified.
    """
    names = [group.get("name") for group in param_groups]
    if None in names or len(set(names)) != len(names):
        raise ValueError(f"every param group needs a unique 'name' for the MoE split, got names {names}")
    copies = [{**group, "params": list(group["params"])} for group in param_groups]
    expert_source = {id(p): group["name"] for group in copies for p in group["params"] if is_moe_param(p)}
    split = split_params_into_different_moe_groups_for_optimizer(copies)
    for group in split:
        if group.get("moe") and group["params"]:
            group["source_name"] = expert_source[id(group["params"][0])]
    return [group for group in split if group["params"]]


@contextmanager
def expert_checkpoint_context(engine) -> Iterator[None]:
    """Wrap `engine.save_checkpoint` / `engine.load_checkpoint` in this, then call `save_expert_shards` /
    `load_expert_shards`.

    DeepSpeed's MoE checkpoint path only knows its own expert modules (it writes no file for ours and
    fails to load); treated as dense, the engine saves and restores everything else, including the
    ZeRO-1/2 optimizer partitions of the experts, per rank. The model-states file then holds rank 0's
    expert shard only, which `load_expert_shards` overwrites with each rank's own.
    """
    had_moe = engine.has_moe_layers
    engine.has_moe_layers = False
    try:
        yield
    finally:
        engine.has_moe_layers = had_moe


def _shard_path(ckpt_dir: str, tag: str, ep_rank: int, ep_size: int) -> str:
    return os.path.join(ckpt_dir, str(tag), f"expert_shard_ep{ep_rank:03d}_of_{ep_size:03d}.pt")


def _expert_params(layers: dict[str, ExpertParallelExperts]) -> dict[str, nn.Parameter]:
    return {
        f"{name}.{param_name}": getattr(layer, param_name)
        for name, layer in layers.items()
        for param_name in EXPERT_PARAM_NAMES
    }


def _unpartitioned_optimizer_state(engine) -> dict | None:
    """The optimizer's per-parameter state when the engine saves it whole from rank 0 (ZeRO-0), which
    would hand every EP rank rank 0's expert states; None under ZeRO-1/2 (per-rank files, correct)."""
    if engine.zero_optimization() or engine.optimizer is None:
        return None
    return getattr(engine.optimizer, "optimizer", engine.optimizer).state


def save_expert_shards(engine, ckpt_dir: str, tag: str) -> None:
    """Write this EP rank's experts to `<ckpt_dir>/<tag>/expert_shard_ep<p>_of_<P>.pt` (one writer per
    EP rank: expert-data-parallel rank 0), with their optimizer states under ZeRO-0. Call on every
    rank after `engine.save_checkpoint`."""
    layers = expert_parallel_layers(engine.module)
    if not layers:
        return
    first = next(iter(layers.values()))
    if groups._get_expert_data_parallel_rank(first.expert_group_name) == 0:
        params = _expert_params(layers)
        optimizer_state = _unpartitioned_optimizer_state(engine)
        shard = {
            "ep_size": first.ep_size,
            "ep_rank": first.ep_rank,
            "tensors": {key: p.detach().cpu() for key, p in params.items()},
            "optimizer_state": None
            if optimizer_state is None
            else {key: optimizer_state[p] for key, p in params.items() if p in optimizer_state},
        }
        path = _shard_path(ckpt_dir, tag, first.ep_rank, first.ep_size)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(shard, path)
    dist.barrier()


def load_expert_shards(engine, ckpt_dir: str, tag: str | None = None) -> None:
    """Copy this EP rank's experts (and under ZeRO-0 their optimizer states) back from
    `save_expert_shards`' file. Call on every rank after `engine.load_checkpoint` (tag None: the one
    named in `<ckpt_dir>/latest`, as DeepSpeed does).

    With ZeRO-1/2 the fp32 master partitions were already restored from the optimizer files; after a
    module-only load (load_optimizer_states=False) call `engine.optimizer.refresh_fp32_params()`.
    """
    layers = expert_parallel_layers(engine.module)
    if not layers:
        return
    if tag is None:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            tag = f.read().strip()
    first = next(iter(layers.values()))
    path = _shard_path(ckpt_dir, tag, first.ep_rank, first.ep_size)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no expert shard {path}: the checkpoint was not saved with ep_size={first.ep_size} "
            "(expert shards are per ep_size; resume with the ep_size it was saved with)"
        )
    shard = torch.load(path, map_location="cpu", weights_only=True)
    params = _expert_params(layers)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(shard["tensors"][key].to(param.device, param.dtype))
    optimizer_state = _unpartitioned_optimizer_state(engine)
    if optimizer_state is not None and shard["optimizer_state"] is not None:
        for key, state in shard["optimizer_state"].items():
            param = params[key]
            optimizer_state[param] = {
                k: v.to(param.device) if torch.is_tensor(v) else v for k, v in state.items()
            }


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every expert weight gathered back to its full (E, ...) stack, on every
    rank: the keys and shapes of the unsharded model. Collective over each EP group."""
    state = model.state_dict()
    for name, layer in expert_parallel_layers(model).items():
        for param_name in EXPERT_PARAM_NAMES:
            shard = getattr(layer, param_name).detach().contiguous()
            parts = [torch.empty_like(shard) for _ in range(layer.ep_size)]
            dist.all_gather(parts, shard, group=layer.ep_group)  # in EP-rank order
            key = f"{name}.{param_name}" if name else param_name
            state[key] = torch.cat(parts)
    return state
