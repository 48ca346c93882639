"""The `mlp` FFN kind: a SwiGLU feed-forward."""

from __future__ import annotations

from typing import Literal

import fiddle as fdl
from pydantic import Field

from zoo.blocks.mlp import SwiGLU
from zoo.kinds.registry import Count, Kind, Size, Spec, matrix_numel, numel, register

TOY_HIDDEN = 128  # zoo.presets.tiny


class MLPSpec(Spec):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    kind: Literal["mlp"] = "mlp"
    d_hidden: int = Field(1536, ge=1)


def build(spec: MLPSpec, *, d_model: int) -> fdl.Config:
    return fdl.Config(SwiGLU, d_model=d_model, d_hidden=spec.d_hidden)


def shrink(node: dict, size: Size) -> None:
    node["d_hidden"] = size.width(node["d_hidden"], toy=TOY_HIDDEN)


def describe(ffn: SwiGLU, seq_len: int) -> Count:
    params = numel(ffn)
    return Count("mlp", params, params, 2 * matrix_numel(ffn))


register(Kind("ffn", MLPSpec, build=build, shrink=shrink, describe=describe,
              hf_formats=("deepseek_v3", "glm4_moe", "qwen3_moe")))
