"""Registry-driven: every registered kind (attention, FFN, router, RoPE scaling), whether or not a preset
uses it, builds at toy size, trains a step's worth, is described truthfully and stays causal. A kind
registered later (here, a toy attention) goes through the same code paths with no other edit.
"""

import dataclasses
import functools
from typing import Literal

import fiddle as fdl
import pytest
import torch
from pydantic import Field, ValidationError
from torch import nn

import zoo
from experiments.base import CPU
from zoo import presets
from zoo.blocks.mlp import SwiGLU
from zoo.blocks.rope import RotaryEmbedding
from zoo.blocks.routers import Router, SoftmaxTopKRouter
from zoo.describe import describe
from zoo.interop.hf_config import SUPPORTED, hf_config_dict
from zoo.kinds import Count, Kind, Size, Spec, kinds, register, registered, unregister
from zoo.kinds.registry import SLOTS, matrix_numel, numel
from zoo.kinds.rope_scaling import ScalingSpec
from zoo.overrides import SpecError, apply_sets
from zoo.presets.tiny import tiny
from zoo.specs import MHASpec, MLASpec, ModelSpec, MoESpec, RopeSpec, RunSpec, SigmoidGroupTopKRouterSpec

KINDS = [kind for slot in SLOTS for kind in kinds(slot)]


def _run_using(kind: Kind) -> RunSpec:
    """A run at toy size whose every layer uses `kind` (with its defaults): routers inside a MoE, RoPE
    scalings inside an MHA. Going through tiny() exercises the kind's shrink rule too."""
    spec = kind.spec()
    place = {"attention": lambda: dict(attention=spec), "ffn": lambda: dict(ffn=spec),
             "router": lambda: dict(ffn=MoESpec(router=spec)),
             "rope_scaling": lambda: dict(attention=MHASpec(rope=RopeSpec(scaling=spec)))}
    return tiny(RunSpec(model=ModelSpec(**place[kind.slot]())))


