"""The `mla` attention kind: multi-head latent attention (DeepSeek-V2/V3)."""

from __future__ import annotations

from typing import Literal

import fiddle as fdl
from pydantic import Field, model_validator

from zoo.blocks.mla import MultiHeadLatentAttention
from zoo.kinds.registry import CACHE_BYTES, Count, Kind, Size, Spec, attention_flops, numel, register
from zoo.kinds.rope_scaling import RopeSpec, rope_config

# transformers' DeepSeek-V3 creates its latent RMSNorms with the default eps, whatever rms_norm_eps says.
MLA_LATENT_NORM_EPS = 1e-6
# Toy sizes (zoo.presets.tiny): per head as wide as a 64-wide, 4-head MHA (16), rope and nope halves.
TOY_Q_LORA_RANK, TOY_KV_LORA_RANK, TOY_NOPE_DIM, TOY_ROPE_DIM, TOY_V_DIM = 32, 16, 8, 8, 16


class MLASpec(Spec):
    """Multi-head latent attention (DeepSeek-V2/V3): K and V come from a compressed latent.

    `q_lora_rank=None` projects queries directly (DeepSeek-V2-Lite); `rope_layout="interleaved"`
    matches the released checkpoints, whose rotary dims come in adjacent pairs.
    """

    kind: Literal["mla"] = "mla"
    n_heads: int = Field(8, ge=1)
    q_lora_rank: int | None = Field(None, ge=1)
    kv_lora_rank: int = Field(64, ge=1)
    qk_nope_head_dim: int = Field(32, ge=0)
    qk_rope_head_dim: int = Field(32, ge=2)
    v_head_dim: int = Field(64, ge=1)
    rope_layout: Literal["half", "interleaved"] = "half"
    attention_bias: bool = False
    rope: RopeSpec = RopeSpec()

    @model_validator(mode="after")
    def _even_rope(self) -> MLASpec:
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: RoPE rotates pairs of dims"
            )
        return self


def build(spec: MLASpec, *, d_model: int, norm_eps: float) -> fdl.Config:
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


def check(spec: MLASpec, *, d_model: int, where: str) -> None:
    need = spec.rope.scaling.min_rotary_dims
    spec.rope.check_rotary_dims(spec.qk_rope_head_dim, got=f"qk_rope_head_dim ({spec.qk_rope_head_dim})",
                                fix=f"set qk_rope_head_dim >= {need}", where=where)


def shrink(node: dict, size: Size) -> None:
    node.update(n_heads=size.n_heads,
                kv_lora_rank=size.per_head(node["kv_lora_rank"], toy=TOY_KV_LORA_RANK),
                qk_nope_head_dim=size.per_head(node["qk_nope_head_dim"], toy=TOY_NOPE_DIM),
                qk_rope_head_dim=size.per_head(node["qk_rope_head_dim"], toy=TOY_ROPE_DIM, even=True),
                v_head_dim=size.per_head(node["v_head_dim"], toy=TOY_V_DIM))
    if node["q_lora_rank"] is not None:
        node["q_lora_rank"] = size.per_head(node["q_lora_rank"], toy=TOY_Q_LORA_RANK)


def describe(attn: MultiHeadLatentAttention, seq_len: int) -> Count:
    """Only the latent (kv_lora_rank) and the shared rotary key (qk_rope_head_dim) are cached."""
    per_key = 2 * attn.n_heads * (attn.qk_dim + attn.v_dim)
    params = numel(attn)
    return Count("mla", params, params, attention_flops(attn, per_key, seq_len),
                 kv_cache_bytes_per_token=(attn.kv_lora_rank + attn.rope_dim) * CACHE_BYTES,
                 kv_cache_bytes_mha_equivalent=attn.n_heads * (attn.qk_dim + attn.v_dim) * CACHE_BYTES)


register(Kind("attention", MLASpec, build=build, shrink=shrink, describe=describe, check=check,
              hf_formats=("deepseek_v3",)))
