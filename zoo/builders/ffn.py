"""FFN builders (`mlp`, `moe`) and router builders (`softmax_topk`, `sigmoid_group_topk`)."""

import fiddle as fdl

from zoo.blocks.mlp import SwiGLU
from zoo.blocks.moe import MoE
from zoo.blocks.routers import SigmoidGroupTopKRouter, SoftmaxTopKRouter
from zoo.builders.registry import build_slot, register
from zoo.specs import MLPSpec, MoESpec, SigmoidGroupTopKRouterSpec, SoftmaxTopKRouterSpec


@register("ffn", "mlp")
def mlp(spec: MLPSpec, *, d_model: int) -> fdl.Config:
    return fdl.Config(SwiGLU, d_model=d_model, d_hidden=spec.d_hidden)


@register("ffn", "moe")
def moe(spec: MoESpec, *, d_model: int) -> fdl.Config:
    router = build_slot("router", spec.router, d_model=d_model, n_experts=spec.n_experts, top_k=spec.top_k)
    return fdl.Config(
        MoE,
        d_model=d_model,
        n_experts=spec.n_experts,
        d_expert=spec.d_expert,
        router=router,
        n_shared_experts=spec.n_shared_experts,
    )


@register("router", "softmax_topk")
def softmax_topk(spec: SoftmaxTopKRouterSpec, *, d_model: int, n_experts: int, top_k: int) -> fdl.Config:
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


@register("router", "sigmoid_group_topk")
def sigmoid_group_topk(
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
