"""The FFN layout `deepseek_v3` and `glm4_moe` share: the first `first_k_dense_replace` layers a dense
SwiGLU, every later layer an MoE with sigmoid group-limited routing (`sigmoid_group_topk`) and shared
experts."""

from __future__ import annotations

from typing import Any

from zoo.interop.families.common import Layout, make
from zoo.overrides import SpecError
from zoo.specs import MLPSpec, MoESpec, SigmoidGroupTopKRouterSpec


def check_deepseek_fields(config: Any) -> None:
    """Fields of DeepSeek's original code that transformers ignores: any other value means another model."""
    allowed = {
        "scoring_func": ("sigmoid", "the routers score experts with a sigmoid"),
        "topk_method": ("noaux_tc", "experts are picked by score + correction bias within the best groups"),
        "moe_layer_freq": (1, "every layer after first_k_dense_replace is an MoE"),
    }
    for field, (value_ok, why) in allowed.items():
        value = getattr(config, field, None)
        if value is not None and value != value_ok:
            raise SpecError(f"config.json {field}={value!r} is not supported: only {value_ok!r} ({why})")
    for field in ("mlp_layer_types", "layer_types"):
        value = getattr(config, field, None)
        if value is not None and any(kind != "full_attention" for kind in value):
            raise SpecError(f"config.json {field}={value!r}: per-layer types are not supported")


def ffn_from_hf(config: Any) -> dict[str, Any]:
    """The ModelSpec fields ffn, first_k_dense and dense_ffn."""
    n_layers = config.num_hidden_layers
    n_dense = min(config.first_k_dense_replace or 0, n_layers)  # transformers: layer i is MoE iff i >= k
    dense = make(MLPSpec, "intermediate_size", d_hidden=config.intermediate_size) if n_dense else None
    if n_dense == n_layers:
        return dict(ffn=dense, first_k_dense=0, dense_ffn=None)  # every layer dense: the MoE fields are unused
    router = make(
        SigmoidGroupTopKRouterSpec, "routing fields (n_group, topk_group, routed_scaling_factor)",
        n_groups=config.n_group or 1,
        topk_groups=config.topk_group or 1,
        norm_topk_prob=bool(config.norm_topk_prob),
        routed_scaling_factor=config.routed_scaling_factor,
    )
    ffn = make(
        MoESpec, "MoE fields (n_routed_experts, num_experts_per_tok, moe_intermediate_size, n_group)",
        n_experts=config.n_routed_experts,
        top_k=config.num_experts_per_tok,
        d_expert=config.moe_intermediate_size,
        n_shared_experts=config.n_shared_experts or 0,
        router=router,
    )
    return dict(ffn=ffn, first_k_dense=n_dense, dense_ffn=dense)


def ffn_to_hf(layout: Layout, model_type: str, *, overridden: bool) -> dict[str, Any]:
    """config.json's FFN fields; `overridden`: the spec has overrides (for the error's wording)."""
    n_dense = len(layout.dense_layers)
    if layout.dense_layers != tuple(range(n_dense)):
        cause = "model.overrides" if overridden else "model.first_k_dense / model.dense_ffn / model.ffn"
        raise SpecError(
            f"{cause}: dense layers {list(layout.dense_layers)} break the layout {model_type} can express: the first "
            "first_k_dense_replace layers one dense MLP, every later layer one MoE"
        )
    dense, moe = layout.dense, layout.moe
    if moe is not None:
        router = moe.router
        if router.n_groups > 1 and moe.n_experts // router.n_groups < 2:
            raise SpecError(f"model.ffn.router.n_groups={router.n_groups}: {model_type} scores a group by its top-2 "
                            f"experts, so groups need >= 2 of the {moe.n_experts} experts")
        fields = dict(
            n_routed_experts=moe.n_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.d_expert,
            n_shared_experts=moe.n_shared_experts, n_group=router.n_groups, topk_group=router.topk_groups,
            norm_topk_prob=router.norm_topk_prob, routed_scaling_factor=router.routed_scaling_factor,
        )
    else:  # every layer dense: first_k_dense_replace = n_layers, and the MoE fields are placeholders
        fields = dict(
            n_routed_experts=1, num_experts_per_tok=1, moe_intermediate_size=dense.d_hidden, n_shared_experts=0,
            n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        )
    return dict(
        fields,
        intermediate_size=dense.d_hidden if dense else moe.d_expert,  # unused without dense layers
        first_k_dense_replace=n_dense,
    )
