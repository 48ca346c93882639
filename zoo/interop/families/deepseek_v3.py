"""`deepseek_v3` (DeepseekV3ForCausalLM): MLA attention, then the DeepSeek MoE layout
(zoo/interop/families/deepseek_moe.py).

`num_key_value_heads` is not carried: MLA gives every head its own key, the field changes no weight;
export writes n_heads.
"""

from __future__ import annotations

from typing import Any

from zoo.interop.families.common import Family, Layout, make
from zoo.interop.families.deepseek_moe import check_deepseek_fields, ffn_from_hf, ffn_to_hf
from zoo.interop.families.rope import rope_from_hf, rope_to_hf
from zoo.specs import MLASpec, ModelSpec

MODEL_TYPE = "deepseek_v3"


def model_fields(config: Any) -> dict[str, Any]:
    check_deepseek_fields(config)
    rope, _ = rope_from_hf(config, partial_rotary=False, softmax_mscale=True)
    attention = make(
        MLASpec, "MLA fields (q_lora_rank, kv_lora_rank, qk_*_head_dim, v_head_dim)",
        n_heads=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        rope_layout="interleaved" if config.rope_interleave else "half",
        attention_bias=bool(config.attention_bias),
        rope=rope,
    )
    return dict(attention=attention, **ffn_from_hf(config))


def config_fields(spec: ModelSpec, layout: Layout) -> dict[str, Any]:
    attention = layout.attention
    return dict(
        num_attention_heads=attention.n_heads,
        num_key_value_heads=attention.n_heads,
        q_lora_rank=attention.q_lora_rank,
        kv_lora_rank=attention.kv_lora_rank,
        qk_nope_head_dim=attention.qk_nope_head_dim,
        qk_rope_head_dim=attention.qk_rope_head_dim,
        v_head_dim=attention.v_head_dim,
        rope_interleave=attention.rope_layout == "interleaved",
        attention_bias=attention.attention_bias,
        rope_parameters=rope_to_hf(attention.rope, spec, where="model.attention.rope", model_type=MODEL_TYPE,
                                   softmax_mscale=True),
        **ffn_to_hf(layout, MODEL_TYPE, overridden=bool(spec.overrides)),
        num_nextn_predict_layers=spec.mtp.depth,  # the MTP modules' layers (zoo.interop.hf_mtp)
    )


FAMILY = Family(
    MODEL_TYPE, "DeepseekV3ForCausalLM", model_fields, config_fields,
    attention_names={"q_a_norm": "q_a_layernorm", "kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm"},
    empty_shared_experts=True,
)
