"""`mixtral` (MixtralForCausalLM, Mixtral-8x7B and 8x22B): plain GQA (no q/k norm, no bias), a sliding
window when `sliding_window` is set, then a softmax top-k MoE in every layer whose top-k weights are
renormalised (softmax over the selected logits: `softmax_topk` with norm_topk_prob), experts of
`intermediate_size`, no shared experts.

Released checkpoints name the MoE `block_sparse_moe` and each expert's projections w1 (gate), w3 (up)
and w2 (down). `router_jitter_noise` (multiplicative noise on the MoE input while training) is not
carried: the zoo's router has Gaussian noise on the logits instead (router.noise_std).
"""

from __future__ import annotations

from typing import Any

from zoo.interop.families.common import Family, Layout, check_no_mtp, check_softmax_moe, make, require
from zoo.interop.families.mha import mha_from_hf, mha_to_hf
from zoo.specs import ModelSpec, MoESpec, SoftmaxTopKRouterSpec

MODEL_TYPE = "mixtral"


def model_fields(config: Any) -> dict[str, Any]:
    attention = mha_from_hf(config, partial_rotary=False, sliding_window=config.sliding_window)
    moe = make(
        MoESpec, "MoE fields (num_local_experts, num_experts_per_tok, intermediate_size)",
        n_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        d_expert=config.intermediate_size,
        router=SoftmaxTopKRouterSpec(norm_topk_prob=True),
    )
    return dict(attention=attention, ffn=moe)


def config_fields(spec: ModelSpec, layout: Layout) -> dict[str, Any]:
    attention, moe = layout.attention, layout.moe
    check_no_mtp(spec, MODEL_TYPE)
    require(attention.qk_norm, None, "model.attention.qk_norm", MODEL_TYPE, "has no q/k norm; set it to null")
    require(attention.qkv_bias, False, "model.attention.qkv_bias", MODEL_TYPE, "has no attention bias; set it to false")
    require(attention.o_bias, False, "model.attention.o_bias", MODEL_TYPE, "has no attention bias; set it to false")
    require(attention.rotary_fraction, 1.0, "model.attention.rotary_fraction", MODEL_TYPE,
            "rotates every head dim; set it to 1.0")
    check_softmax_moe(moe, MODEL_TYPE)
    require(moe.router.norm_topk_prob, True, "model.ffn.router.norm_topk_prob", MODEL_TYPE,
            "renormalises the top-k weights (a softmax over the selected logits); set it to true")
    return dict(
        mha_to_hf(spec, attention, MODEL_TYPE),
        sliding_window=attention.sliding_window,
        num_local_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k,
        intermediate_size=moe.d_expert,
    )


FAMILY = Family(MODEL_TYPE, "MixtralForCausalLM", model_fields, config_fields,
                moe_module="block_sparse_moe", expert_names=("w1", "w3", "w2"),
                resembles=lambda layout: layout.attention.qk_norm is None)
