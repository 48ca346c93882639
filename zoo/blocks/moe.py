"""Mixture-of-Experts feed-forward: a router, stacked SwiGLU experts, optional shared experts.

Legend: B = batch, S = sequence, T = B*S tokens, D = d_model, E = experts, F = expert hidden size,
K = experts per token, A = T*K assignments.

Experts are stacked weights in the layout transformers v5 uses: gate_up_proj (E, 2F, D), whose
first F rows are the gate, and down_proj (E, D, F). Routing (which experts, what weights) is the
router's job; dispatch (moving tokens to experts and back) is `dropless_dispatch`'s: sort the A
assignments by expert, run each expert once on its contiguous slice, scale by the combine weight
and scatter-add back. No token is dropped and no capacity factor is needed.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.blocks.mlp import SwiGLU


@dataclass
class RouterStats:
    """What one MoE layer reports per forward pass (all detached but `aux_loss`)."""

    load_E: torch.Tensor  # assignments per expert (float counts)
    max_vio: torch.Tensor  # (max load - mean load) / mean load
    entropy: torch.Tensor  # mean per-token entropy of the router distribution, nats
    aux_loss: torch.Tensor  # weighted auxiliary loss, part of the training loss


def _grouped_mm_available(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def dropless_dispatch(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every token through its K experts; returns the combined output (T, D) and counts (E,)."""
    T, K = experts_TK.shape
    E = gate_up_E2FD.shape[0]
    flat_experts_A = experts_TK.reshape(-1)
    order_A = flat_experts_A.argsort(stable=True)  # assignments grouped by expert
    token_A = order_A // K  # which token each sorted assignment came from
    counts_E = torch.bincount(flat_experts_A, minlength=E)
    x_AD = x_TD[token_A]  # (A, D)

    if _grouped_mm_available(x_TD):
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        gate_up_A2F = torch._grouped_mm(x_AD, gate_up_E2FD.transpose(-2, -1), offs=offsets_E)
        gate_AF, up_AF = gate_up_A2F.chunk(2, dim=-1)
        out_AD = torch._grouped_mm(F.silu(gate_AF) * up_AF, down_EDF.transpose(-2, -1), offs=offsets_E)
    else:
        outs = []
        for e, x_nD in enumerate(x_AD.split(counts_E.tolist())):
            if x_nD.shape[0] == 0:
                continue
            gate_nF, up_nF = F.linear(x_nD, gate_up_E2FD[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate_nF) * up_nF, down_EDF[e]))
        out_AD = torch.cat(outs) if outs else x_AD.new_zeros(0, x_TD.shape[-1])

    out_AD = out_AD * weights_TK.reshape(-1)[order_A, None].to(out_AD.dtype)
    y_TD = torch.zeros_like(x_TD).index_add_(0, token_A, out_AD.to(x_TD.dtype))
    return y_TD, counts_E


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
