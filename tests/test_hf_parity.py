"""Import parity with the reference implementations in transformers: DeepSeek-V3 and GLM-4-MoE.

Every case builds a random tiny transformers model, saves it with save_pretrained (experts per expert
on disk, as released checkpoints), reads it with `zoo.interop.hf.from_hf` and compares fp32 logits and
the loss (tests/_hf.py says how and why those tolerances). Export and the CLI: tests/test_hf_export.py;
Qwen3-MoE, OLMoE and Mixtral: tests/test_hf_families.py.
"""

from __future__ import annotations

import pytest
import torch

from _hf import CASES, LOGITS_ATOL, YARN, Case, compare, edit_config, inputs, make_hf
from _hf import report  # noqa: F401  (fixture)
from zoo.interop.hf import from_hf
from zoo.overrides import SpecError
from zoo.specs import YarnScaling

# transformers builds zero-width shared experts when n_shared_experts = 0, and torch warns about them
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")


@pytest.mark.parametrize("name", list(CASES))
def test_from_hf_matches_transformers(name, tmp_path):
    case = CASES[name]
    hf = make_hf(case, tmp_path)
    model, spec = from_hf(tmp_path)
    ids, labels = inputs(case.seq)
    with torch.no_grad():
        ref = hf(ids, labels=labels)
        ours = model(ids, labels=labels)
    compare(name, ref.logits, ref.loss, ours.logits, ours.ce_loss)

    if model.moe_layers():  # the correction bias is load-bearing: without it, routing changes
        with torch.no_grad():
            for moe in model.moe_layers().values():
                moe.router.e_score_correction_bias.zero_()
            assert (model(ids).logits - ours.logits).abs().max() > 1e-3


def test_top1_renormalised_deepseek_imports_with_its_constant_weights(tmp_path):
    """transformers builds and runs it; the spec rule against it protects training only (a warning there)."""
    make_hf(CASES["ds-top1-norm-g4x2-dense1-shared1-rsf2.5"], tmp_path)
    _, spec = from_hf(tmp_path)
    assert (spec.ffn.top_k, spec.ffn.router.norm_topk_prob, spec.ffn.router.routed_scaling_factor) == (1, True, 2.5)
    [warning] = spec.training_warnings()
    assert "top_k (1) with router.norm_topk_prob (True)" in warning


def test_save_pretrained_stores_experts_one_by_one(tmp_path):
    """What the reader must handle: transformers v5 stacks experts in memory but saves them per expert."""
    make_hf(CASES["ds-qlora-g1x1-dense1-shared1-norm-rsf2.5-rope_none"], tmp_path)
    from safetensors import safe_open

    keys = set(safe_open(str(tmp_path / "model.safetensors"), "pt").keys())
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert not any(key.endswith("experts.gate_up_proj") for key in keys)


def test_imported_spec_reads_like_the_config(tmp_path):
    make_hf(CASES["glm-partial0.5-qknorm-qkvbias-g4x2-dense2-shared2-norm-rsf2.5-yarn"], tmp_path)
    _, spec = from_hf(tmp_path)
    assert spec.first_k_dense == 2 and spec.dense_ffn.d_hidden == 96
    assert spec.attention.rotary_fraction == 0.5 and spec.attention.qk_norm == "head" and spec.attention.qkv_bias
    assert (spec.ffn.n_experts, spec.ffn.top_k, spec.ffn.n_shared_experts) == (8, 2, 2)
    assert (spec.ffn.router.n_groups, spec.ffn.router.topk_groups) == (4, 2)
    assert isinstance(spec.attention.rope.scaling, YarnScaling)
    # glm4_moe uses mscale_all_dim only together with mscale: alone, it means plain YaRN
    assert spec.attention.rope.scaling.mscale_all_dim == 0.0


def test_swish_is_silu(tmp_path):
    """transformers' ACT2FN maps both names to x * sigmoid(x)."""
    case = CASES["glm-partial0.5-qknorm-qkvbias-g1x1-dense1-shared1-norm-rsf1-rope_none"]
    hf = make_hf(Case(case.arch, {**case.fields, "hidden_act": "swish"}), tmp_path)
    model, _ = from_hf(tmp_path)
    ids, _ = inputs()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() <= LOGITS_ATOL


def test_training_only_fields_are_dropped_with_a_warning(tmp_path):
    """Attention dropout changes training only: evaluation and generation compute the same logits."""
    case = CASES["glm-partial0.5-qknorm-qkvbias-g1x1-dense1-shared1-norm-rsf1-rope_none"]
    hf = make_hf(case, tmp_path)
    edit_config(tmp_path, attention_dropout=0.1)
    with pytest.warns(UserWarning, match=r"attention_dropout=0.1 is not carried: the zoo has no attention dropout"):
        model, _ = from_hf(tmp_path)
    ids, _ = inputs()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() <= LOGITS_ATOL


# ----------------------------------------------------------------------------- errors name the field


@pytest.mark.parametrize("changes,words", [
    ({"model_type": "llama"}, ["model_type", "llama"]),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}, ["rope_type", "llama3"]),
    ({"scoring_func": "softmax"}, ["scoring_func"]),
    ({"hidden_act": "gelu"}, ["hidden_act"]),
    ({"quantization_config": {"quant_method": "fp8"}}, ["quantization_config"]),
    ({"n_routed_experts": 16}, ["mlp.gate.weight", "(16, 64)"]),
    ({"num_hidden_layers": 4}, ["model.layers.3.", "lacks"]),
])
def test_import_errors_name_the_field(changes, words, tmp_path):
    make_hf(CASES["ds-qlora-g1x1-dense1-shared1-norm-rsf2.5-rope_none"], tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(SpecError) as err:
        from_hf(tmp_path)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_glm_yarn_with_both_mscales_is_refused(tmp_path):
    make_hf(CASES["glm-partial0.5-qknorm-qkvbias-g1x1-dense1-shared1-norm-rsf1-rope_none"], tmp_path)
    edit_config(tmp_path, rope_parameters=dict(YARN, partial_rotary_factor=0.5, mscale=1.0, mscale_all_dim=0.8))
    with pytest.raises(SpecError, match="mscale_all_dim"):
        from_hf(tmp_path)


def test_missing_directory_or_config(tmp_path):
    with pytest.raises(SpecError, match="no such directory"):
        from_hf(tmp_path / "absent")
    with pytest.raises(SpecError, match="config.json"):
        from_hf(tmp_path)

