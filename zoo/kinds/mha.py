"""The `mha` attention kind: multi-head attention, GQA when 1 < n_kv_heads < n_heads, MQA when 1."""

from __future__ import annotations

import math
from typing import Literal

import fiddle as fdl
from pydantic import Field, field_validator, model_validator

from zoo.blocks.mha import MultiHeadAttention
from zoo.kinds.registry import CACHE_BYTES, Count, Kind, Size, Spec, attention_flops, numel, register
from zoo.kinds.rope_scaling import RopeSpec, rope_config


class MHASpec(Spec):
    """Multi-head attention; GQA when 1 < n_kv_heads < n_heads, MQA when n_kv_heads == 1."""

    kind: Literal["mha"] = "mha"
    n_heads: int = Field(8, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="None means n_heads (plain MHA)")
    head_dim: int | None = Field(None, ge=2, description="None means d_model // n_heads")
    qk_norm: Literal["head", "projection"] | None = Field(
        None, description="RMSNorm on q and k before RoPE: per head (GLM-4.5, Qwen3), over the whole projection "
                          "(OLMoE), or None")
    qkv_bias: bool = False
    o_bias: bool = Field(False, description="a bias on the output projection")
    rotary_fraction: float = Field(1.0, gt=0.0, le=1.0)
    sliding_window: int | None = Field(
        None, ge=1, description="each query sees only the last sliding_window keys up to itself; None: all of them")
    rope: RopeSpec = RopeSpec()

    @field_validator("qk_norm", mode="before")
    @classmethod
    def _qk_norm_bool(cls, value):
        # true/false as spec.json files and --set may give it: the per-head norm, or none.
        if isinstance(value, bool):
            return "head" if value else None
        return value

    @model_validator(mode="after")
    def _heads(self) -> MHASpec:
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}); "
                f"pick a divisor of {self.n_heads}"
            )
        return self

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def rotary_dim(self, d_model: int) -> int:
        return int(self.resolved_head_dim(d_model) * self.rotary_fraction)


def build(spec: MHASpec, *, d_model: int, norm_eps: float) -> fdl.Config:
    return fdl.Config(
        MultiHeadAttention,
        d_model=d_model,
        n_heads=spec.n_heads,
        n_kv_heads=spec.kv_heads(),
        head_dim=spec.resolved_head_dim(d_model),
        rope=rope_config(spec.rope, dim=spec.rotary_dim(d_model)),
        qk_norm=spec.qk_norm,
        qkv_bias=spec.qkv_bias,
        o_bias=spec.o_bias,
        sliding_window=spec.sliding_window,
        norm_eps=norm_eps,
    )


def check(spec: MHASpec, *, d_model: int, where: str) -> None:
    if spec.head_dim is None and d_model % spec.n_heads:
        raise ValueError(
            f"{where}: d_model ({d_model}) must be divisible by n_heads ({spec.n_heads}), "
            "or set head_dim explicitly"
        )
    head_dim = spec.resolved_head_dim(d_model)
    rotary = head_dim * spec.rotary_fraction
    if rotary != math.floor(rotary) or int(rotary) % 2 or rotary < 2:
        raise ValueError(
            f"{where}: head_dim ({head_dim}) x rotary_fraction ({spec.rotary_fraction}) = {rotary} "
            "must be an even whole number >= 2: RoPE rotates pairs of dims"
        )
    spec.rope.check_rotary_dims(
        int(rotary), got=f"head_dim ({head_dim}) x rotary_fraction ({spec.rotary_fraction}) = {int(rotary)}",
        fix="raise rotary_fraction or head_dim", where=where)


def shrink(node: dict, size: Size) -> None:
    heads, kv = node["n_heads"], node["n_kv_heads"]
    node["n_heads"] = size.n_heads
    if kv is not None:
        node["n_kv_heads"] = size.kv_heads(heads, kv)
    if node["head_dim"] is not None:
        node["head_dim"] = size.d_model // size.n_heads
    if node["sliding_window"] is not None:
        node["sliding_window"] = size.context(node["sliding_window"])


def describe(attn: MultiHeadAttention, seq_len: int) -> Count:
    """K and V cached per kv head (every position, with a sliding window too)."""
    label = "mha" if attn.n_kv_heads == attn.n_heads else ("mqa" if attn.n_kv_heads == 1 else "gqa")
    per_key = 2 * attn.n_heads * 2 * attn.head_dim
    params = numel(attn)
    return Count(label, params, params, attention_flops(attn, per_key, seq_len, window=attn.sliding_window),
                 kv_cache_bytes_per_token=2 * attn.n_kv_heads * attn.head_dim * CACHE_BYTES,
                 kv_cache_bytes_mha_equivalent=2 * attn.n_heads * attn.head_dim * CACHE_BYTES)


register(Kind("attention", MHASpec, build=build, shrink=shrink, describe=describe, check=check,
              hf_formats=("glm4_moe", "qwen3_moe", "olmoe", "mixtral")))
