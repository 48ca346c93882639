"""Token-to-expert routers. Routing runs in fp32 whatever the model dtype, under autocast too.

Legend: B = batch, S = sequence, T = B*S tokens, D = d_model, E = experts, K = experts per token,
G = expert groups.

A router maps hidden states (B, S, D) to `Routing`: for each token, K expert indices and their
combine weights, the auxiliary loss it adds to the LM loss, and the per-expert probabilities its
statistics (entropy) are read from.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    weights_TK: torch.Tensor  # fp32 combine weights
    experts_TK: torch.Tensor  # int64 expert indices
    aux_loss: torch.Tensor  # scalar, already weighted
    probs_TE: torch.Tensor  # fp32, rows sum to 1: the router's distribution over experts


def _fp32_routing(x: torch.Tensor) -> torch.autocast:
    # Autocast recasts a linear to bf16 whatever its inputs' dtype; bf16 logits (8-bit mantissa) gave
    # 12-23% of tokens another expert set in 64-expert top-6 grouped routers.
    return torch.autocast(device_type=x.device.type, enabled=False)


class Router(nn.Module):
    """What every router is. Its parameters (the gate) train on AdamW, not Muon, whatever their shape. A
    router with an auxiliary-loss-free bias sets `has_routing_bias`, holds the bias in the buffer
    `e_score_correction_bias` (logged to TensorBoard) and implements `update_bias`."""

    has_routing_bias = False
    n_experts: int
    top_k: int

    def update_bias(self, load_E: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no routing bias")


class SoftmaxTopKRouter(Router):
    """Softmax over E logits, keep the top K (Switch Transformer, GShard, Mixtral).

    Auxiliary losses: the Switch balance loss E * sum_e f_e * P_e (Fedus et al., 2021, eq. 4), with
    f_e the fraction of the T*K assignments sent to e and P_e its mean probability; and the router
    z-loss mean(logsumexp(logits)^2) (Zoph et al., 2022, ST-MoE eq. 5).
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_experts: int,
        top_k: int,
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
        noise_std: float = 0.0,
        norm_topk_prob: bool = False,
    ):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        self.noise_std, self.norm_topk_prob = noise_std, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))

    def forward(self, x_BSD: torch.Tensor) -> Routing:
        with _fp32_routing(x_BSD):
            return self._route(x_BSD)

    def _route(self, x_BSD: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_BSD.reshape(-1, x_BSD.shape[-1]).float(), self.weight.float())
        if self.training and self.noise_std > 0:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * self.noise_std  # noisy top-k gating
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        aux_loss = logits_TE.new_zeros(())
        if self.balance_loss_weight > 0:
            assigned_E = torch.zeros_like(probs_TE[0]).scatter_add_(
                0, experts_TK.reshape(-1), torch.ones_like(weights_TK).reshape(-1)
            )
            fraction_E = assigned_E / experts_TK.numel()
            aux_loss = aux_loss + self.balance_loss_weight * self.n_experts * (fraction_E * probs_TE.mean(0)).sum()
        if self.z_loss_weight > 0:
            aux_loss = aux_loss + self.z_loss_weight * logits_TE.logsumexp(dim=-1).square().mean()
        return Routing(weights_TK, experts_TK, aux_loss, probs_TE)


class SigmoidGroupTopKRouter(Router):
    """DeepSeek-V3 routing (arXiv:2412.19437, section 2.1.2), also used by GLM-4.5.

    Scores s = sigmoid(logits). Selection uses s + b, with b = `e_score_correction_bias`, which
    never enters the combine weights. With G > 1 groups, a group scores by the sum of its top-2
    biased scores and only the `topk_groups` best groups are eligible. Weights are the chosen s,
    normalised to sum 1 if `norm_topk_prob`, then multiplied by `routed_scaling_factor`.

    Balancing is auxiliary-loss-free: after each optimizer step the trainer calls `update_bias`
    with the loads summed over the accumulation window and data-parallel ranks, and
    b += rate * sign(mean load - load). An optional sequence-wise balance loss (eq. 17-20) guards
    against extreme imbalance within one sequence.
    """

    has_routing_bias = True

    def __init__(
        self,
        *,
        d_model: int,
        n_experts: int,
        top_k: int,
        n_groups: int = 1,
        topk_groups: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        bias_update_rate: float = 0.0,
        seq_aux_loss_weight: float = 0.0,
    ):
        super().__init__()
        if n_experts % n_groups:
            raise ValueError(f"n_groups ({n_groups}) must divide n_experts ({n_experts})")
        self.n_experts, self.top_k = n_experts, top_k
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.bias_update_rate, self.seq_aux_loss_weight = bias_update_rate, seq_aux_loss_weight
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))

    def _apply(self, fn, recurse=True):
        # Keep the bias in fp32 when the model is cast to bf16: its steps (~1e-3) would round away.
        super()._apply(fn, recurse)
        self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x_BSD: torch.Tensor) -> Routing:
        with _fp32_routing(x_BSD):
            return self._route(x_BSD)

    def _route(self, x_BSD: torch.Tensor) -> Routing:
        B, S, D = x_BSD.shape
        logits_TE = F.linear(x_BSD.reshape(-1, D).float(), self.weight.float())
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE + self.e_score_correction_bias
        if self.n_groups > 1:
            per_group = self.n_experts // self.n_groups
            group_TGe = choice_TE.view(-1, self.n_groups, per_group)
            group_scores_TG = group_TGe.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
            top_groups_TG = group_scores_TG.topk(self.topk_groups, dim=-1).indices
            allowed_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
            allowed_TE = allowed_TG.unsqueeze(-1).expand(-1, -1, per_group).reshape(-1, self.n_experts)
            choice_TE = choice_TE.masked_fill(~allowed_TE, float("-inf"))
        experts_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.routed_scaling_factor

        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        aux_loss = logits_TE.new_zeros(())
        if self.seq_aux_loss_weight > 0:
            # Per sequence: f_e = E / (K * S) * (tokens choosing e), P_e = mean normalised score.
            chosen_BSE = torch.zeros_like(scores_TE).scatter_(1, experts_TK, 1.0).view(B, S, -1)
            f_BE = chosen_BSE.sum(dim=1) * self.n_experts / (self.top_k * S)
            p_BE = probs_TE.view(B, S, -1).mean(dim=1)
            aux_loss = aux_loss + self.seq_aux_loss_weight * (f_BE * p_BE).sum(dim=-1).mean()
        return Routing(weights_TK, experts_TK, aux_loss, probs_TE)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing step: raise the bias of under-loaded experts, lower the others."""
        load_E = load_E.to(self.e_score_correction_bias)
        self.e_score_correction_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
