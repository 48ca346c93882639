"""Specs: every bad spec gives its promised message; edits and diffs behave."""

from typing import Annotated, Literal, Union

import pytest
from pydantic import Field

from zoo import presets
from zoo.overrides import SpecError, apply_sets, diff, validate, with_changes
from zoo.specs import (
    LayerOverride,
    LinearScaling,
    MHASpec,
    MLASpec,
    MLPSpec,
    ModelSpec,
    MoESpec,
    RunSpec,
    SigmoidGroupTopKRouterSpec,
    SoftmaxTopKRouterSpec,
    Spec,
    YarnScaling,
)

BAD_SPECS = [
    # (edit to deepseek_glm4, words the one-line message must contain)
    ({"model.ffn.top_k": 99}, ["model.ffn", "top_k (99)", "n_experts (8)"]),
    ({"model.ffn.router.n_groups": 3}, ["n_groups (3)", "divide n_experts (8)"]),
    ({"model.ffn.router.topk_groups": 2}, ["topk_groups (2)", "n_groups (1)"]),
    ({"model.ffn.router": {"kind": "sigmoid_group_topk", "n_groups": 4, "topk_groups": 1}, "model.ffn.top_k": 3},
     ["top_k (3)", "topk_groups"]),
    ({"model.attention.qk_rope_head_dim": 7}, ["qk_rope_head_dim (7)", "even"]),
    ({"model.first_k_dense": 9}, ["first_k_dense (9)", "n_layers (6)"]),
    ({"model.dense_ffn": None}, ["dense_ffn", "first_k_dense"]),
    ({"data.seq_len": 4096}, ["data.seq_len (4096)", "max_seq_len (512)"]),
    ({"model.d_model": "abc"}, ["model.d_model", "integer", "'abc'"]),
    ({"model.ffn.n_experts": 0}, ["model.ffn.n_experts", "greater than or equal to 1"]),
    ({"train.precision": "fp8"}, ["train.precision", "'fp32', 'bf16' or 'fp16'"]),
    ({"model.attention.rope.scaling": {"kind": "yarn", "beta_fast": 1, "beta_slow": 2}}, ["beta_slow (2.0)", "beta_fast"]),
    ({"model.attention.rope.theta": 1.0}, ["model.attention.rope", "theta (1.0)", "> 1"]),
    ({"model.attention.qk_rope_head_dim": 2, "model.attention.rope.scaling": {"kind": "dynamic_ntk"}},
     ["layer 0 attention", "dynamic_ntk", "qk_rope_head_dim (2)", "set qk_rope_head_dim >= 4"]),
    ({"model.attention.rope.scaling.kind": "ntk"}, ["model.attention.rope.scaling", "kind", "'ntk'"]),
    # NaN passed every bound check and was saved to spec.json as null; infinity passed `ge` bounds.
    ({"model.attention.rope.theta": float("nan")}, ["model.attention.rope.theta", "finite number", "nan"]),
    ({"model.attention.rope.theta": float("inf")}, ["model.attention.rope.theta", "finite number", "inf"]),
    ({"train.grad_clip": float("inf")}, ["train.grad_clip", "finite number", "inf"]),
    ({"model.ffn.router.routed_scaling_factor": float("-inf")}, ["model.ffn.router.routed_scaling_factor", "finite"]),
]


@pytest.mark.parametrize("changes,words", BAD_SPECS, ids=[str(c) for c, _ in BAD_SPECS])
def test_bad_spec_messages(changes, words):
    with pytest.raises(SpecError) as err:
        with_changes(presets.get("deepseek_glm4"), changes)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_mha_head_checks():
    with pytest.raises(SpecError, match=r"n_kv_heads \(3\) must divide n_heads \(8\)"):
        validate(MHASpec, {"n_heads": 8, "n_kv_heads": 3})
    with pytest.raises(SpecError, match=r"d_model \(100\) must be divisible by n_heads \(8\)"):
        validate(ModelSpec, {"d_model": 100, "attention": {"kind": "mha", "n_heads": 8}})
    with pytest.raises(SpecError, match=r"rotary_fraction \(0.3\).*even whole number"):
        validate(ModelSpec, {"d_model": 64, "attention": {"kind": "mha", "n_heads": 4, "rotary_fraction": 0.3}})


