"""The GQA attention fields `glm4_moe`, `qwen3_moe`, `olmoe` and `mixtral` share (heads, head_dim,
RoPE); each format's module says which of the `mha` kind's options (q/k norm, biases, partial rotary,
sliding window) it has."""

from __future__ import annotations

from typing import Any

from zoo.interop.families.common import make
from zoo.interop.families.rope import rope_from_hf, rope_to_hf
from zoo.specs import MHASpec, ModelSpec


def mha_from_hf(config: Any, *, partial_rotary: bool, **options: Any) -> MHASpec:
    """The MHASpec of `config`'s heads and RoPE, plus `options` (MHASpec fields the format fixes or reads
    elsewhere: qk_norm, qkv_bias, o_bias, sliding_window). `partial_rotary`: as in rope_from_hf."""
    rope, fraction = rope_from_hf(config, partial_rotary=partial_rotary, softmax_mscale=False)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary_fraction = int(head_dim * fraction) / head_dim  # transformers rotates int(head_dim * factor) dims
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    return make(
        MHASpec, "attention fields (num_attention_heads, num_key_value_heads, head_dim)",
        n_heads=config.num_attention_heads,
        n_kv_heads=None if kv_heads == config.num_attention_heads else kv_heads,
        head_dim=head_dim,
        rotary_fraction=rotary_fraction,
        rope=rope,
        **options,
    )


def mha_to_hf(spec: ModelSpec, attention: MHASpec, model_type: str) -> dict[str, Any]:
    """config.json's head and RoPE fields."""
    return dict(
        num_attention_heads=attention.n_heads,
        num_key_value_heads=attention.kv_heads(),
        head_dim=attention.resolved_head_dim(spec.d_model),
        rope_parameters=rope_to_hf(attention.rope, spec, where="model.attention.rope", model_type=model_type,
                                   softmax_mscale=False),
    )
