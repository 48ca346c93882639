"""Qwen3-MoE, OLMoE and Mixtral: import parity with transformers on random tiny configs with odd shapes
(head counts and widths that divide nothing evenly, explicit head_dim, GQA down to one kv head), the
export back, and what neither side can say (tests/_hf.py says how logits and loss are compared)."""

from __future__ import annotations

import json

import pytest
import torch

from _hf import VOCAB, Case, compare, edit_config, export_error, inputs, make_hf, transformers
from _training import ROOT
from _hf import report  # noqa: F401  (fixture)
from zoo.interop.hf import from_hf, to_hf
from zoo.overrides import SpecError, with_changes
from zoo import presets

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)
SHARED = dict(vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5, eos_token_id=2, pad_token_id=0)
QWEN3 = dict(SHARED, hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=12, intermediate_size=72,
             moe_intermediate_size=24, num_experts=7, num_experts_per_tok=3, num_hidden_layers=5)
OLMOE = dict(SHARED, hidden_size=36, num_attention_heads=3, num_key_value_heads=1, intermediate_size=20,
             num_experts=5, num_experts_per_tok=2, num_hidden_layers=3)
MIXTRAL = dict(SHARED, hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=10, intermediate_size=28,
               num_local_experts=6, num_experts_per_tok=2, num_hidden_layers=3)

CASES = {
    # decoder_sparse_step 2: layers 1 and 3 are MoE, 0, 2 and 4 dense (an override in the zoo).
    "qwen3-gqa5x1-hd12-top3norm-step2-bias": Case("qwen3_moe", dict(
        QWEN3, norm_topk_prob=True, decoder_sparse_step=2, attention_bias=True)),
    # mlp_only_layers [0, 1]: the zoo's first_k_dense 2. A window of 5 over 12 positions, YaRN.
    "qwen3-top3-nonorm-mlp_only01-window5-yarn": Case("qwen3_moe", dict(
        QWEN3, norm_topk_prob=False, mlp_only_layers=[0, 1], use_sliding_window=True, sliding_window=5,
        rope_parameters=YARN)),
    "qwen3-top1norm-window4-tied-sdpa": Case("qwen3_moe", dict(
        QWEN3, num_experts_per_tok=1, norm_topk_prob=True, use_sliding_window=True, sliding_window=4,
        tie_word_embeddings=True), attn="sdpa"),
    "qwen3-all_dense": Case("qwen3_moe", dict(QWEN3, mlp_only_layers=[0, 1, 2, 3, 4])),
    "olmoe-gqa3x1-top2-nonorm-bias-linear": Case("olmoe", dict(
        OLMOE, norm_topk_prob=False, attention_bias=True, rope_parameters=dict(rope_type="linear", factor=2.0))),
    "olmoe-mha-top3norm-dynamic_beyond_max-tied-sdpa": Case("olmoe", dict(
        OLMOE, num_key_value_heads=3, num_experts_per_tok=3, norm_topk_prob=True, tie_word_embeddings=True,
        max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic", factor=2.0)), attn="sdpa", seq=24),
    "mixtral-gqa5x1-hd10-top2-window7": Case("mixtral", dict(MIXTRAL, sliding_window=7), seq=16),
    "mixtral-top1-yarn-tied-sdpa": Case("mixtral", dict(
        MIXTRAL, num_experts_per_tok=1, tie_word_embeddings=True, rope_parameters=YARN), attn="sdpa"),
    # transformers' in-memory names on disk (mlp.experts.gate_up_proj), in shards.
    "mixtral-stacked_on_disk-sharded": Case("mixtral", dict(MIXTRAL, sliding_window=5),
                                            save=dict(save_original_format=False, max_shard_size="60KB")),
}


FAST = ("qwen3-gqa5x1-hd12-top3norm-step2-bias", "olmoe-gqa3x1-top2-nonorm-bias-linear",
        "mixtral-gqa5x1-hd10-top2-window7")  # one case per family in the fast lane


@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name in FAST else pytest.mark.slow)
                                  for name in CASES])
