"""Mixture-of-Experts feed-forward: a router, stacked SwiGLU experts, optional shared experts.

Legend: B = batch, S = sequence, T = B*S tokens, D = d_model, E = experts, F = expert hidden size,
K = experts per token, A = T*K assignments.

Experts are stacked weights in the layout transformers v5 uses: gate_up_proj (E, 2F, D), whose
first F rows are the gate, and down_proj (E, D, F). Routing (which experts, what weights) is the
router's job; dispatch (moving tokens to experts and back) is `dropless_dispatch`'s: sort the A
assignments by expert, run each expert once on its contiguous slice (two grouped GEMMs, batched
matmuls over buckets of experts each padded to its largest count, or a loop over experts), put the
rows back in token order and combine each token's K outputs with its routing weights. No token is dropped and no
capacity factor is needed. No data movement sums over duplicate indices, forward or backward (no
scatter-add with atomics, no zero-filled per-expert weight gradients).
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from zoo.blocks.dtypes import compute_dtype
from zoo.blocks.mlp import SwiGLU
from zoo.blocks.padded_experts import BucketPlan, experts_padded_bmm, plan_buckets


@dataclass
class RouterStats:
    """What one MoE layer reports per forward pass (all detached but `aux_loss`)."""

    load_E: torch.Tensor  # assignments per expert (float counts)
    max_vio: torch.Tensor  # (max load - mean load) / mean load
    entropy: torch.Tensor  # mean per-token entropy of the router distribution, nats
    aux_loss: torch.Tensor  # weighted auxiliary loss, part of the training loss


Dispatch = Literal["auto", "grouped_mm", "loop", "padded_bmm"]


def _grouped_mm_available(x: torch.Tensor) -> bool:
    """Whether x's experts compute in bf16 (its dtype, or autocast's) on CUDA or CPU with
    torch._grouped_mm present (a CPU kernel since torch 2.9). In fp32 on CPU the per-expert loop was
    faster in the whole train step, although the MoE layer alone favours the padded path
    (benchmarks/results/moe_layer.txt and benchmarks/results/README.md)."""
    return (compute_dtype(x) == torch.bfloat16 and x.device.type in ("cuda", "cpu")
            and hasattr(torch, "_grouped_mm"))


GROUPED_MM_ALIGNMENT = 16  # bytes: torch._grouped_mm wants every row stride a multiple of this (CPU and CUDA)


def _grouped_mm_aligned(dtype: torch.dtype, d_model: int, d_expert: int) -> bool:
    """Whether the expert matrices' rows meet torch._grouped_mm's stride alignment in `dtype`
    (in bf16: d_model and d_expert multiples of 8; 341 or 205 wide experts are not)."""
    elements = GROUPED_MM_ALIGNMENT // dtype.itemsize
    return d_model % elements == 0 and d_expert % elements == 0


class _GatherRows(torch.autograd.Function):
    """Rows `index` of x (A, D) from x (T, D), each row of x taken `K` times in all; `inverse` is the
    position of assignment t*K+k in `index`'s order. The backward gathers as well (and sums the K
    copies) instead of scattering with atomics, as indexing's backward would."""

    @staticmethod
    def forward(ctx, x_TD, index_A, inverse_A, K: int):
        ctx.save_for_backward(inverse_A)
        ctx.K = K
        return x_TD.index_select(0, index_A)

    @staticmethod
    def backward(ctx, grad_AD):
        (inverse_A,) = ctx.saved_tensors
        grad_TKD = grad_AD.index_select(0, inverse_A).unflatten(0, (-1, ctx.K))
        return grad_TKD.sum(1), None, None, None


class _Permute(torch.autograd.Function):
    """Rows of x in the order `index`; the backward gathers with `inverse`, the permutation undoing it."""

    @staticmethod
    def forward(ctx, x_AD, index_A, inverse_A):
        ctx.save_for_backward(inverse_A)
        return x_AD.index_select(0, index_A)

    @staticmethod
    def backward(ctx, grad_AD):
        (inverse_A,) = ctx.saved_tensors
        return grad_AD.index_select(0, inverse_A), None, None


def _experts_loop(x_AD, counts_E, gate_up_E2FD, down_EDF) -> torch.Tensor:
    """Each expert on its contiguous rows; `unbind` (not indexing) so the backward stacks the E
    weight gradients once instead of writing each into a zeroed full-size tensor."""
    outs = []
    for x_nD, gate_up_2FD, down_DF in zip(x_AD.split(counts_E.tolist()), gate_up_E2FD.unbind(0), down_EDF.unbind(0)):
        if x_nD.shape[0] == 0:
            continue
        gate_nF, up_nF = F.linear(x_nD, gate_up_2FD).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate_nF) * up_nF, down_DF))
    return torch.cat(outs) if outs else x_AD.new_zeros(0, down_EDF.shape[1])


