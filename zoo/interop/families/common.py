"""What every Hugging Face format module shares: the `Family` record, the layer layout a spec resolves
to, the config.json fields every format has, and errors that name the field."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from zoo.kinds import Spec, kind_of, kinds
from zoo.overrides import SpecError
from zoo.specs import MLPSpec, ModelSpec, MoESpec

SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class Layout:
    """A spec as the HF formats see it: one attention for every layer, one dense MLP for the layers
    listed in `dense_layers`, one MoE for the others."""

    attention: Spec
    dense: MLPSpec | None
    moe: MoESpec | None
    dense_layers: tuple[int, ...]


@dataclass(frozen=True)
class Family:
    """One Hugging Face model_type.

    model_fields: transformers config -> the ModelSpec fields of the layers (attention, ffn,
        first_k_dense, dense_ffn, overrides); the fields every format shares are read by `spec_from_hf_config`.
    config_fields: (spec, its Layout) -> this format's config.json fields beyond the shared ones; a
        SpecError naming the spec field where the format cannot say it.
    attention_names: zoo attention submodule -> HF name, where they differ.
    empty_shared_experts: transformers builds zero-width shared experts when n_shared_experts = 0.
    """

    model_type: str
    architecture: str
    model_fields: Callable[[Any], dict[str, Any]]
    config_fields: Callable[[ModelSpec, Layout], dict[str, Any]]
    attention_names: Mapping[str, str] = field(default_factory=dict)
    empty_shared_experts: bool = False


def make(cls, where: str, **fields):
    """cls(**fields), with a validation failure turned into one line naming the config fields."""
    try:
        return cls(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise SpecError(f"config.json {where}: {loc + ': ' if loc else ''}{message}") from None


def check_common_fields(config: Any) -> None:
    """Fields the zoo cannot express in any format: an error naming the field rather than a silently
    different model."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise SpecError(f"config.json hidden_act={act!r}: the zoo's FFNs are SwiGLU (silu) only")
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    if dropout != 0:
        raise SpecError(f"config.json attention_dropout={dropout}: the zoo has no attention dropout; set it to 0.0")
    if getattr(config, "quantization_config", None):
        raise SpecError("config.json quantization_config is set: dequantize the checkpoint (bf16/fp32) first")


def kinds_in(slot: str, model_type: str) -> str:
    """The `slot` kinds that `model_type` can express, for an error message."""
    return ", ".join(k.name for k in kinds(slot) if model_type in k.hf_formats) or "none"


def layout(spec: ModelSpec, model_type: str) -> Layout:
    """The spec's Layout, every layer's kinds checked against `model_type`. Overrides are fine as long as
    the resolved layers still fit one attention, one dense MLP and one MoE."""
    layers = spec.layer_specs()
    attention = layers[0].attention
    for index, layer in enumerate(layers):
        if layer.attention != attention:
            raise SpecError(f"model.overrides: layer {index} has a different attention from layer 0; "
                            f"{model_type} uses one attention for every layer")
    for index, layer in enumerate(layers):
        ffn = layer.ffn
        if model_type not in kind_of(ffn).hf_formats:
            where = ("model.ffn" if ffn == spec.ffn else "model.dense_ffn" if ffn == spec.dense_ffn
                     else f"model.overrides: layer {index}'s ffn")
            raise SpecError(f"{where}.kind={ffn.kind!r}: {model_type} has no such FFN; "
                            f"its FFN kinds: {kinds_in('ffn', model_type)}")
    dense_layers = tuple(i for i, layer in enumerate(layers) if not isinstance(layer.ffn, MoESpec))
    dense = layers[dense_layers[0]].ffn if dense_layers else None
    moe = next((layer.ffn for layer in layers if isinstance(layer.ffn, MoESpec)), None)
    cause = "model.overrides" if spec.overrides else "model.first_k_dense / model.dense_ffn / model.ffn"
    for index, layer in enumerate(layers):
        expected = dense if index in dense_layers else moe
        if layer.ffn != expected:
            kind = "dense MLP" if index in dense_layers else "MoE"
            raise SpecError(f"{cause}: layer {index}'s {kind} differs from the others'; {model_type} has one "
                            "dense MLP and one MoE for all layers")
    if moe is not None:
        router = moe.router
        if model_type not in kind_of(router).hf_formats:
            raise SpecError(f"model.ffn.router.kind={router.kind!r}: {model_type} has no such router; "
                            f"its router kinds: {kinds_in('router', model_type)}")
    return Layout(attention, dense, moe, dense_layers)
