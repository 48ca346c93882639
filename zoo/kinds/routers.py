"""Router kinds: `softmax_topk` (Switch/GShard, Mixtral, Qwen3-MoE, OLMoE) and `sigmoid_group_topk` (DeepSeek-V3,
GLM-4.5)."""

from __future__ import annotations

from typing import Literal

import fiddle as fdl
from pydantic import Field, model_validator

from zoo.blocks.routers import SigmoidGroupTopKRouter, SoftmaxTopKRouter
from zoo.kinds.registry import Kind, Spec, register


class SoftmaxTopKRouterSpec(Spec):
    """Softmax over experts, top-k; Switch/GShard balance loss and ST-MoE z-loss. With `norm_topk_prob` the
    K weights are renormalised to sum to 1: a softmax over the K selected logits (Mixtral)."""

    kind: Literal["softmax_topk"] = "softmax_topk"
    balance_loss_weight: float = Field(0.01, ge=0.0)
    z_loss_weight: float = Field(0.0, ge=0.0)
    noise_std: float = Field(0.0, ge=0.0, description="Gaussian noise on logits while training")
    norm_topk_prob: bool = False


class SigmoidGroupTopKRouterSpec(Spec):
    """DeepSeek-V3 / GLM-4.5 routing: sigmoid scores, bias for selection only, group-limited top-k."""

    kind: Literal["sigmoid_group_topk"] = "sigmoid_group_topk"
    n_groups: int = Field(1, ge=1)
    topk_groups: int = Field(1, ge=1)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = Field(1.0, gt=0.0)
    bias_update_rate: float = Field(1e-3, ge=0.0, description="aux-loss-free balancing step")
    seq_aux_loss_weight: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _groups(self) -> SigmoidGroupTopKRouterSpec:
        if self.topk_groups > self.n_groups:
            raise ValueError(
                f"topk_groups ({self.topk_groups}) must be <= n_groups ({self.n_groups}); "
                f"set topk_groups to at most {self.n_groups}"
            )
        return self


def build_softmax_topk(spec: SoftmaxTopKRouterSpec, *, d_model: int, n_experts: int, top_k: int) -> fdl.Config:
    return fdl.Config(
        SoftmaxTopKRouter,
        d_model=d_model,
        n_experts=n_experts,
        top_k=top_k,
        balance_loss_weight=spec.balance_loss_weight,
        z_loss_weight=spec.z_loss_weight,
        noise_std=spec.noise_std,
        norm_topk_prob=spec.norm_topk_prob,
    )


def build_sigmoid_group_topk(
    spec: SigmoidGroupTopKRouterSpec, *, d_model: int, n_experts: int, top_k: int
) -> fdl.Config:
    return fdl.Config(
        SigmoidGroupTopKRouter,
        d_model=d_model,
        n_experts=n_experts,
        top_k=top_k,
        n_groups=spec.n_groups,
        topk_groups=spec.topk_groups,
        norm_topk_prob=spec.norm_topk_prob,
        routed_scaling_factor=spec.routed_scaling_factor,
        bias_update_rate=spec.bias_update_rate,
        seq_aux_loss_weight=spec.seq_aux_loss_weight,
    )


def check_groups(spec: SigmoidGroupTopKRouterSpec, *, n_experts: int, top_k: int) -> None:
    if n_experts % spec.n_groups:
        raise ValueError(f"router.n_groups ({spec.n_groups}) must divide n_experts ({n_experts}); pick a divisor")
    reachable = spec.topk_groups * (n_experts // spec.n_groups)
    if top_k > reachable:
        raise ValueError(
            f"top_k ({top_k}) exceeds the {reachable} experts in the router.topk_groups "
            f"({spec.topk_groups}) chosen groups; raise topk_groups or lower top_k"
        )


# The MoE's shrink rule keeps group-limited routing valid (zoo/kinds/moe.py); routers have no size of their own.
register(Kind("router", SoftmaxTopKRouterSpec, build=build_softmax_topk,
              hf_formats=("qwen3_moe", "olmoe", "mixtral")))
register(Kind("router", SigmoidGroupTopKRouterSpec, build=build_sigmoid_group_topk,
              check=check_groups, hf_formats=("deepseek_v3", "glm4_moe")))