def _experts_grouped_mm(x_AD, counts_E, gate_up_E2FD, down_EDF) -> torch.Tensor:
    """All experts in two grouped GEMMs (no host sync: the offsets stay on the device)."""
    dtype = compute_dtype(x_AD)
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    gate_up_A2F = torch._grouped_mm(x_AD.to(dtype), gate_up_E2FD.to(dtype).transpose(-2, -1), offs=offsets_E)
    gate_AF, up_AF = gate_up_A2F.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate_AF) * up_AF, down_EDF.to(dtype).transpose(-2, -1), offs=offsets_E)


SMALL_EXPERT_ROWS = 256  # below this many rows per expert, torch._grouped_mm's CPU loop is inefficient
PADDING_LIMIT = {True: 4.0, False: 1.25}  # small experts? -> most padded rows per assignment worth it


def _auto_impl(x_TD: torch.Tensor, counts_E: torch.Tensor, aligned: bool = True) -> tuple[str, BucketPlan | None]:
    """bf16 (or autocast to it): on CPU the bucketed padded batched matmul while padding wastes
    little (at most 1.25x the assignments, or 4x when experts average under 256 rows:
    grouped_mm's per-expert matmuls are then small and slow), else torch._grouped_mm; on CUDA
    always grouped_mm (no host sync). fp32 on CPU: the per-expert loop. Where the expert widths
    miss grouped_mm's alignment (`aligned` False), the per-expert loop instead of it. Returns the
    choice and, for the padded path, its bucket plan (read on the host once).

    Measured on the compiled train step (bf16 autocast, 2 CPU cores, medians of 12 steps, two runs
    each): W2 (192 rows per expert) 447-468 ms a step padded in 4 buckets against 768-804 ms with
    grouped_mm; W1 (512 rows, 2 buckets) 358-360 against 393-412 ms. Under torch.compile the
    padded path costs a graph break per MoE layer (the bucket sizes are read on the host) and one
    recompilation, after which they are dynamic."""
    if not _grouped_mm_available(x_TD):
        return "loop", None
    if x_TD.device.type == "cpu":
        plan = plan_buckets(counts_E.sort(descending=True).values)
        small = plan.assignments < SMALL_EXPERT_ROWS * counts_E.numel()
        if plan.padded_rows() <= PADDING_LIMIT[small] * plan.assignments:
            return "padded_bmm", plan
    return ("grouped_mm" if aligned else "loop"), None


