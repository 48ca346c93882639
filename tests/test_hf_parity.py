"""Parity with the reference implementations in transformers: DeepSeek-V3 and GLM-4-MoE (no network).

Every case builds a random tiny transformers model (every weight random, norms, biases and the routing
correction bias included, so that no mapping error hides behind a default), saves it with
save_pretrained (experts per expert on disk, as released checkpoints), reads it with
`zoo.interop.hf.from_hf` and compares fp32 logits (max |diff| <= 1e-4 and the same argmax at every
position) and the loss with labels (within 1e-5). fp32 matmuls in a different order (SDPA vs eager,
dropless dispatch vs transformers' expert loop) differ by ~1e-6 on logits of size ~1; the tolerances
leave a margin of 50x and still catch any real mapping error (those are O(0.1)).

Export goes the other way: zoo -> to_hf -> AutoModelForCausalLM.from_pretrained gives the zoo's logits,
and transformers' generate() runs on the result. The largest differences are written to
`hf_parity_diffs.json` in pytest's base temp dir and printed at the end (run with -s to see them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars in the test log

from zoo import build, presets  # noqa: E402
from zoo.checkpoint import load_run_folder  # noqa: E402
from zoo.cli import main  # noqa: E402
from zoo.interop.hf import from_hf, hf_config_dict, to_hf  # noqa: E402
from zoo.overrides import SpecError, with_changes  # noqa: E402
from zoo.specs import DynamicNTKScaling, LayerOverride, MHASpec, YarnScaling  # noqa: E402

# transformers builds zero-width shared experts when n_shared_experts = 0, and torch warns about them
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

LOGITS_ATOL, LOSS_ATOL = 1e-4, 1e-5
VOCAB, BATCH, SEQ = 128, 2, 12
DIFFS: dict[str, dict[str, float]] = {}

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5,
)
DEEPSEEK = dict(COMMON, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=16)
GLM = dict(COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16)

# YaRN from 16 to 64 positions (factor 4); the correction range then covers part of the rotary dims.
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)


@dataclass
class Case:
    arch: str  # "deepseek_v3" | "glm4_moe"
    fields: dict
    attn: str = "eager"
    seq: int = SEQ
    save: dict = field(default_factory=dict)  # save_pretrained options: on-disk layout, sharding


def ds(**changes) -> Case:
    return Case("deepseek_v3", {**DEEPSEEK, **changes})


def glm(**changes) -> Case:
    return Case("glm4_moe", {**GLM, **changes})


CASES = {
    "ds-qlora-g1x1-dense1-shared1-norm-rsf2.5-rope_none": ds(
        q_lora_rank=32, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_interleave=True),
    "ds-noqlora-g4x2-dense0-shared0-nonorm-rsf1-linear-halfrope": ds(
        q_lora_rank=None, n_group=4, topk_group=2, first_k_dense_replace=0, n_shared_experts=0, norm_topk_prob=False,
        routed_scaling_factor=1.0, rope_interleave=False, rope_parameters=dict(rope_type="linear", factor=2.0)),
    "ds-qlora-g4x2-dense2-shared2-norm-rsf2.5-yarn_mscale-bias": ds(
        q_lora_rank=32, n_group=4, topk_group=2, first_k_dense_replace=2, n_shared_experts=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, attention_bias=True,
        rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.8)),
    "ds-noqlora-g1x1-dense1-shared1-nonorm-rsf1.5-yarn_msad_only_notrunc": ds(
        q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, norm_topk_prob=False,
        routed_scaling_factor=1.5,
        rope_parameters=dict(YARN, mscale_all_dim=0.707, beta_fast=16, beta_slow=2, truncate=False)),
    "ds-qlora-g4x2-dense1-shared1-dynamic_beyond_max-tied": Case("deepseek_v3", {
        **DEEPSEEK, "q_lora_rank": 32, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5, "tie_word_embeddings": True, "max_position_embeddings": 16,
        "rope_parameters": dict(rope_type="dynamic", factor=2.0)}, seq=24),
    "ds-qlora-g1x1-dense1-shared1-sdpa": Case("deepseek_v3", {
        **DEEPSEEK, "q_lora_rank": 32, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5}, attn="sdpa"),
    "ds-all_dense": ds(q_lora_rank=32, first_k_dense_replace=3),
    "glm-partial0.5-qknorm-qkvbias-g1x1-dense1-shared1-norm-rsf1-rope_none": glm(
        partial_rotary_factor=0.5, use_qk_norm=True, attention_bias=True, n_group=1, topk_group=1,
        first_k_dense_replace=1, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=1.0),
    "glm-fullrotary-mqa-headdim32-g4x2-dense0-shared0-nonorm-rsf2.5-linear": glm(
        num_key_value_heads=1, head_dim=32, use_qk_norm=False, attention_bias=False, n_group=4, topk_group=2,
        first_k_dense_replace=0, n_shared_experts=0, norm_topk_prob=False, routed_scaling_factor=2.5,
        rope_parameters=dict(rope_type="linear", factor=2.0, partial_rotary_factor=1.0)),
    "glm-partial0.5-qknorm-qkvbias-g4x2-dense2-shared2-norm-rsf2.5-yarn": glm(
        use_qk_norm=True, attention_bias=True, n_group=4, topk_group=2, first_k_dense_replace=2,
        n_shared_experts=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_parameters=dict(YARN, partial_rotary_factor=0.5, mscale_all_dim=1.0)),
    "glm-partial0.25-qknorm-g1x1-dense1-shared1-dynamic_beyond_max-tied": Case("glm4_moe", {
        **GLM, "use_qk_norm": True, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
        "tie_word_embeddings": True, "max_position_embeddings": 16,
        "rope_parameters": dict(rope_type="dynamic", factor=2.0, partial_rotary_factor=0.25)}, seq=24),
    "glm-partial0.5-qknorm-qkvbias-g1x1-dense1-shared1-sdpa": Case("glm4_moe", {
        **GLM, "use_qk_norm": True, "attention_bias": True, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5}, attn="sdpa"),
    "glm-all_dense": glm(use_qk_norm=True, first_k_dense_replace=3),
    # On-disk layouts other than the default per-expert one.
    "ds-stacked_experts_on_disk-sharded": Case("deepseek_v3", {
        **DEEPSEEK, "q_lora_rank": 32, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1},
        save=dict(save_original_format=False, max_shard_size="40KB")),
    "glm-per_expert-sharded": Case("glm4_moe", {**GLM, "use_qk_norm": True, "first_k_dense_replace": 1},
                                   save=dict(max_shard_size="40KB")),
}


def randomize_(model: torch.nn.Module) -> None:
    """Every weight random at a scale that keeps activations O(1): no default (ones, zeros) can hide
    a wrongly mapped tensor. The routing correction bias too, so selection depends on it."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.numel() == 0:
                continue
            if param.ndim >= 2:
                param.normal_(0.0, 1.0 if "embed" in name else param.shape[-1] ** -0.5)
            elif "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)


