"""What every Hugging Face format module shares: the `Family` record, the layer layout a spec resolves
to, the config.json fields every format has, and errors that name the field."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from zoo.kinds import Spec, kind_of, kinds
from zoo.overrides import SpecError
from zoo.specs import LayerOverride, MLPSpec, ModelSpec, MoESpec

SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
SILU_NAMES = ("silu", "swish")  # transformers' ACT2FN: both are x * sigmoid(x)


@dataclass(frozen=True)
class Layout:
    """A spec as the HF formats see it: one attention for every layer, one dense MLP for the layers
    listed in `dense_layers`, one MoE for the others. Layers are numbered as checkpoints store them:
    the multi-token-prediction modules' layers follow the last (zoo.interop.hf_mtp)."""

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
    moe_module, expert_names: the names of the MoE module and of each expert's (gate, up, down)
        projections in released checkpoints (transformers' in-memory names are mlp and gate_up_proj /
        down_proj for every format).
    resembles: whether a spec has this format's signature (its q/k norm, say): when no format expresses
        a spec, the errors reported are those of the formats it resembles.
    """

    model_type: str
    architecture: str
    model_fields: Callable[[Any], dict[str, Any]]
    config_fields: Callable[[ModelSpec, Layout], dict[str, Any]]
    attention_names: Mapping[str, str] = field(default_factory=dict)
    empty_shared_experts: bool = False
    moe_module: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    resembles: Callable[[Layout], bool] = lambda layout: True


def make(cls, where: str, **fields):
    """cls(**fields), with a validation failure turned into one line naming the config fields."""
    try:
        return cls(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise SpecError(f"config.json {where}: {loc + ': ' if loc else ''}{message}") from None


# Fields that change training only (dropout, noise): import leaves them out with a warning, since the
# forward pass of evaluation and generation is the same without them.
TRAINING_ONLY = {
    "attention_dropout": "the zoo has no attention dropout",
    "router_jitter_noise": "the zoo's router noise is Gaussian on the logits (router.noise_std)",
}


class DroppedField(UserWarning):
    """A config.json field import leaves out (it changes training only)."""


def check_common_fields(config: Any) -> None:
    """Fields the zoo cannot express in any format: an error naming the field rather than a silently
    different model; a warning for those that change training only."""
    act = getattr(config, "hidden_act", "silu")
    if act not in SILU_NAMES:
        raise SpecError(f"config.json hidden_act={act!r}: the zoo's FFNs are SwiGLU (silu) only")
    if getattr(config, "quantization_config", None):
        raise SpecError("config.json quantization_config is set: dequantize the checkpoint (bf16/fp32) first")
    for name, why in TRAINING_ONLY.items():
        value = getattr(config, name, None)
        if value:
            warnings.warn(f"config.json {name}={value} is not carried: {why}; it changes training only",
                          DroppedField, stacklevel=2)


# A slot's kind in an error message: (what it is, what its kinds are called).
SLOT_WORDS = {"ffn": ("an", "FFN", "FFN kinds"), "router": ("a", "router", "router kinds"),
              "rope_scaling": ("a", "RoPE scaling", "scalings")}


@dataclass(frozen=True)
class KindUse:
    """A kind the spec uses, and the field that holds it (for error messages)."""

    where: str
    spec: Spec

    @property
    def formats(self) -> tuple[str, ...]:
        return kind_of(self.spec).hf_formats


def kinds_in(slot: str, model_types: list[str]) -> str:
    """The `slot` kinds any of `model_types` can express, for an error message."""
    return ", ".join(k.name for k in kinds(slot) if set(model_types) & set(k.hf_formats)) or "none"


def kind_error(use: KindUse, model_types: list[str]) -> str:
    """One line: the kind at `use` is in none of `model_types`."""
    slot = kind_of(use.spec).slot
    article, thing, plural = SLOT_WORDS[slot]
    if len(model_types) == 1:
        return (f"{use.where}.kind={use.spec.kind!r}: {model_types[0]} has no such {thing}; "
                f"its {plural}: {kinds_in(slot, model_types)}")
    return (f"{use.where}.kind={use.spec.kind!r}: no Hugging Face format with this attention has such {article} {thing}; "
            f"their {plural}: {kinds_in(slot, model_types)}")


def one_attention(spec: ModelSpec) -> Spec:
    """The attention of every layer: no HF format mixes attentions."""
    layers = spec.layer_specs()
    for index, layer in enumerate(layers):
        if layer.attention != layers[0].attention:
            raise SpecError(f"model.overrides: layer {index} has a different attention from layer 0; "
                            "the Hugging Face formats use one attention for every layer")
    return layers[0].attention


def layout(spec: ModelSpec) -> Layout:
    """The spec's Layout. Overrides are fine as long as the resolved layers still fit one attention, one
    dense MLP and one MoE."""
    attention = one_attention(spec)
    layers = spec.layer_specs() + spec.mtp_layer_specs()
    dense_layers = tuple(i for i, layer in enumerate(layers) if not isinstance(layer.ffn, MoESpec))
    dense = layers[dense_layers[0]].ffn if dense_layers else None
    moe = next((layer.ffn for layer in layers if isinstance(layer.ffn, MoESpec)), None)
    cause = "model.overrides" if spec.overrides else "model.first_k_dense / model.dense_ffn / model.ffn"
    for index, layer in enumerate(layers):
        expected = dense if index in dense_layers else moe
        if layer.ffn != expected:
            kind = "dense FFN" if index in dense_layers else "MoE"
            raise SpecError(f"{cause}: layer {index}'s {kind} differs from the others'; the Hugging Face formats "
                            "have one dense FFN and one MoE for all layers")
    return Layout(attention, dense, moe, dense_layers)


def kind_uses(spec: ModelSpec) -> list[KindUse]:
    """Every FFN, router and RoPE-scaling kind the layers use (the attention's kind picks the formats)."""
    uses: dict[KindUse, None] = {}
    for index, layer in enumerate(spec.layer_specs()):
        ffn = layer.ffn
        where = ("model.ffn" if ffn == spec.ffn else "model.dense_ffn" if ffn == spec.dense_ffn
                 else f"model.overrides: layer {index}'s ffn")
        uses[KindUse(where, ffn)] = None
        if isinstance(ffn, MoESpec):
            uses[KindUse(f"{where}.router", ffn.router)] = None
    scaling = getattr(spec.layer_specs()[0].attention, "rope", None)
    if scaling is not None:
        uses[KindUse("model.attention.rope.scaling", scaling.scaling)] = None
    return list(uses)


def require(value: Any, allowed: Any, where: str, model_type: str, why: str) -> None:
    """A SpecError `where=value: <model_type> <why>` unless value == allowed (or is in it, for a tuple)."""
    ok = value in allowed if isinstance(allowed, tuple) else value == allowed
    if not ok:
        raise SpecError(f"{where}={value!r}: {model_type} {why}")


def dense_layer_fields(dense_layers: list[int], dense: MLPSpec | None) -> dict[str, Any]:
    """The ModelSpec fields that make `dense_layers` use `dense` (the other layers keep model.ffn): the
    first k layers are first_k_dense, any other set an override."""
    if not dense_layers:
        return {}
    if dense_layers == list(range(len(dense_layers))):
        return dict(first_k_dense=len(dense_layers), dense_ffn=dense)
    return dict(overrides=[LayerOverride(layers=dense_layers, ffn=dense)])


def check_no_mtp(spec: ModelSpec, model_type: str) -> None:
    """Only deepseek_v3 and glm4_moe checkpoints hold multi-token-prediction layers."""
    require(spec.mtp.depth, 0, "model.mtp.depth", model_type,
            "has no multi-token-prediction layers (deepseek_v3 and glm4_moe have); set it to 0")


def check_softmax_moe(moe: MoESpec, model_type: str) -> None:
    """What a softmax top-k format's MoE cannot say (its router fields other than norm_topk_prob train only)."""
    require(moe.n_shared_experts, 0, "model.ffn.n_shared_experts", model_type, "has no shared experts; set it to 0")

