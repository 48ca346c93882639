"""Multi-token-prediction layers in Hugging Face checkpoints: import, export, and parity with the released layout.

transformers drops MTP layers, so the reference here is written from the layout DeepSeek-V3 and GLM-4.5
release (README_WEIGHTS.md of DeepSeek-V3): MTP module 1 is model.layers.{n} (n = num_hidden_layers), a
decoder layer plus enorm, hnorm, eh_proj, shared_head.{norm, head} and embed_tokens. A random tiny
checkpoint is made by saving a transformers model with n + 1 layers (its last layer is the MTP module's
block, in transformers' own layout) and adding the MTP parts; the reference runs transformers' decoder
layer for the block and plain torch for the rest:

    h     = the main model's output (after its final norm)          (B, T, D)
    x     = eh_proj([enorm(embed_tokens(ids[:, 1:])); hnorm(h[:, :-1])])
    x     = DecoderLayer_n(x) at positions 0..T-2, causal
    logits = shared_head.head(shared_head.norm(x))                 token t+2 at position t

Tolerances as in tests/_hf.py (fp32, different matmul order: ~1e-6 observed).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _hf import CASES, LOGITS_ATOL, LOSS_ATOL, inputs, make_hf, randomize_, transformers
from zoo import build, presets
from zoo.checkpoint import save_run_folder
from zoo.cli import main
from zoo.interop.hf import from_hf, hf_config_dict, to_hf
from zoo.interop.hf_mtp import is_mtp_key
from zoo.overrides import SpecError, with_changes
from zoo.specs import LayerOverride, MHASpec

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

DS = CASES["ds-qlora-g1x1-dense1-shared1-norm-rsf2.5-rope_none"]
GLM = CASES["glm-partial0.5-qknorm-qkvbias-g1x1-dense1-shared1-norm-rsf1-rope_none"]
MTP_PARTS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
             "shared_head.head.weight", "embed_tokens.weight")


def make_mtp_checkpoint(case, path, *, own_embedding=False, own_head=False):
    """A released-layout checkpoint with one MTP module; returns (the n+1-layer transformers model whose last
    layer is the module's block, the tensors written)."""
    n = case.fields["num_hidden_layers"]
    full = make_hf(type(case)(case.arch, {**case.fields, "num_hidden_layers": n + 1}), path)
    tensors = load_file(path / "model.safetensors")
    D = case.fields["hidden_size"]
    g = torch.Generator().manual_seed(5)
    prefix = f"model.layers.{n}"
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"{prefix}.{norm}.weight"] = 1.0 + 0.3 * torch.randn(D, generator=g)
    tensors[f"{prefix}.eh_proj.weight"] = torch.randn(D, 2 * D, generator=g) * (2 * D) ** -0.5
    embed, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    tensors[f"{prefix}.embed_tokens.weight"] = torch.randn_like(embed) if own_embedding else embed.clone()
    tensors[f"{prefix}.shared_head.head.weight"] = torch.randn_like(head) * D**-0.5 if own_head else head.clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.update(num_hidden_layers=n, num_nextn_predict_layers=1)
    (path / "config.json").write_text(json.dumps(config))
    return full, tensors


def reference_mtp_logits(main, full, tensors, ids: torch.Tensor) -> torch.Tensor:
    """MTP module 1's logits (B, T - 1, V) from the released layout (see the module docstring): `main` is the
    transformers model of the checkpoint, `full` the n+1-layer one whose last layer is the module's block."""
    from transformers.masking_utils import create_causal_mask

    config = full.config
    n = config.num_hidden_layers - 1
    part = lambda name: tensors[f"model.layers.{n}.{name}"]  # noqa: E731

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps))

    h = main.model(ids).last_hidden_state  # (B, T, D), after the final norm
    e = F.embedding(ids[:, 1:], part("embed_tokens.weight"))
    x = F.linear(torch.cat((rms(e, part("enorm.weight")), rms(h[:, :-1], part("hnorm.weight"))), dim=-1),
                 part("eh_proj.weight"))
    positions = torch.arange(x.shape[1])[None]
    mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=positions)
    x = full.model.layers[n](x, attention_mask=mask, position_ids=positions,
                             position_embeddings=full.model.rotary_emb(x, positions))
    return F.linear(rms(x, part("shared_head.norm.weight")), part("shared_head.head.weight"))


@pytest.mark.parametrize("case,own", [(DS, False), pytest.param(DS, True, marks=pytest.mark.slow),
                                      pytest.param(GLM, False, marks=pytest.mark.slow)],
                         ids=["ds-shared", "ds-own", "glm-shared"])