def test_top1_with_normalised_weights_is_a_training_warning_for_both_routers():
    """top_k=1 normalises one weight by itself: the router would get no gradient from the LM loss. Released
    models do it, so the spec is valid (import, evaluation and generation work) and the trainer warns."""
    for router in ({"kind": "softmax_topk", "norm_topk_prob": True}, {"kind": "sigmoid_group_topk"}):
        top1 = validate(MoESpec, {"top_k": 1, "router": router})
        assert "top_k (1) with router.norm_topk_prob (True)" in top1.training_warning()
        assert validate(MoESpec, {"top_k": 1, "router": {**router, "norm_topk_prob": False}}).training_warning() is None
        assert validate(MoESpec, {"top_k": 2, "router": router}).training_warning() is None
    spec = with_changes(presets.get("deepseek_glm4"), {"model.ffn.top_k": 1})
    [warning] = spec.model.training_warnings()
    assert warning.startswith("model layers [1, 2, 3, 4, 5]: top_k (1)") and "norm_topk_prob=false" in warning
    assert presets.get("deepseek_glm4").model.training_warnings() == []


def test_rope_theta_and_dynamic_ntk_rotary_dims():
    """theta = 1 made YaRN divide by ln(theta) at build; dynamic NTK with 2 rotary dims divided by
    R - 2 = 0 on the first sequence longer than original_max_seq_len."""
    with pytest.raises(SpecError, match=r"theta \(1.0\) must be > 1"):
        validate(ModelSpec, {"attention": {"kind": "mha", "rope": {"theta": 1.0, "scaling": {"kind": "yarn"}}}})
    ntk = {"scaling": {"kind": "dynamic_ntk"}}
    with pytest.raises(SpecError, match=r"head_dim \(16\) x rotary_fraction \(0.125\) = 2; raise rotary_fraction"):
        validate(ModelSpec, {"d_model": 64, "attention": {"kind": "mha", "n_heads": 4, "rotary_fraction": 0.125,
                                                          "rope": ntk}})
    validate(ModelSpec, {"d_model": 64, "attention": {"kind": "mha", "n_heads": 4, "rotary_fraction": 0.25, "rope": ntk}})
    validate(ModelSpec, {"d_model": 64, "attention": {"kind": "mha", "n_heads": 4, "rotary_fraction": 0.125}})


def test_layer_override_checks():
    with pytest.raises(SpecError, match="needs `layers` or `every`"):
        validate(LayerOverride, {"ffn": {"kind": "mlp"}})
    with pytest.raises(SpecError, match=r"overrides\[0\].layers has \[7\]"):
        validate(ModelSpec, {"n_layers": 4, "overrides": [{"layers": [7], "ffn": {"kind": "mlp"}}]})


def test_per_layer_heterogeneity():
    spec = ModelSpec(
        n_layers=6, d_model=64,
        attention=MHASpec(n_heads=4), ffn=MoESpec(n_experts=4, top_k=1, d_expert=32),
        first_k_dense=1, dense_ffn=MLPSpec(d_hidden=128),
        overrides=[
            LayerOverride(layers=[3], attention=MLASpec(n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                                                        qk_rope_head_dim=8, v_head_dim=16)),
            LayerOverride(every=2, offset=2, ffn=MLPSpec(d_hidden=96)),
        ],
    )
    kinds = [(layer.attention.kind, layer.ffn.kind) for layer in spec.layer_specs()]
    assert kinds == [("mha", "mlp"), ("mha", "moe"), ("mha", "mlp"), ("mla", "moe"), ("mha", "mlp"), ("mha", "moe")]
    assert spec.layer_specs()[0].ffn.d_hidden == 128 and spec.layer_specs()[2].ffn.d_hidden == 96
    import zoo

    model = zoo.build(spec)
    assert type(model.layers[3].attention).__name__ == "MultiHeadLatentAttention"
    assert type(model.layers[1].ffn).__name__ == "MoE" and type(model.layers[2].ffn).__name__ == "SwiGLU"