def test_from_hf_matches_transformers_and_exports_back(name, tmp_path):
    case = CASES[name]
    hf = make_hf(case, tmp_path / "src")
    model, spec = from_hf(tmp_path / "src")
    ids, labels = inputs(case.seq)
    with torch.no_grad():
        ref, ours = hf(ids, labels=labels), model(ids, labels=labels)
    compare(name, ref.logits, ref.loss, ours.logits, ours.ce_loss)

    # The mapping is load-bearing: routing by other weights, or attending past the window, moves the logits.
    with torch.no_grad():
        for moe in model.moe_layers().values():
            moe.router.weight.neg_()
        if model.moe_layers():
            assert (model(ids).logits - ours.logits).abs().max() > 1e-3
            for moe in model.moe_layers().values():
                moe.router.weight.neg_()
        if spec.attention.sliding_window:
            for layer in model.layers:
                layer.attention.sliding_window = None
            assert (model(ids).logits - ours.logits).abs().max() > 1e-3
            for layer in model.layers:
                layer.attention.sliding_window = spec.attention.sliding_window

    to_hf(model, spec, tmp_path / "out")
    # A dense model with per-head q/k norm is glm4_moe's too, the first format that can say it.
    expected = "glm4_moe" if name == "qwen3-all_dense" else case.arch
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == expected
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation=case.attn, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        again = exported(ids, labels=labels)
    compare(f"export:{name}", again.logits, again.loss, ours.logits, ours.ce_loss)


def test_imported_specs_read_like_their_configs(tmp_path):
    make_hf(CASES["qwen3-gqa5x1-hd12-top3norm-step2-bias"], tmp_path / "q")
    _, qwen3 = from_hf(tmp_path / "q")
    assert [layer.ffn.kind for layer in qwen3.layer_specs()] == ["mlp", "moe", "mlp", "moe", "mlp"]
    assert qwen3.attention.qk_norm == "head" and qwen3.attention.qkv_bias and qwen3.attention.o_bias
    assert (qwen3.attention.n_heads, qwen3.attention.n_kv_heads, qwen3.attention.head_dim) == (5, 1, 12)
    assert qwen3.ffn.router.kind == "softmax_topk" and qwen3.ffn.router.norm_topk_prob
    make_hf(CASES["qwen3-top3-nonorm-mlp_only01-window5-yarn"], tmp_path / "w")
    _, windowed = from_hf(tmp_path / "w")
    assert windowed.first_k_dense == 2 and windowed.attention.sliding_window == 5
    make_hf(CASES["olmoe-gqa3x1-top2-nonorm-bias-linear"], tmp_path / "o")
    _, olmoe = from_hf(tmp_path / "o")
    assert olmoe.attention.qk_norm == "projection" and olmoe.ffn.d_expert == 20 and olmoe.first_k_dense == 0
    assert not olmoe.ffn.router.norm_topk_prob
    make_hf(CASES["mixtral-gqa5x1-hd10-top2-window7"], tmp_path / "m")
    _, mixtral = from_hf(tmp_path / "m")
    assert mixtral.attention.qk_norm is None and mixtral.attention.sliding_window == 7
    assert mixtral.ffn.router.norm_topk_prob and (mixtral.ffn.n_experts, mixtral.ffn.d_expert) == (6, 28)