def test_mtp_module_matches_the_released_layout(case, own, tmp_path):
    full, tensors = make_mtp_checkpoint(case, tmp_path, own_embedding=own, own_head=own)
    model, spec = from_hf(tmp_path)
    assert (spec.n_layers, spec.mtp.depth) == (case.fields["num_hidden_layers"], 1)
    assert spec.mtp.share_embedding == spec.mtp.share_head == (not own)
    ids, labels = inputs(case.seq)
    main = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        ref = reference_mtp_logits(main, full, tensors, ids)
        ours = model(ids, labels=labels)
        assert (ours.logits - main(ids).logits).abs().max() <= LOGITS_ATOL  # the main model, MTP layer aside
    (mtp_logits,) = ours.mtp_logits
    assert (mtp_logits - ref).abs().max() <= LOGITS_ATOL and torch.equal(mtp_logits.argmax(-1), ref.argmax(-1))
    ref_loss = F.cross_entropy(ref[:, :-1].flatten(0, 1), labels[:, 2:].flatten(), ignore_index=-100)
    assert (ours.mtp_losses[0] - ref_loss).abs() <= LOSS_ATOL
    # The reference is sensitive to what it tests: the hidden norm and the concatenation order matter.
    swapped = torch.cat(tensors[f"model.layers.{spec.n_layers}.eh_proj.weight"].chunk(2, dim=1)[::-1], dim=1)
    with torch.no_grad():
        model.mtp[0].eh_proj.weight.copy_(swapped)
        assert (model(ids, labels=labels).mtp_logits[0] - ref).abs().max() > 1e-2


def test_a_checkpoint_saved_by_transformers_has_no_mtp(tmp_path):
    """save_pretrained drops MTP layers but keeps num_nextn_predict_layers (default 1): nothing to read."""
    make_hf(DS, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert from_hf(tmp_path)[1].mtp.depth == 0


def test_an_incomplete_mtp_layer_is_refused(tmp_path):
    make_hf(DS, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpecError, match=r"lacks model\.layers\.3\."):
        from_hf(tmp_path)


def _random_model(spec):
    model = build(spec).eval()
    randomize_(model)
    return model


@pytest.mark.parametrize("name,changes", [
    ("deepseek_glm4_mtp", {}),
    ("glm4", {"mtp.depth": 2, "mtp.share_embedding": False, "mtp.share_head": False}),
    # every layer dense but the MTP module MoE: first_k_dense_replace = num_hidden_layers
    ("deepseek_glm4_mtp", {"first_k_dense": 3}),
    ("dense", {"mtp.depth": 1}),  # all dense, the MTP module too: first_k_dense_replace = num_hidden_layers + 1
])
def test_export_round_trip_keeps_the_mtp_modules(name, changes, tmp_path):
    spec = with_changes(presets.get(name, tiny=True).model, changes)
    model = _random_model(spec)
    to_hf(model, spec, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    n, depth = spec.n_layers, spec.mtp.depth
    assert config["num_nextn_predict_layers"] == depth
    keys = set(safe_open(str(tmp_path / "model.safetensors"), "pt").keys())
    mtp_keys = {k for k in keys if is_mtp_key(k, n)}
    assert all(f"model.layers.{n + k}.{p}" in keys for k in range(depth) for p in MTP_PARTS) and len(mtp_keys) > 6
    reread, respec = from_hf(tmp_path)
    assert respec.mtp == spec.mtp
    assert hf_config_dict(respec) == hf_config_dict(spec)  # the same model, as far as the format says
    assert (type(respec.ffn), respec.first_k_dense) == (type(spec.ffn), spec.first_k_dense)
    ours, theirs = model.state_dict(), reread.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # transformers loads the main model and leaves out exactly the MTP layers
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                                 output_loading_info=True)
    unexpected = info["unexpected_keys"]  # (experts as transformers stacks them)
    assert all(is_mtp_key(k, n) for k in unexpected) and bool(unexpected) and not info["missing_keys"], info
    ids, _ = inputs(vocab=spec.vocab_size)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() <= LOGITS_ATOL


def test_mtp_the_format_cannot_hold_is_one_line_exit_2(tmp_path, capsys):
    run = presets.get("deepseek_glm4_mtp", tiny=True)
    gqa = MHASpec(n_heads=4, n_kv_heads=2)
    mixed = with_changes(run, {"model.overrides": [LayerOverride(every=1, attention=gqa)]})  # every layer GQA
    with pytest.raises(SpecError, match=r"model\.mtp\.depth=1: the MTP modules use model\.attention"):
        hf_config_dict(mixed.model)
    save_run_folder(build(mixed), mixed, tmp_path / "run")
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: model.mtp.depth=1") and err.count("\n") == 1, err
    # dense layers, then MoE in the last one: a dense MTP layer after it breaks the layout
    dense = presets.get("dense", tiny=True).model
    last_moe = LayerOverride(layers=[dense.n_layers - 1], ffn=presets.get("glm4", tiny=True).model.ffn)
    with pytest.raises(SpecError, match=r"model\.mtp\.depth=1: the MTP modules use model\.ffn \(MLP\)"):
        hf_config_dict(with_changes(dense, {"mtp.depth": 1, "overrides": [last_moe]}))
