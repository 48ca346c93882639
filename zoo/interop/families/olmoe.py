"""`olmoe` (OlmoeForCausalLM, OLMoE-1B-7B): attention with RMSNorm over the whole q and k projections
(all heads at once), then a softmax top-k MoE (`softmax_topk`, renormalised when norm_topk_prob) in
every layer, experts of `intermediate_size`, no shared experts. One `attention_bias` covers q/k/v and
the output projection. The q norm spans hidden_size, so head_dim is d_model // n_heads.
"""

from __future__ import annotations

from typing import Any

from zoo.interop.families.common import Family, Layout, check_no_mtp, check_softmax_moe, make, require
from zoo.interop.families.mha import mha_from_hf, mha_to_hf
from zoo.overrides import SpecError
from zoo.specs import ModelSpec, MoESpec, SoftmaxTopKRouterSpec

MODEL_TYPE = "olmoe"


def model_fields(config: Any) -> dict[str, Any]:
    if config.clip_qkv is not None:
        raise SpecError(f"config.json clip_qkv={config.clip_qkv}: the zoo does not clip q, k and v; "
                        "only checkpoints with clip_qkv null import")
    bias = bool(config.attention_bias)
    attention = mha_from_hf(config, partial_rotary=False, qk_norm="projection", qkv_bias=bias, o_bias=bias)
    moe = make(
        MoESpec, "MoE fields (num_experts, num_experts_per_tok, intermediate_size)",
        n_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        d_expert=config.intermediate_size,
        router=SoftmaxTopKRouterSpec(norm_topk_prob=bool(config.norm_topk_prob)),
    )
    return dict(attention=attention, ffn=moe)


def config_fields(spec: ModelSpec, layout: Layout) -> dict[str, Any]:
    attention, moe = layout.attention, layout.moe
    check_no_mtp(spec, MODEL_TYPE)
    require(attention.qk_norm, "projection", "model.attention.qk_norm", MODEL_TYPE,
            "normalises the whole q and k projections; set it to 'projection'")
    require(attention.o_bias, attention.qkv_bias, "model.attention.o_bias", MODEL_TYPE,
            f"has one attention_bias for q/k/v and the output; set it to qkv_bias ({attention.qkv_bias})")
    require(attention.rotary_fraction, 1.0, "model.attention.rotary_fraction", MODEL_TYPE,
            "rotates every head dim; set it to 1.0")
    require(attention.sliding_window, None, "model.attention.sliding_window", MODEL_TYPE,
            "has no sliding window; set it to null")
    head_dim = attention.resolved_head_dim(spec.d_model)
    require(head_dim * attention.n_heads, spec.d_model, "model.attention.head_dim x n_heads", MODEL_TYPE,
            f"sizes its q norm by hidden_size, so head_dim must be d_model / n_heads ({spec.d_model} / "
            f"{attention.n_heads}); set head_dim to null")
    check_softmax_moe(moe, MODEL_TYPE)
    fields = mha_to_hf(spec, attention, MODEL_TYPE)
    del fields["head_dim"]  # not an olmoe field: hidden_size // num_attention_heads
    return dict(
        fields,
        attention_bias=attention.qkv_bias,
        clip_qkv=None,
        num_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k,
        intermediate_size=moe.d_expert,
        norm_topk_prob=moe.router.norm_topk_prob,
    )


FAMILY = Family(MODEL_TYPE, "OlmoeForCausalLM", model_fields, config_fields,
                resembles=lambda layout: layout.attention.qk_norm == "projection")