def _check_run(spec: RunSpec, label: str) -> None:
    """Forward and backward with a gradient for every parameter, describe's counts equal the module's,
    and no logit sees a later token."""
    model = zoo.build(spec)
    vocab, T = spec.model.vocab_size, spec.model.max_seq_len
    # 4 x 64 tokens: enough assignments that every expert of a toy MoE is routed to at least once.
    ids = torch.randint(0, vocab, (4, T))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss), label
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{label}: {name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{label}: {name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{label}: {name} has an all-zero gradient"

    info = describe(spec)
    assert info["total_params"] == numel(model), label
    rows = {row["name"]: row for row in info["blocks"]}
    for i, layer in enumerate(model.layers):
        assert rows[f"layers.{i}.attention"]["params"] == numel(layer.attention), label
        assert rows[f"layers.{i}.ffn"]["params"] == numel(layer.ffn), label

    model.eval()
    with torch.no_grad():
        base = model(ids).logits
        for t in (1, T // 2, T - 3):
            changed = ids.clone()
            changed[:, t:] = (changed[:, t:] + 1) % vocab
            logits = model(changed).logits
            assert (logits[:, :t] - base[:, :t]).abs().max() < 1e-5, f"{label}: a position < {t} saw the future"
            assert (logits[:, t:] - base[:, t:]).abs().max() > 1e-4, f"{label}: the check cannot fail"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k.slot}:{k.name}")
def test_every_registered_kind_builds_trains_is_described_and_causal(kind, one_thread):
    _check_run(_run_using(kind), f"{kind.slot} kind {kind.name}")


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k.slot}:{k.name}")
def test_every_registered_kind_round_trips_and_maps_to_known_hf_formats(kind):
    spec = _run_using(kind)
    assert RunSpec.model_validate_json(spec.model_dump_json()) == spec
    assert set(kind.hf_formats) <= set(SUPPORTED)


def test_the_registry_holds_every_slot():
    assert {slot: {k.name for k in kinds(slot)} for slot in SLOTS} == {
        "attention": {"mha", "mla"}, "ffn": {"mlp", "moe"}, "router": {"softmax_topk", "sigmoid_group_topk"},
        "rope_scaling": {"none", "linear", "dynamic_ntk", "yarn"},
    }


@pytest.mark.parametrize("kind", kinds("router"), ids=lambda k: k.name)
def test_router_blocks_say_their_roles(kind):
    """The optimizer puts every parameter a Router owns on AdamW, and the trainer updates the biases of
    routers that have one: both read the block, so every router kind must be a Router."""
    model = zoo.build(_run_using(kind))
    for layer in model.layers:
        router = layer.ffn.router
        assert isinstance(router, Router)
        assert router.has_routing_bias == hasattr(router, "e_score_correction_bias")


# ----------------------------------------------------------------------------- a kind added in a test

TOY_VALUE = 16


class CumulativeMean(nn.Module):
    """Toy attention: position t mixes the mean of the values at positions 0..t (causal by construction)."""

    def __init__(self, *, d_model: int, d_value: int):
        super().__init__()
        self.value = nn.Linear(d_model, d_value, bias=False)
        self.out = nn.Linear(d_value, d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        v_BTV = self.value(x_BTD)
        seen_T1 = torch.arange(1, x_BTD.shape[1] + 1, device=x_BTD.device, dtype=v_BTV.dtype)[:, None]
        return self.out(v_BTV.cumsum(dim=1) / seen_T1)


class CumulativeMeanSpec(Spec):
    kind: Literal["cumulative_mean"] = "cumulative_mean"
    d_value: int = Field(256, ge=1)


def _build(spec: CumulativeMeanSpec, *, d_model: int, norm_eps: float) -> fdl.Config:
    return fdl.Config(CumulativeMean, d_model=d_model, d_value=spec.d_value)


def _shrink(node: dict, size: Size) -> None:
    node["d_value"] = size.width(node["d_value"], toy=TOY_VALUE)


def _describe(attn: CumulativeMean, seq_len: int) -> Count:
    params = numel(attn)
    return Count("cmean", params, params, 2 * matrix_numel(attn))


CUMULATIVE_MEAN = Kind("attention", CumulativeMeanSpec, build=_build, shrink=_shrink, describe=_describe)


def test_a_kind_registered_in_a_test_is_built_shrunk_described_and_checked(one_thread):
    with registered(CUMULATIVE_MEAN):
        spec = apply_sets(presets.get("baseline"), ["model.attention.kind=cumulative_mean"])
        assert spec.model.attention == CumulativeMeanSpec()
        small = tiny(spec)
        assert small.model.attention.d_value == TOY_VALUE
        assert CPU(spec).model.attention.d_value == round(256 * CPU.width_factor)
        assert RunSpec.model_validate_json(small.model_dump_json()) == small
        assert {b["kind"] for b in describe(small)["blocks"] if b["name"].endswith("attention")} == {"cmean"}
        _check_run(small, "the cumulative_mean kind")
        with pytest.raises(SpecError, match="kind='cumulative_mean': no Hugging Face format has this attention"):
            hf_config_dict(small)
        # Per-layer overrides hold the new kind too.
        mixed = ModelSpec(n_layers=2, overrides=[{"layers": [1], "attention": {"kind": "cumulative_mean"}}])
        assert [layer.attention.kind for layer in mixed.layer_specs()] == ["mha", "cumulative_mean"]
    assert CUMULATIVE_MEAN not in kinds("attention")
    with pytest.raises(ValidationError, match="cumulative_mean"):
        RunSpec.model_validate({"model": {"attention": {"kind": "cumulative_mean"}}})


def test_a_registration_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        register(kinds("attention")[0])
    with pytest.raises(ValueError, match="needs a describe rule"):
        register(Kind("attention", CumulativeMeanSpec, build=_build))
    with pytest.raises(ValueError, match="slot 'mixer' is not one of"):
        register(Kind("mixer", CumulativeMeanSpec, build=_build, describe=_describe))
    assert CumulativeMeanSpec not in {k.spec for k in kinds("attention")}


def test_a_kind_registered_again_keeps_its_place_in_the_unions():
    """A test that swaps a built-in kind out and back leaves the unions, and so the JSON schema, as they were."""
    schema, order = RunSpec.model_json_schema(), {slot: kinds(slot) for slot in SLOTS}
    for slot in SLOTS:
        first = kinds(slot)[0]
        unregister(first)
        try:
            assert first not in kinds(slot)
        finally:
            register(first)
    assert {slot: kinds(slot) for slot in SLOTS} == order
    assert RunSpec.model_json_schema() == schema


# ----------------------------------------------------------------------------- toy FFN, router, RoPE scaling


class PlainMLPSpec(Spec):
    """Toy FFN kind with no Hugging Face format: the SwiGLU block under another name."""

    kind: Literal["plain_mlp"] = "plain_mlp"
    d_hidden: int = Field(64, ge=1)


def _build_plain(spec: PlainMLPSpec, *, d_model: int) -> fdl.Config:
    return fdl.Config(SwiGLU, d_model=d_model, d_hidden=spec.d_hidden)


def _describe_plain(ffn: SwiGLU, seq_len: int) -> Count:
    return Count("plain", numel(ffn), numel(ffn), 2 * matrix_numel(ffn))


PLAIN_MLP = Kind("ffn", PlainMLPSpec, build=_build_plain, describe=_describe_plain)


class PlainTopKSpec(Spec):
    """Toy router kind with no fields at all (no norm_topk_prob) and no Hugging Face format."""

    kind: Literal["plain_topk"] = "plain_topk"


def _build_plain_topk(spec: PlainTopKSpec, *, d_model: int, n_experts: int, top_k: int) -> fdl.Config:
    return fdl.Config(SoftmaxTopKRouter, d_model=d_model, n_experts=n_experts, top_k=top_k)


PLAIN_TOPK = Kind("router", PlainTopKSpec, build=_build_plain_topk)


def _stretched(dim: int, theta: float, *, factor: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)) / factor


class StretchScaling(ScalingSpec):
    """Toy RoPE scaling whose rule zoo/blocks/rope.py does not know: it brings its own frequencies."""

    kind: Literal["stretch"] = "stretch"
    factor: float = Field(3.0, ge=1.0)


STRETCH_ATTENTION_FACTOR = 0.5


def _rotary_stretch(spec: StretchScaling) -> dict:
    return dict(frequencies=functools.partial(_stretched, factor=spec.factor),
                attention_factor=STRETCH_ATTENTION_FACTOR)


STRETCH = Kind("rope_scaling", StretchScaling, build=_rotary_stretch)


def test_a_rope_scaling_registered_in_a_test_brings_its_rule_to_the_block(one_thread):
    with registered(STRETCH):
        spec = _run_using(STRETCH)
        _check_run(spec, "the stretch scaling")
        rope = zoo.build(spec).layers[0].attention.rope
        torch.testing.assert_close(rope.inv_freq, _stretched(rope.dim, rope.theta, factor=3.0))
        assert rope.attention_factor == STRETCH_ATTENTION_FACTOR and rope.softmax_scale_factor == 1.0
    with pytest.raises(ValueError, match="RoPE scaling 'stretch': pass frequencies= for a scaling other than"):
        RotaryEmbedding(dim=8, scaling="stretch")
    with pytest.raises(ValueError, match="RoPE scaling 'yarn': pass frequencies= for a scaling other than"):
        RotaryEmbedding(dim=8, scaling="yarn", original_max_seq_len=16, frequencies=_stretched)
    with pytest.raises(ValueError, match="'linear' computes its own attention and softmax factors"):
        RotaryEmbedding(dim=8, scaling="linear", attention_factor=2.0)


def test_a_router_kind_without_norm_topk_prob_validates_with_top_1():
    with registered(PLAIN_TOPK):
        assert MoESpec(n_experts=4, top_k=1, router=PlainTopKSpec()).router == PlainTopKSpec()


def _one_line_error(spec: ModelSpec) -> str:
    with pytest.raises(SpecError) as err:
        hf_config_dict(spec)
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def test_hf_export_refuses_kinds_its_format_lacks_by_field():
    """Every slot's kind is checked against the format's model_type (its `hf_formats`) before the
    exporter reads any field, so a new kind meets one line naming it, not an AttributeError."""
    with registered(PLAIN_MLP), registered(PLAIN_TOPK), registered(STRETCH):
        # mha is the attention of four formats: a kind none of them has is named once.
        assert _one_line_error(ModelSpec(ffn=PlainMLPSpec())) == (
            "model.ffn.kind='plain_mlp': no Hugging Face format with this attention has such an FFN; their FFN "
            "kinds: mlp, moe")
        moe = MoESpec(n_experts=4, router=SigmoidGroupTopKRouterSpec())
        mixed = ModelSpec(n_layers=3, ffn=moe, overrides=[{"layers": [1], "ffn": {"kind": "plain_mlp"}}])
        assert _one_line_error(mixed).startswith("model.overrides: layer 1's ffn.kind='plain_mlp': no Hugging Face")
        assert _one_line_error(ModelSpec(attention=MLASpec(), ffn=MoESpec(n_experts=4, router=PlainTopKSpec()))) == (
            "model.ffn.router.kind='plain_topk': deepseek_v3 has no such router; its router kinds: sigmoid_group_topk")
        stretched = ModelSpec(attention=MHASpec(rope=RopeSpec(scaling=StretchScaling())))
        assert _one_line_error(stretched) == (
            "model.attention.rope.scaling.kind='stretch': no Hugging Face format with this attention has such a "
            "RoPE scaling; their scalings: none, linear, dynamic_ntk, yarn")
        mla_stretched = ModelSpec(attention=MLASpec(rope=RopeSpec(scaling=StretchScaling())))
        assert _one_line_error(mla_stretched) == (
            "model.attention.rope.scaling.kind='stretch': deepseek_v3 has no such RoPE scaling; its scalings: none, "
            "linear, dynamic_ntk, yarn")
    # A scaling that names the format but has no mapping in the exporter is refused as well.
    with registered(dataclasses.replace(STRETCH, hf_formats=("glm4_moe",))):
        assert "writes no glm4_moe rope_parameters" in _one_line_error(stretched)
