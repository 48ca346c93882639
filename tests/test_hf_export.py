"""Export: zoo -> to_hf -> AutoModelForCausalLM.from_pretrained gives the zoo's logits, and transformers'
generate() runs on the result; what no format can say is one line naming the field; `zoo import-hf` and
`zoo export-hf` (DeepSeek-V3 and GLM-4-MoE here; the other formats in tests/test_hf_families.py)."""

from __future__ import annotations

import json

import pytest
import torch

from _hf import CASES, LOGITS_ATOL, compare, export_error, greedy, inputs, make_hf, randomize_, transformers
from _hf import report  # noqa: F401  (fixture)
from zoo import build, presets
from zoo.checkpoint import load_run_folder
from zoo.cli import main
from zoo.interop.hf import from_hf, to_hf
from zoo.overrides import with_changes
from zoo.specs import DynamicNTKScaling, LayerOverride, MHASpec, YarnScaling

# transformers builds zero-width shared experts when n_shared_experts = 0, and torch warns about them
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")


@pytest.mark.parametrize("name", [
    "ds-qlora-g4x2-dense2-shared2-norm-rsf2.5-yarn_mscale-bias",
    "ds-noqlora-g4x2-dense0-shared0-nonorm-rsf1-linear-halfrope",
    "ds-top1-norm-g4x2-dense1-shared1-rsf2.5",
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
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == case.arch
    ids, labels = inputs(case.seq)
    with torch.no_grad():
        ref, ours = hf(ids, labels=labels), model(ids, labels=labels)
    compare(f"export:{name}", ref.logits, ref.loss, ours.logits, ours.ce_loss)


@pytest.mark.parametrize("preset,model_type", [  # seconds each: two in the fast lane
    ("deepseek", "deepseek_v3"), ("dense", "glm4_moe"),
    *(pytest.param(*case, marks=pytest.mark.slow)
      for case in [("glm4", "glm4_moe"), ("qwen3_moe", "qwen3_moe"), ("olmoe", "olmoe"), ("mixtral", "mixtral")]),
])
def test_zoo_preset_exports_and_generates(preset, model_type, tmp_path):
    """zoo -> HF: a zoo-native model (tiny preset, random weights) exports as its format; transformers gives
    its logits and generate() runs with its KV cache, producing the zoo's greedy continuation."""
    spec = presets.get(preset, tiny=True).model
    model = build(spec).eval()
    randomize_(model)
    to_hf(model, spec, tmp_path, special_tokens={"eos_token_id": 1, "pad_token_id": 0})
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
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


def test_export_errors_name_the_field():
    # A softmax router without q/k norm: Mixtral's layout, which renormalises the top-k weights.
    assert export_error(presets.get("baseline").model) == (
        "model.ffn.router.norm_topk_prob=False: mixtral renormalises the top-k weights (a softmax over the selected "
        "logits); set it to true")
    # A dense model with per-head q/k norm resembles two formats; neither has an output bias alone.
    dense = with_changes(presets.get("dense", tiny=True).model, {"attention.qk_norm": "head", "attention.o_bias": True})
    assert export_error(dense) == (
        "no Hugging Face format expresses this spec: model.attention.o_bias=True: glm4_moe has no output bias; set "
        "it to false; model.attention.o_bias=True: qwen3_moe has one attention_bias for q/k/v and the output; set it "
        "to qkv_bias (False)")
    glm4 = presets.get("glm4", tiny=True).model
    yarn = YarnScaling(factor=4.0, original_max_seq_len=16, mscale_all_dim=1.0)
    assert export_error(with_changes(glm4, {"attention.rope.scaling": yarn})).startswith(
        "model.attention.rope.scaling.mscale_all_dim=1.0: the zoo then rescales the softmax")
    dynamic = DynamicNTKScaling(factor=2.0, original_max_seq_len=16)
    assert "original_max_seq_len" in export_error(with_changes(glm4, {"attention.rope.scaling": dynamic}))
    mixed = with_changes(glm4, {"overrides": [LayerOverride(layers=[2], attention=MHASpec(n_heads=4))]})
    assert export_error(mixed).startswith("model.overrides: layer 2 has a different attention from layer 0")
    assert export_error(with_changes(glm4, {"attention.sliding_window": 64})) == (
        "model.attention.sliding_window=64: glm4_moe has no sliding window; set it to null")
    interleaved = with_changes(glm4, {"overrides": [LayerOverride(layers=[2], ffn=glm4.dense_ffn)]})
    assert "dense layers [0, 2] break the layout glm4_moe can express" in export_error(interleaved)


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
    assert "model.ffn.router.norm_topk_prob" in err and err.count("\n") == 1, err