def test_json_round_trip_of_every_kind():
    spec = RunSpec(model=ModelSpec(
        attention=MLASpec(rope={"scaling": YarnScaling(factor=8, original_max_seq_len=128)}),
        ffn=MoESpec(router=SigmoidGroupTopKRouterSpec(n_groups=4, topk_groups=2)),
        overrides=[LayerOverride(layers=[1], attention=MHASpec(n_kv_heads=2), ffn=MLPSpec())],
    ))
    again = RunSpec.model_validate_json(spec.model_dump_json())
    assert again == spec and again.model.attention.rope.scaling.kind == "yarn"


def test_set_parses_json_values_and_switches_kind():
    spec = apply_sets(presets.get("deepseek_glm4"), [
        "model.ffn.n_experts=16", "train.adam_lr=1e-3", "model.tie_embeddings=false", "data.source=/tmp/x.txt",
        "model.attention.kind=mha",
    ])
    assert spec.model.ffn.n_experts == 16 and spec.train.adam_lr == 1e-3 and not spec.model.tie_embeddings
    assert spec.data.source == "/tmp/x.txt"
    assert spec.model.attention == MHASpec()  # a new kind starts from its defaults


def test_a_new_kind_can_be_edited_in_the_same_command():
    """A kind change fills the slot with the new kind's defaults, so the next --set can edit one of its fields."""
    spec = apply_sets(presets.get("deepseek_glm4"), ["model.ffn.kind=mlp", "model.ffn.d_hidden=256"])
    assert spec.model.ffn == MLPSpec(d_hidden=256)
    spec = apply_sets(presets.get("deepseek_glm4"),
                      ["model.attention.rope.scaling.kind=yarn", "model.attention.rope.scaling.factor=8"])
    assert spec.model.attention.rope.scaling == YarnScaling(factor=8.0)
    spec = with_changes(presets.get("deepseek_glm4"), {
        "model.ffn.router.kind": "softmax_topk", "model.ffn.router.z_loss_weight": 0.001,
        "model.attention.kind": "mha", "model.attention.rope.scaling.kind": "linear",
        "model.attention.rope.scaling.factor": 3.0,
    })
    assert spec.model.ffn.router == SoftmaxTopKRouterSpec(z_loss_weight=0.001)
    assert spec.model.attention == MHASpec(rope={"scaling": LinearScaling(factor=3.0)})
    base = ModelSpec(d_model=64, overrides=[LayerOverride(layers=[1], ffn=MLPSpec(d_hidden=32))])
    spec = with_changes(base, {"overrides.0.ffn.kind": "moe", "overrides.0.ffn.n_experts": 4})
    assert spec.overrides[0].ffn == MoESpec(n_experts=4)


class _Plain(Spec):
    kind: Literal["plain"] = "plain"


class _Sized(Spec):
    kind: Literal["sized"] = "sized"
    size: int  # required: this kind has no default for it
    scale: float = 1.0


class _Holder(Spec):
    slot: Annotated[Union[_Plain, _Sized], Field(discriminator="kind")] = _Plain()


def test_a_new_kind_with_a_required_field_names_it_and_accepts_it():
    with pytest.raises(SpecError, match=r"^slot.size: Field required$"):
        with_changes(_Holder(), {"slot.kind": "sized"})
    assert with_changes(_Holder(), {"slot.kind": "sized", "slot.size": 3}) == _Holder(slot=_Sized(size=3))
    with pytest.raises(SpecError, match="unknown field 'slot.nope'; valid keys at slot: kind, scale, size"):
        with_changes(_Holder(), {"slot.kind": "sized", "slot.nope": 3})


def test_set_refuses_non_finite_json_numbers():
    """json.loads reads NaN and Infinity: --set must refuse them as it refuses any bad number."""
    for assignment in ("model.attention.rope.theta=NaN", "train.grad_clip=Infinity"):
        with pytest.raises(SpecError, match=f"{assignment.partition('=')[0]}: Input should be a finite number"):
            apply_sets(presets.get("deepseek_glm4"), [assignment])


