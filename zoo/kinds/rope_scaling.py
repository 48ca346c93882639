"""RoPE-scaling kinds (`none`, `linear`, `dynamic_ntk`, `yarn`), the `RopeSpec` every attention holds,
and the RotaryEmbedding config built from it."""

from __future__ import annotations

from typing import ClassVar, Literal

import fiddle as fdl
from pydantic import Field, model_validator

from zoo.blocks.rope import RotaryEmbedding
from zoo.kinds.registry import Kind, Size, Spec, kind_of, register, union

HF_FORMATS = ("deepseek_v3", "glm4_moe", "qwen3_moe", "olmoe", "mixtral")  # all read transformers' rope_parameters


class ScalingSpec(Spec):
    min_rotary_dims: ClassVar[int] = 2  # RoPE rotates pairs of dims


class NoScaling(ScalingSpec):
    kind: Literal["none"] = "none"


class LinearScaling(ScalingSpec):
    """Position interpolation (Chen et al., 2023): positions divided by `factor`."""

    kind: Literal["linear"] = "linear"
    factor: float = Field(2.0, ge=1.0)


class DynamicNTKScaling(ScalingSpec):
    """NTK-aware base change applied only when the sequence exceeds `original_max_seq_len`."""

    # NTK rescales the base by ratio^(R / (R - 2)): R = 2 divides by zero on the first long sequence.
    min_rotary_dims: ClassVar[int] = 4
    kind: Literal["dynamic_ntk"] = "dynamic_ntk"
    factor: float = Field(2.0, ge=1.0)
    original_max_seq_len: int = Field(512, ge=1)


class YarnScaling(ScalingSpec):
    """YaRN (Peng et al., 2023) as released with DeepSeek-V2/V3.

    The cos/sin attention factor is mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both
    are set, else 0.1 ln(factor) + 1; a non-zero `mscale_all_dim` also multiplies the softmax scale by
    mscale(factor, mscale_all_dim)^2 (DeepSeek's correction).
    """

    kind: Literal["yarn"] = "yarn"
    factor: float = Field(4.0, ge=1.0)
    original_max_seq_len: int = Field(512, ge=1)
    beta_fast: float = Field(32.0, gt=0)
    beta_slow: float = Field(1.0, gt=0)
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    @model_validator(mode="after")
    def _betas(self) -> YarnScaling:
        if self.beta_slow >= self.beta_fast:
            raise ValueError(
                f"beta_slow ({self.beta_slow}) must be < beta_fast ({self.beta_fast}): "
                "the ramp runs from beta_fast rotations down to beta_slow"
            )
        return self


def _rotary_kwargs(spec: ScalingSpec) -> dict:
    """RotaryEmbedding's keyword arguments for this scaling: its fields, by the same names."""
    return spec.model_dump(exclude={"kind"})


def _shrink_context(node: dict, size: Size) -> None:
    node["original_max_seq_len"] = size.context(node["original_max_seq_len"])


for _spec, _shrink in ((NoScaling, None), (LinearScaling, None), (DynamicNTKScaling, _shrink_context),
                       (YarnScaling, _shrink_context)):
    register(Kind("rope_scaling", _spec, build=_rotary_kwargs, shrink=_shrink, hf_formats=HF_FORMATS))

# A field annotation, re-pointed by every later registration; zoo.kinds.union("rope_scaling") is the live union.
RopeScaling = union("rope_scaling")


class RopeSpec(Spec):
    theta: float = 10000.0
    scaling: RopeScaling = NoScaling()

    @model_validator(mode="after")
    def _theta(self) -> RopeSpec:
        if self.theta <= 1:
            raise ValueError(
                f"theta ({self.theta}) must be > 1: the frequencies theta^(-2i/R) are all 1 at theta=1 (no "
                "position signal) and YaRN divides by ln(theta); use the model's RoPE base, e.g. 10000"
            )
        return self

    def check_rotary_dims(self, rotary_dim: int, *, got: str, fix: str, where: str) -> None:
        """An attention's rotary dims against what its scaling needs (`got`, `fix`: the attention's words)."""
        need = self.scaling.min_rotary_dims
        if rotary_dim < need:
            raise ValueError(f"{where}: rope.scaling {self.scaling.kind} needs >= {need} rotary dims, got {got}; "
                             f"{fix}, or pick another rope.scaling")


def rope_config(spec: RopeSpec, *, dim: int) -> fdl.Config:
    scaling = spec.scaling
    return fdl.Config(RotaryEmbedding, dim=dim, theta=spec.theta, scaling=scaling.kind,
                      **kind_of(scaling).build(scaling))