def test_mixtral_checkpoints_use_their_released_names(tmp_path):
    make_hf(CASES["mixtral-gqa5x1-hd10-top2-window7"], tmp_path / "src")
    from safetensors import safe_open

    keys = set(safe_open(str(tmp_path / "src" / "model.safetensors"), "pt").keys())
    assert {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.block_sparse_moe.experts.5.w3.weight"} <= keys
    model, spec = from_hf(tmp_path / "src")
    to_hf(model, spec, tmp_path / "out")
    assert set(safe_open(str(tmp_path / "out" / "model.safetensors"), "pt").keys()) == keys


# ----------------------------------------------------------------------------- what a format cannot say


def test_import_errors_name_the_field(tmp_path):
    make_hf(CASES["olmoe-gqa3x1-top2-nonorm-bias-linear"], tmp_path)
    edit_config(tmp_path, clip_qkv=8.0)
    with pytest.raises(SpecError, match=r"^config.json clip_qkv=8.0: the zoo does not clip q, k and v"):
        from_hf(tmp_path)


def test_export_errors_name_the_field():
    qwen3, olmoe, mixtral = (presets.get(name, tiny=True).model for name in ("qwen3_moe", "olmoe", "mixtral"))
    assert export_error(with_changes(qwen3, {"ffn.n_shared_experts": 1})) == (
        "model.ffn.n_shared_experts=1: qwen3_moe has no shared experts; set it to 0")
    assert "model.attention.o_bias=True: qwen3_moe has one attention_bias for q/k/v and the output" in (
        export_error(with_changes(qwen3, {"attention.o_bias": True})))
    assert export_error(with_changes(olmoe, {"attention.head_dim": 8})).startswith(
        "model.attention.head_dim x n_heads=32: olmoe sizes its q norm by hidden_size")
    assert "model.attention.sliding_window=8: olmoe has no sliding window" in (
        export_error(with_changes(olmoe, {"attention.sliding_window": 8})))
    # OLMoE and Mixtral have no dense layer: a dense layer leaves Qwen3-MoE, whose attention differs.
    dense_first = with_changes(mixtral, {"first_k_dense": 1, "dense_ffn": {"kind": "mlp", "d_hidden": 32}})
    assert export_error(dense_first) == (
        "model.attention.qk_norm=None: qwen3_moe normalises q and k per head; set it to 'head'")
    assert export_error(with_changes(mixtral, {"ffn.router.norm_topk_prob": False})).endswith(
        "model.ffn.router.norm_topk_prob=False: mixtral renormalises the top-k weights (a softmax over the "
        "selected logits); set it to true")
    # Only deepseek_v3 and glm4_moe hold MTP layers: a softmax-routed spec with them has no format.
    for model_type, spec in (("qwen3_moe", qwen3), ("olmoe", olmoe), ("mixtral", mixtral)):
        assert export_error(with_changes(spec, {"mtp.depth": 1})) == (
            f"model.mtp.depth=1: {model_type} has no multi-token-prediction layers (deepseek_v3 and glm4_moe "
            "have); set it to 0")


def test_cli_import_refuses_in_one_line_what_the_zoo_cannot_express(tmp_path, capsys):
    from zoo.cli import main

    make_hf(CASES["olmoe-gqa3x1-top2-nonorm-bias-linear"], tmp_path / "src")
    edit_config(tmp_path / "src", clip_qkv=8.0)
    assert main(["import-hf", str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error:") and "clip_qkv=8.0" in err and err.count("\n") == 1, err
    # A training-only field is left out with a line saying so, and the import goes on.
    edit_config(tmp_path / "src", clip_qkv=None, attention_dropout=0.1)
    assert main(["import-hf", str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 0
    assert ("warning: config.json attention_dropout=0.1 is not carried: the zoo has no attention dropout"
            in capsys.readouterr().out)


# ----------------------------------------------------------------------------- zoo import-hf, generate, eval

HELLASWAG = ROOT.parent / "shared" / "data" / "hellaswag_val.jsonl"
CLI_SHAPES = {"qwen3_moe": QWEN3, "olmoe": OLMOE, "mixtral": MIXTRAL}


@pytest.fixture(scope="module")
def hf_tokenizer_files(tmp_path_factory):
    """A byte-level BPE tokenizer (300 pieces, trained on Tiny Shakespeare) saved as transformers saves
    one: what Qwen3-MoE and OLMoE checkpoints ship (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").read_text().splitlines()[:4000]
    bpe.train_from_iterator(text, trainer)
    path = tmp_path_factory.mktemp("hf_tokenizer")
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(path)
    return path


# lm-eval and a tokenizer per family take seconds: one family in the fast lane.
@pytest.mark.parametrize("arch", [pytest.param(arch, marks=[] if arch == "mixtral" else pytest.mark.slow)
                                  for arch in CLI_SHAPES])
def test_cli_import_then_generate_and_eval(arch, hf_tokenizer_files, tmp_path, capsys):
    """A checkpoint with its own tokenizer: `zoo import-hf`, then `zoo generate` (the greedy tokens of
    transformers' generate) and `zoo eval` on three HellaSwag items of a local file."""
    import shutil

    from zoo.cli import main

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_files)
    # The model's vocabulary is the tokenizer's: zoo generate samples only ids the tokenizer can decode.
    fields = dict(CLI_SHAPES[arch], vocab_size=len(tokenizer), max_position_embeddings=256, eos_token_id=0)
    hf = make_hf(Case(arch, fields), tmp_path / "hf")
    for item in hf_tokenizer_files.iterdir():
        shutil.copy2(item, tmp_path / "hf" / item.name)
    run = tmp_path / "run"
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(run)]) == 0
    assert f"imported {arch}" in capsys.readouterr().out

    assert main(["generate", str(run), "--prompt", "First Citizen:", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    prompt = torch.tensor([[tokenizer.eos_token_id, *tokenizer.encode("First Citizen:")]])
    with torch.no_grad():
        # The prompt's EOS is also the pad id here: the explicit mask keeps generate() from hiding it.
        reference = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert printed.strip() == "First Citizen:" + tokenizer.decode(reference[0, prompt.shape[1]:])

    output = tmp_path / "eval.json"
    assert main(["eval", str(run), "--tasks", "hellaswag", "--data-file", f"hellaswag={HELLASWAG}", "--limit", "3",
                 "--output", str(output)]) == 0
    assert "hellaswag" in capsys.readouterr().out
    hellaswag = json.loads(output.read_text())["tasks"]["hellaswag"]
    assert hellaswag["n"] == 3 and hellaswag["acc"] in (0.0, 1 / 3, 2 / 3, 1.0)
