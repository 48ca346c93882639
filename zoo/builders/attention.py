"""Attention builders: `mha` (MHA/GQA/MQA) and `mla`, each with its RoPE table."""

import fiddle as fdl

from zoo.blocks.mha import MultiHeadAttention
from zoo.blocks.mla import MultiHeadLatentAttention
from zoo.blocks.rope import RotaryEmbedding
from zoo.builders.registry import register
from zoo.specs import MHASpec, MLASpec, RopeSpec

# transformers' DeepSeek-V3 creates its latent RMSNorms with the default eps, whatever rms_norm_eps says.
MLA_LATENT_NORM_EPS = 1e-6


def rope_config(spec: RopeSpec, *, dim: int) -> fdl.Config:
    scaling = spec.scaling
    config = fdl.Config(RotaryEmbedding, dim=dim, theta=spec.theta, scaling=scaling.kind)
    for name in ("factor", "original_max_seq_len", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"):
        if hasattr(scaling, name):
            setattr(config, name, getattr(scaling, name))
    return config


@register("attention", "mha")
def mha(spec: MHASpec, *, d_model: int, norm_eps: float) -> fdl.Config:
    return fdl.Config(
        MultiHeadAttention,
        d_model=d_model,
        n_heads=spec.n_heads,
        n_kv_heads=spec.kv_heads(),
        head_dim=spec.resolved_head_dim(d_model),
        rope=rope_config(spec.rope, dim=spec.rotary_dim(d_model)),
        qk_norm=spec.qk_norm,
        qkv_bias=spec.qkv_bias,
        norm_eps=norm_eps,
    )


@register("attention", "mla")
def mla(spec: MLASpec, *, d_model: int, norm_eps: float) -> fdl.Config:
    return fdl.Config(
        MultiHeadLatentAttention,
        d_model=d_model,
        n_heads=spec.n_heads,
        q_lora_rank=spec.q_lora_rank,
        kv_lora_rank=spec.kv_lora_rank,
        qk_nope_head_dim=spec.qk_nope_head_dim,
        qk_rope_head_dim=spec.qk_rope_head_dim,
        v_head_dim=spec.v_head_dim,
        rope=rope_config(spec.rope, dim=spec.qk_rope_head_dim),
        rope_layout=spec.rope_layout,
        bias=spec.attention_bias,
        latent_norm_eps=MLA_LATENT_NORM_EPS,
    )
