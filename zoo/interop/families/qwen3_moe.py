"""`qwen3_moe` (Qwen3MoeForCausalLM, Qwen3-30B-A3B and Qwen3-235B-A22B): GQA with per-head q/k RMSNorm,
then softmax top-k MoE layers (`softmax_topk`, renormalised when norm_topk_prob) without shared experts.

A layer is an MoE unless it is listed in `mlp_only_layers` or `(index + 1) % decoder_sparse_step != 0`;
the others are dense SwiGLUs of `intermediate_size`. Import makes those dense layers `first_k_dense` when
they lead, else one override listing them; export lists them in mlp_only_layers (decoder_sparse_step 1).
One `attention_bias` covers q/k/v and the output projection. A sliding window applies to every layer.
"""

from __future__ import annotations

from typing import Any

from zoo.interop.families.common import (
    Family,
    Layout,
    check_no_mtp,
    check_softmax_moe,
    dense_layer_fields,
    make,
    require,
)
from zoo.interop.families.mha import mha_from_hf, mha_to_hf
from zoo.overrides import SpecError
from zoo.specs import MLPSpec, ModelSpec, MoESpec, SoftmaxTopKRouterSpec

MODEL_TYPE = "qwen3_moe"


def model_fields(config: Any) -> dict[str, Any]:
    bias = bool(config.attention_bias)
    attention = mha_from_hf(config, partial_rotary=False, qk_norm="head", qkv_bias=bias, o_bias=bias,
                            sliding_window=config.sliding_window)  # None unless use_sliding_window
    n_layers, step = config.num_hidden_layers, config.decoder_sparse_step
    if step < 1:
        raise SpecError(f"config.json decoder_sparse_step={step}: must be >= 1 (every step-th layer is an MoE)")
    moe_layers = [i for i in range(n_layers)
                  if i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % step == 0]
    dense_layers = [i for i in range(n_layers) if i not in moe_layers]
    dense = make(MLPSpec, "intermediate_size", d_hidden=config.intermediate_size) if dense_layers else None
    if not moe_layers:
        return dict(attention=attention, ffn=dense)
    moe = make(
        MoESpec, "MoE fields (num_experts, num_experts_per_tok, moe_intermediate_size)",
        n_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        d_expert=config.moe_intermediate_size,
        router=SoftmaxTopKRouterSpec(norm_topk_prob=bool(config.norm_topk_prob)),
    )
    return dict(attention=attention, ffn=moe, **dense_layer_fields(dense_layers, dense))


def config_fields(spec: ModelSpec, layout: Layout) -> dict[str, Any]:
    attention, dense, moe = layout.attention, layout.dense, layout.moe
    check_no_mtp(spec, MODEL_TYPE)
    require(attention.qk_norm, "head", "model.attention.qk_norm", MODEL_TYPE,
            "normalises q and k per head; set it to 'head'")
    require(attention.o_bias, attention.qkv_bias, "model.attention.o_bias", MODEL_TYPE,
            f"has one attention_bias for q/k/v and the output; set it to qkv_bias ({attention.qkv_bias})")
    require(attention.rotary_fraction, 1.0, "model.attention.rotary_fraction", MODEL_TYPE,
            "rotates every head dim; set it to 1.0")
    if moe is not None:
        check_softmax_moe(moe, MODEL_TYPE)
        experts = dict(num_experts=moe.n_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.d_expert,
                       norm_topk_prob=moe.router.norm_topk_prob)
    else:  # every layer dense: all in mlp_only_layers, and the MoE fields are placeholders
        experts = dict(num_experts=1, num_experts_per_tok=1, moe_intermediate_size=dense.d_hidden,
                       norm_topk_prob=False)
    return dict(
        mha_to_hf(spec, attention, MODEL_TYPE),
        attention_bias=attention.qkv_bias,
        use_sliding_window=attention.sliding_window is not None,
        sliding_window=attention.sliding_window,
        intermediate_size=dense.d_hidden if dense else moe.d_expert,  # unused without dense layers
        decoder_sparse_step=1,
        mlp_only_layers=list(layout.dense_layers),
        **experts,
    )


FAMILY = Family(MODEL_TYPE, "Qwen3MoeForCausalLM", model_fields, config_fields,
                resembles=lambda layout: layout.attention.qk_norm == "head")
