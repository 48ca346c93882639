"""`glm4_moe` (Glm4MoeForCausalLM, GLM-4.5): GQA with partial rotary, q/k/v bias and per-head q/k
RMSNorm, then the DeepSeek MoE layout (zoo/interop/families/deepseek_moe.py)."""

from __future__ import annotations

from typing import Any

from zoo.interop.families.common import Family, Layout, require
from zoo.interop.families.deepseek_moe import check_deepseek_fields, ffn_from_hf, ffn_to_hf
from zoo.interop.families.mha import mha_from_hf, mha_to_hf
from zoo.specs import ModelSpec

MODEL_TYPE = "glm4_moe"


def model_fields(config: Any) -> dict[str, Any]:
    check_deepseek_fields(config)
    attention = mha_from_hf(config, partial_rotary=True, qk_norm="head" if config.use_qk_norm else None,
                            qkv_bias=bool(config.attention_bias))
    return dict(attention=attention, **ffn_from_hf(config))


def config_fields(spec: ModelSpec, layout: Layout) -> dict[str, Any]:
    attention = layout.attention
    require(attention.qk_norm, (None, "head"), "model.attention.qk_norm", MODEL_TYPE,
            "normalises q and k per head or not at all; set it to 'head' or null")
    require(attention.o_bias, False, "model.attention.o_bias", MODEL_TYPE, "has no output bias; set it to false")
    require(attention.sliding_window, None, "model.attention.sliding_window", MODEL_TYPE,
            "has no sliding window; set it to null")
    fields = mha_to_hf(spec, attention, MODEL_TYPE)
    fields["rope_parameters"]["partial_rotary_factor"] = attention.rotary_fraction  # glm4_moe defaults to 0.5
    return dict(
        fields,
        use_qk_norm=attention.qk_norm == "head",
        attention_bias=attention.qkv_bias,
        **ffn_to_hf(layout, MODEL_TYPE, overridden=bool(spec.overrides)),
        num_nextn_predict_layers=spec.mtp.depth,  # the MTP modules' layers (zoo.interop.hf_mtp)
    )


FAMILY = Family(MODEL_TYPE, "Glm4MoeForCausalLM", model_fields, config_fields, empty_shared_experts=True,
                resembles=lambda layout: layout.attention.qk_norm in (None, "head"))