def dropless_dispatch(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    impl: Dispatch = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every token through its K experts; returns the combined output (T, D) and counts (E,).

    `impl`: "grouped_mm" (torch._grouped_mm), "padded_bmm" (buckets of experts sorted by count, each
    padded to its largest count, two bmm per bucket), "loop" (one matmul pair per expert), or "auto"
    (`_auto_impl`: what measured fastest).
    """
    T, K = experts_TK.shape
    E = gate_up_E2FD.shape[0]
    if T == 0:  # no tokens: nothing to run (still part of x's graph, so a backward works)
        return x_TD * 0, torch.zeros(E, dtype=torch.long, device=x_TD.device)
    flat_experts_A = experts_TK.reshape(-1)
    sorted_experts_A, order_A = flat_experts_A.sort(stable=True)  # assignments grouped by expert
    # The inverse permutation. A scatter, not `inverse_A[order_A] = ...` (an index_put).
    inverse_A = torch.empty_like(order_A).scatter_(0, order_A, torch.arange(order_A.numel(), device=order_A.device))
    # Assignments per expert, from where each expert's run starts in the sorted list: a bincount
    # with a static size (torch.compile) and no atomics. (index_add_ became an accumulating
    # index_put under torch.compile, whose sort-based CUDA kernel took 0.4 ms a layer at T = 32k,
    # K = 6 on an H200.)
    bounds_E1 = torch.searchsorted(sorted_experts_A, torch.arange(E + 1, device=x_TD.device, dtype=sorted_experts_A.dtype))
    counts_E = bounds_E1.diff()
    x_AD = _GatherRows.apply(x_TD, order_A // K, inverse_A, K)  # (A, D), sorted by expert

    dtype, d_expert = compute_dtype(x_TD), down_EDF.shape[-1]
    aligned = _grouped_mm_aligned(dtype, x_TD.shape[-1], d_expert)
    plan = None
    if impl == "auto":
        impl, plan = _auto_impl(x_TD, counts_E, aligned)
    runs = {"grouped_mm": _experts_grouped_mm, "loop": _experts_loop, "padded_bmm": experts_padded_bmm}
    if impl not in runs:
        raise ValueError(f"dropless_dispatch: impl {impl!r} is not one of auto, {', '.join(runs)}")
    if impl == "grouped_mm" and not aligned:
        elements = GROUPED_MM_ALIGNMENT // dtype.itemsize
        raise ValueError(f"dropless_dispatch: grouped_mm needs d_model and d_expert to be multiples of {elements} in "
                         f"{dtype} ({GROUPED_MM_ALIGNMENT}-byte rows), got {x_TD.shape[-1]} and {d_expert}; "
                         "use impl 'padded_bmm' or 'loop'")
    if impl == "padded_bmm":
        out_AD = experts_padded_bmm(x_AD, counts_E, gate_up_E2FD, down_EDF, plan)
    else:
        out_AD = runs[impl](x_AD, counts_E, gate_up_E2FD, down_EDF)

    out_TKD = _Permute.apply(out_AD, inverse_A, order_A).unflatten(0, (T, K))  # back to token order
    return _combine(out_TKD, weights_TK).to(x_TD.dtype), counts_E


def _combine(out_TKD: torch.Tensor, weights_TK: torch.Tensor, bmm: bool | None = None) -> torch.Tensor:
    """Each token's K expert outputs weighted by its routing weights and summed: (T, D).

    On CPU a batched (1, K) x (K, D) matmul per token was the fastest. On CUDA that bmm ran as a
    gemv at a quarter of the memory bandwidth (0.5 ms a layer forward and as much backward at
    T = 32k, K = 6, D = 1024 on an H200), so there it is a multiply and a sum, which torch.compile
    fuses with the permutation before it. `bmm`: force one form (default: by device)."""
    weights_TK = weights_TK.to(out_TKD.dtype)
    if bmm is None:
        bmm = out_TKD.device.type == "cpu"
    if bmm:
        return torch.bmm(weights_TK.unsqueeze(1), out_TKD).squeeze(1)
    return (out_TKD * weights_TK.unsqueeze(-1)).sum(dim=1)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as two stacked weights."""

    def __init__(self, *, n_experts: int, d_model: int, d_expert: int):
        super().__init__()
        self.n_experts, self.d_expert = n_experts, d_expert
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_expert, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_expert))

    def forward(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return dropless_dispatch(x_TD, weights_TK, experts_TK, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    def __init__(
        self,
        *,
        d_model: int,
        n_experts: int,
        d_expert: int,
        router: nn.Module,
        n_shared_experts: int = 0,
    ):
        super().__init__()
        self.router = router
        self.experts = GroupedExperts(n_experts=n_experts, d_model=d_model, d_expert=d_expert)
        # DeepSeek's shared experts are one SwiGLU n_shared times as wide as a routed expert.
        self.shared_experts = (
            SwiGLU(d_model=d_model, d_hidden=d_expert * n_shared_experts) if n_shared_experts else None
        )
        self._stats: RouterStats | None = None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        routing = self.router(x_BSD)
        y_TD, counts_E = self.experts(x_BSD.reshape(-1, x_BSD.shape[-1]), routing.weights_TK, routing.experts_TK)
        y_BSD = y_TD.view_as(x_BSD)
        if self.shared_experts is not None:
            y_BSD = y_BSD + self.shared_experts(x_BSD)
        self._stats = _router_stats(counts_E, routing.probs_TE, routing.aux_loss)
        return y_BSD

    def pop_stats(self) -> RouterStats:
        """The statistics of the last forward pass (each pass's are read once)."""
        stats, self._stats = self._stats, None
        if stats is None:
            raise RuntimeError("MoE.pop_stats() called before a forward pass")
        return stats


def _router_stats(counts_E: torch.Tensor, probs_TE: torch.Tensor, aux_loss: torch.Tensor) -> RouterStats:
    with torch.no_grad():
        load_E = counts_E.float()
        mean = load_E.mean()
        max_vio = (load_E.max() - mean) / mean.clamp_min(1e-9)
        entropy = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(dim=-1).mean()
    return RouterStats(load_E=load_E, max_vio=max_vio, entropy=entropy, aux_loss=aux_loss)
