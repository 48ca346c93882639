"""Multi-token-prediction layers in Hugging Face checkpoints (`deepseek_v3`, `glm4_moe`).

Released DeepSeek-V3 and GLM-4.5 checkpoints store MTP module k (1-based) as one more decoder layer,
numbered after the last: model.layers.{num_hidden_layers + k - 1}, with `config.json`
num_nextn_predict_layers giving how many. Besides the layer's own weights (input_layernorm,
self_attn, post_attention_layernorm, mlp: the same layout as every layer, MoE iff its index >=
first_k_dense_replace) it holds

    enorm, hnorm            RMSNorm of the next token's embedding and of the previous depth's hidden
    eh_proj                 (D, 2D): [enorm(embedding); hnorm(hidden)] -> D
    shared_head.norm        the RMSNorm before the head
    shared_head.head        the output head: a copy of lm_head when shared
    embed_tokens            the embedding: a copy of model.embed_tokens when shared

Name map (zoo -> HF, n = num_hidden_layers): mtp.{k-1}.block.X -> what layers.{n+k-1}.X maps to;
mtp.{k-1}.enorm / hnorm / eh_proj -> model.layers.{n+k-1}.enorm / hnorm / eh_proj; mtp.{k-1}.norm ->
.shared_head.norm; mtp.{k-1}.head -> .shared_head.head; mtp.{k-1}.embed -> .embed_tokens.

Import reads the MTP layers the checkpoint holds (transformers' save_pretrained drops them, and a
config may still declare them: then there are none). The embedding and head count as shared when the
stored copies equal the main model's (or are absent). Export always writes the copies, as the
released checkpoints do, since the engines that draft with MTP read them there; transformers loads
the export as the main model and reports the MTP tensors as unexpected (it has no MTP modules).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch

from zoo.overrides import SpecError, with_changes
from zoo.specs import MLPSpec, ModelSpec, MoESpec, MTPSpec

# zoo MTPModule part -> the HF name inside model.layers.{i}
_PARTS = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm",
          "head": "shared_head.head", "embed": "embed_tokens"}
# hf_weights.hf_name's rule for the parts above, once numbered as layers (see layer_style_name)
HF_NAME_RULE = (r"layers\.(\d+)\.(enorm|hnorm|eh_proj|shared_head\.norm|shared_head\.head|embed_tokens)\.(.+)",
                r"model.layers.\1.\2.\3")
_MTP_KEY = re.compile(r"mtp\.(\d+)\.(\w+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def layer_style_name(name: str, n_layers: int) -> str:
    """A zoo state_dict key with MTP module k numbered as layer n_layers + k - 1 (other keys unchanged):
    its block's weights then read as a layer's, the MTP parts as `layers.{i}.{HF part}.…`."""
    match = _MTP_KEY.fullmatch(name)
    if match is None:
        return name
    index, part, rest = n_layers + int(match[1]), match[2], match[3]
    return f"layers.{index}.{rest}" if part == "block" else f"layers.{index}.{_PARTS[part]}.{rest}"


def is_mtp_key(hf_key: str, n_layers: int) -> bool:
    layer = _HF_LAYER.match(hf_key)
    return layer is not None and int(layer[1]) >= n_layers


def spec_from_checkpoint(config: Any, tensors) -> ModelSpec:
    """`spec_from_hf_config(config)` with the MTP modules `tensors` (a SafetensorsDir) holds: the MTP layers
    read as further layers of the same layout, then set apart as `model.mtp`."""
    from zoo.interop.hf_config import spec_from_hf_config

    n = config.num_hidden_layers
    declared = getattr(config, "num_nextn_predict_layers", 0) or 0
    present = [k for k in range(declared) if f"model.layers.{n + k}.eh_proj.weight" in tensors]
    if present != list(range(len(present))):
        raise SpecError(f"{tensors.path}: config.json num_nextn_predict_layers={declared} but the checkpoint holds "
                        f"MTP layers {[n + k for k in present]} only, not model.layers.{n}...: the layers must follow "
                        "the last one without a gap")
    depth = len(present)
    if depth == 0:
        return spec_from_hf_config(config)
    extended = copy.copy(config)
    extended.num_hidden_layers = n + depth
    spec = spec_from_hf_config(extended)
    if n < spec.first_k_dense < n + depth:
        raise SpecError(f"config.json first_k_dense_replace={spec.first_k_dense} makes some MTP layers (from "
                        f"model.layers.{n}) dense and others MoE; the zoo's MTP modules all use the model's FFN")
    main = {"embed": "model.embed_tokens.weight",
            "head": "model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.weight"}
    shared = {part: all(_same(tensors, f"model.layers.{n + k}.{_PARTS[part]}.weight", main[part])
                        for k in range(depth)) for part in main}
    mtp = MTPSpec(depth=depth, share_embedding=shared["embed"], share_head=shared["head"])
    return with_changes(spec, {"n_layers": n, "first_k_dense": min(spec.first_k_dense, n), "mtp": mtp})


def _same(tensors, key: str, main_key: str) -> bool:
    """Whether an MTP layer's copy of a main tensor is one (absent counts as shared); a shared copy is read
    here and nowhere else, so it counts as used."""
    if key not in tensors:
        return True
    return tensors.shape(key) == tensors.shape(main_key) and torch.equal(tensors.get(key), tensors.get(main_key))


def check_exportable(spec: ModelSpec) -> None:
    """The MTP layers must fit the one layout deepseek_v3 and glm4_moe have: every layer, the MTP layers
    included, one attention; dense layers first, then one MoE."""
    if not spec.mtp.depth:
        return
    layers = spec.layer_specs()
    where = f"model.mtp.depth={spec.mtp.depth}"
    if any(layer.attention != spec.attention for layer in layers):
        raise SpecError(f"{where}: the MTP modules use model.attention, which model.overrides replace in the "
                        "layers; deepseek_v3 and glm4_moe have one attention for every layer, the MTP layers "
                        "included: export without the overrides, or set model.mtp.depth=0")
    moe = [layer.ffn for layer in layers if isinstance(layer.ffn, MoESpec)]
    fits = spec.ffn == moe[-1] if moe else (spec.ffn == layers[0].ffn or isinstance(spec.ffn, MoESpec))
    if not fits:
        kind = "MLP" if isinstance(spec.ffn, MLPSpec) else spec.ffn.kind
        raise SpecError(f"{where}: the MTP modules use model.ffn ({kind}), which breaks the layout deepseek_v3 "
                        "and glm4_moe have (dense layers first, then one MoE for every later layer, the MTP layers "
                        "included): make model.ffn the last layer's FFN, or set model.mtp.depth=0")


def shared_copies(model, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The embedding and head every MTP layer stores under its own name when it shares the main model's
    (copies: safetensors refuses tensors that share memory)."""
    out = {}
    for k in range(spec.mtp.depth):
        prefix = f"model.layers.{spec.n_layers + k}"
        if spec.mtp.share_embedding:
            out[f"{prefix}.embed_tokens.weight"] = model.embed.weight.detach().clone()
        if spec.mtp.share_head:
            out[f"{prefix}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return out