def make_hf(case: Case, path, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(case.arch, **case.fields)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=case.attn).eval()
    randomize_(model)
    model.save_pretrained(path, **case.save)
    return model


def inputs(seq: int = SEQ, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (BATCH, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100  # ignored positions count in neither loss
    return ids, labels


def compare(name: str, hf_logits, hf_loss, zoo_logits, zoo_loss) -> None:
    logit_diff = (hf_logits - zoo_logits).abs().max().item()
    loss_diff = (hf_loss - zoo_loss).abs().item()
    DIFFS[name] = {"logits": logit_diff, "loss": loss_diff}
    assert logit_diff <= LOGITS_ATOL, f"{name}: max |logit diff| {logit_diff:.3g}"
    assert torch.equal(hf_logits.argmax(-1), zoo_logits.argmax(-1)), f"{name}: argmax differs"
    assert loss_diff <= LOSS_ATOL, f"{name}: |loss diff| {loss_diff:.3g}"


@pytest.fixture(scope="module", autouse=True)
def report(tmp_path_factory):
    yield
    out = tmp_path_factory.getbasetemp() / "hf_parity_diffs.json"
    out.write_text(json.dumps(DIFFS, indent=2) + "\n")
    width = max(map(len, DIFFS), default=0)
    print(f"\nHF parity, max |diff| (written to {out}):")
    for name, diff in DIFFS.items():
        print(f"  {name:<{width}}  logits {diff['logits']:.2e}  loss {diff['loss']:.2e}")


# ----------------------------------------------------------------------------- import parity


@pytest.mark.parametrize("name", list(CASES))
def test_from_hf_matches_transformers(name, tmp_path):
    case = CASES[name]
    hf = make_hf(case, tmp_path)
    model, spec = from_hf(tmp_path)
    ids, labels = inputs(case.seq)
    with torch.no_grad():
        ref = hf(ids, labels=labels)
        ours = model(ids, labels=labels)
    compare(name, ref.logits, ref.loss, ours.logits, ours.loss)

    if model.moe_layers():  # the correction bias is load-bearing: without it, routing changes
        with torch.no_grad():
            for moe in model.moe_layers().values():
                moe.router.e_score_correction_bias.zero_()
            assert (model(ids).logits - ours.logits).abs().max() > 1e-3


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
    assert spec.attention.rotary_fraction == 0.5 and spec.attention.qk_norm and spec.attention.qkv_bias
    assert (spec.ffn.n_experts, spec.ffn.top_k, spec.ffn.n_shared_experts) == (8, 2, 2)
    assert (spec.ffn.router.n_groups, spec.ffn.router.topk_groups) == (4, 2)
    assert isinstance(spec.attention.rope.scaling, YarnScaling)
    # glm4_moe uses mscale_all_dim only together with mscale: alone, it means plain YaRN
    assert spec.attention.rope.scaling.mscale_all_dim == 0.0


# ----------------------------------------------------------------------------- export


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat((ids, model(ids).logits[:, -1:].argmax(-1)), dim=1)
    return ids


@pytest.mark.parametrize("name", [
    "ds-qlora-g4x2-dense2-shared2-norm-rsf2.5-yarn_mscale-bias",
    "ds-noqlora-g4x2-dense0-shared0-nonorm-rsf1-linear-halfrope",
    "glm-partial0.5-qknorm-qkvbias-g4x2-dense2-shared2-norm-rsf2.5-yarn",
    "glm-fullrotary-mqa-headdim32-g4x2-dense0-shared0-nonorm-rsf2.5-linear",
    "glm-partial0.25-qknorm-g1x1-dense1-shared1-dynamic_beyond_max-tied",
])
def test_export_round_trip(name, tmp_path):
    """HF -> zoo -> HF: transformers loads the export (no missing or unexpected weight) with the zoo's logits."""
    case = CASES[name]
    make_hf(case, tmp_path / "src")
    model, spec = from_hf(tmp_path / "src")
    to_hf(model, spec, tmp_path / "out")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, labels = inputs(case.seq)
    with torch.no_grad():
        ref, ours = hf(ids, labels=labels), model(ids, labels=labels)
    compare(f"export:{name}", ref.logits, ref.loss, ours.logits, ours.loss)


@pytest.mark.parametrize("preset", ["deepseek", "glm4", "dense"])
def test_zoo_preset_exports_and_generates(preset, tmp_path):
    """zoo -> HF: a zoo-native model (tiny preset, random weights) exports; transformers gives its logits
    and generate() runs with its KV cache, producing the zoo's greedy continuation."""
    spec = presets.get(preset, tiny=True).model
    model = build(spec).eval()
    randomize_(model)
    to_hf(model, spec, tmp_path, special_tokens={"eos_token_id": 1, "pad_token_id": 0})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids, labels = inputs(vocab=spec.vocab_size)
    with torch.no_grad():
        ref, ours = hf(ids, labels=labels), model(ids, labels=labels)
    compare(f"export:preset-{preset}", ref.logits, ref.loss, ours.logits, ours.ce_loss)

    prompt = ids[:1, :5]
    generated = hf.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert generated.shape == (1, 11)
    assert torch.equal(generated, greedy(model, prompt, 6))


def test_export_writes_per_expert_shards(tmp_path):
    spec = presets.get("glm4", tiny=True).model
    model = build(spec)
    to_hf(model, spec, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in index and len(set(index.values())) > 1
    reread, _ = from_hf(tmp_path)
    ids, _ = inputs(vocab=spec.vocab_size)
    with torch.no_grad():
        assert torch.equal(reread(ids).logits, model.eval()(ids).logits)


# ----------------------------------------------------------------------------- errors name the field


def _edit_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes,words", [
    ({"model_type": "llama"}, ["model_type", "llama"]),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}, ["rope_type", "llama3"]),
    ({"scoring_func": "softmax"}, ["scoring_func"]),
    ({"hidden_act": "gelu"}, ["hidden_act"]),
    ({"attention_dropout": 0.1}, ["attention_dropout"]),
    ({"quantization_config": {"quant_method": "fp8"}}, ["quantization_config"]),
    ({"n_routed_experts": 16}, ["mlp.gate.weight", "(16, 64)"]),
    ({"num_hidden_layers": 4}, ["model.layers.3.", "lacks"]),
])
def test_import_errors_name_the_field(changes, words, tmp_path):
    make_hf(CASES["ds-qlora-g1x1-dense1-shared1-norm-rsf2.5-rope_none"], tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(SpecError) as err:
        from_hf(tmp_path)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_glm_yarn_with_both_mscales_is_refused(tmp_path):
    make_hf(CASES["glm-partial0.5-qknorm-qkvbias-g1x1-dense1-shared1-norm-rsf1-rope_none"], tmp_path)
    _edit_config(tmp_path, rope_parameters=dict(YARN, partial_rotary_factor=0.5, mscale=1.0, mscale_all_dim=0.8))
    with pytest.raises(SpecError, match="mscale_all_dim"):
        from_hf(tmp_path)


def test_missing_directory_or_config(tmp_path):
    with pytest.raises(SpecError, match="no such directory"):
        from_hf(tmp_path / "absent")
    with pytest.raises(SpecError, match="config.json"):
        from_hf(tmp_path)


def test_export_errors_name_the_field(tmp_path):
    with pytest.raises(SpecError, match=r"model\.ffn\.router\.kind='softmax_topk'"):
        hf_config_dict(presets.get("baseline").model)
    glm4 = presets.get("glm4", tiny=True).model
    yarn = YarnScaling(factor=4.0, original_max_seq_len=16, mscale_all_dim=1.0)
    with pytest.raises(SpecError, match=r"model\.attention\.rope\.scaling\.mscale_all_dim"):
        hf_config_dict(with_changes(glm4, {"attention.rope.scaling": yarn}))
    dynamic = DynamicNTKScaling(factor=2.0, original_max_seq_len=16)
    with pytest.raises(SpecError, match=r"original_max_seq_len"):
        hf_config_dict(with_changes(glm4, {"attention.rope.scaling": dynamic}))
    mixed = with_changes(glm4, {"overrides": [LayerOverride(layers=[2], attention=MHASpec(n_heads=4))]})
    with pytest.raises(SpecError, match=r"model\.overrides"):
        hf_config_dict(mixed)


# ----------------------------------------------------------------------------- CLI


def test_cli_import_then_export(tmp_path, capsys):
    case = CASES["ds-qlora-g4x2-dense2-shared2-norm-rsf2.5-yarn_mscale-bias"]
    hf = make_hf(case, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "hf_tokenizer" / "tokenizer_config.json").is_file()
    model, run = load_run_folder(tmp_path / "run")
    assert run.data.seq_len <= run.model.max_seq_len
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids, _ = inputs()
    with torch.no_grad():
        reference = hf(ids).logits
        assert (model(ids).logits - reference).abs().max() <= LOGITS_ATOL
        assert (exported(ids).logits - reference).abs().max() <= LOGITS_ATOL
    assert "imported deepseek_v3" in capsys.readouterr().out


@pytest.mark.parametrize("setup,words", [
    ("absent", "no such directory"),
    ("no_config", "config.json"),
    ("llama", "model_type 'llama'"),
])
def test_cli_import_errors_are_one_line_exit_2(setup, words, tmp_path, capsys):
    source = tmp_path / "src"
    if setup != "absent":
        source.mkdir()
    if setup == "llama":
        (source / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["import-hf", str(source), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error:") and words in err and err.count("\n") == 1, err


def test_cli_export_of_a_softmax_run_is_one_line_exit_2(tmp_path, capsys):
    from zoo.checkpoint import save_run_folder

    run = presets.get("baseline", tiny=True)
    save_run_folder(build(run), run, tmp_path / "run")
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.ffn.router.kind" in err and err.count("\n") == 1, err
