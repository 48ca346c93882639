"""`glm4_moe` (Glm4MoeForCausalLM, GLM-4.5): GQA with partial rotary, q/k/v bias and per-head q/k
RMSNorm, then the DeepSeek MoE layout (zoo/interop/families/deepseek_moe.py)."""

from __future__ import annotations

from typing import Any

from zoo.interop.families.common import Family, Layout, make
from zoo.interop.families.deepseek_moe import check_deepseek_fields, ffn_from_hf, ffn_to_hf
from zoo.interop.families.rope import rope_from_hf, rope_to_hf
from zoo.specs import MHASpec, ModelSpec

MODEL_TYPE = "glm4_moe"


def model_fields(config: Any) -> dict[str, Any]:
    check_deepseek_fields(config)
    rope, rotary_fraction = rope_from_hf(config, partial_rotary=True, softmax_mscale=False)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    attention = make(
        MHASpec, "attention fields (num_attention_heads, num_key_value_heads, head_dim)",
        n_heads=config.num_attention_heads,
        n_kv_heads=None if kv_heads == config.num_attention_heads else kv_heads,
        head_dim=head_dim,
        qk_norm=bool(config.use_qk_norm),
        qkv_bias=bool(config.attention_bias),
        rotary_fraction=rotary_fraction,
        rope=rope,
    )
    return dict(attention=attention, **ffn_from_hf(config))


def config_fields(spec: ModelSpec, layout: Layout) -> dict[str, Any]:
    attention = layout.attention
    rope = rope_to_hf(attention.rope, spec, where="model.attention.rope", model_type=MODEL_TYPE,
                      softmax_mscale=False)
    rope["partial_rotary_factor"] = attention.rotary_fraction  # always written: glm4_moe defaults to 0.5
    return dict(
        num_attention_heads=attention.n_heads,
        num_key_value_heads=attention.kv_heads(),
        head_dim=attention.resolved_head_dim(spec.d_model),
        use_qk_norm=attention.qk_norm,
        attention_bias=attention.qkv_bias,
        rope_parameters=rope,
        **ffn_to_hf(layout, MODEL_TYPE, overridden=bool(spec.overrides)),
    )


FAMILY = Family(MODEL_TYPE, "Glm4MoeForCausalLM", model_fields, config_fields, empty_shared_experts=True)