def test_set_keeps_the_text_of_a_string_field_json_reads_as_a_number():
    """Values are JSON first, but a string field keeps the text: data.source=2024 is the string "2024"."""
    spec = apply_sets(presets.get("deepseek_glm4"), ["data.source=2024", "data.text_field=true",
                                                     "eval.hellaswag_path=1.5"])
    assert (spec.data.source, spec.data.text_field, spec.eval.hellaswag_path) == ("2024", "true", "1.5")
    assert apply_sets(presets.get("deepseek_glm4"), ["eval.hellaswag_path=null"]).eval.hellaswag_path is None
    assert apply_sets(presets.get("deepseek_glm4"), ["data.source=\"2024\""]).data.source == "2024"
    with pytest.raises(SpecError, match=r"model.d_model: .*integer.*'abc'"):
        apply_sets(presets.get("deepseek_glm4"), ["model.d_model=abc"])
    with pytest.raises(SpecError, match=r"model.d_model: .*integer.*1.5"):
        apply_sets(presets.get("deepseek_glm4"), ["model.d_model=1.5"])


@pytest.mark.parametrize("assignment,words", [
    ("model.nosuch=1", ["unknown field 'model.nosuch'", "valid keys at model:", "d_model", "ffn"]),
    ("model.ffn.router.nope.x=1", ["unknown field 'model.ffn.router.nope'", "valid keys at model.ffn.router"]),
    ("nothing", ["path=value"]),
    ("model.overrides.0=1", ["model.overrides is a list of 0"]),
])
def test_set_errors_name_valid_keys(assignment, words):
    with pytest.raises(SpecError) as err:
        apply_sets(presets.get("deepseek_glm4"), [assignment])
    for word in words:
        assert word in str(err.value)


def test_diff_of_glm4_and_deepseek_glm4_is_attention_only():
    rows = diff(presets.get("glm4"), presets.get("deepseek_glm4"))
    assert rows and all(path.startswith("model.attention.") for path, _, _ in rows)
    assert ("model.attention.kind", "mha", "mla") in rows


def test_variants_are_small_diffs_from_their_base():
    rows = diff(presets.get("exp1_baseline"), presets.get("exp1_mlp"))
    assert {p.split(".")[1] for p, _, _ in rows} == {"ffn"}
    assert diff(presets.get("exp1_baseline"), presets.get("exp1_baseline")) == []


def test_a_spec_saved_with_val_batches_reads_as_val_blocks():
    """Run folders saved before eval.val_blocks hold eval.val_batches (micro-batches): the same blocks."""
    saved = presets.get("deepseek_glm4").model_dump(mode="json")
    saved["train"]["micro_batch_size"] = 4
    saved["eval"] = {k: v for k, v in saved["eval"].items() if k != "val_blocks"} | {"val_batches": 16}
    assert RunSpec.model_validate(saved).eval.val_blocks == 64
    del saved["train"]["micro_batch_size"]  # the default then (8)
    assert RunSpec.model_validate(saved).eval.val_blocks == 128
    with pytest.raises(ValueError, match="val_blocks"):
        RunSpec.model_validate(saved | {"eval": {"val_blocks": 0}})
    # Anything else is refused by name, not replaced by the default: not a whole number >= 1, or both keys.
    for odd in (2.0, "3", None, "abc", True, 0, -1):
        with pytest.raises(ValueError, match=r"eval\.val_batches"):
            RunSpec.model_validate(saved | {"eval": {"val_batches": odd}})
    with pytest.raises(ValueError, match=r"eval\.val_batches"):
        RunSpec.model_validate(saved | {"eval": {"val_batches": 5, "val_blocks": 7}})


def test_qk_norm_reads_true_and_false_as_per_head_and_none():
    """spec.json files and --set may say qk_norm true/false: the per-head norm, or none."""
    glm4 = presets.get("glm4")
    saved = glm4.model_dump(mode="json")
    saved["model"]["attention"]["qk_norm"] = True
    assert RunSpec.model_validate(saved) == glm4
    assert apply_sets(glm4, ["model.attention.qk_norm=false"]).model.attention.qk_norm is None
    assert apply_sets(glm4, ["model.attention.qk_norm=projection"]).model.attention.qk_norm == "projection"
    with pytest.raises(SpecError, match="model.attention.qk_norm"):
        apply_sets(glm4, ["model.attention.qk_norm=layer"])
