"""Zoo state_dicts <-> Hugging Face safetensors, for every format in `zoo.interop.families`.

Legend: E = routed experts, F = expert hidden size, D = d_model.

Weights on disk. Released checkpoints, and transformers' `save_pretrained`, store experts one by
one (`mlp.experts.{e}.gate_proj.weight` (F, D), `up_proj` (F, D), `down_proj` (D, F); Mixtral:
`block_sparse_moe.experts.{e}.w1` / `w3` / `w2`); transformers v5 stacks them at load time into
`mlp.experts.gate_up_proj` (E, 2F, D), gate rows first, and `down_proj` (E, D, F): the zoo's layout.
`from_hf` reads either layout, sharded or not; `to_hf` writes the per-expert one.

Name map (HF -> zoo): model.embed_tokens -> embed, model.norm -> norm, lm_head -> lm_head;
model.layers.{i}.input_layernorm / post_attention_layernorm -> layers.{i}.attention_norm / ffn_norm;
self_attn.* -> attention.* (DeepSeek: q_a_layernorm -> q_a_norm, kv_a_proj_with_mqa -> kv_a_proj,
kv_a_layernorm -> kv_a_norm); mlp.gate.{weight, e_score_correction_bias} -> ffn.router.*; mlp.* -> ffn.*
(Mixtral's released names: block_sparse_moe for mlp). Multi-token-prediction modules are the layers
after the last (zoo.interop.hf_mtp).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zoo.blocks.model import DecoderLM
from zoo.interop.families import FAMILIES
from zoo.interop.hf_mtp import HF_NAME_RULE, layer_style_name, shared_copies
from zoo.overrides import SpecError
from zoo.specs import ModelSpec, MoESpec

_EXPERTS = re.compile(r"layers\.(\d+)\.ffn\.experts\.(gate_up_proj|down_proj)")


class SafetensorsDir:
    """The tensors of a transformers directory: model.safetensors, or the shards its index lists."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise SpecError(f"{path} has no safetensors weights (model.safetensors or an index); "
                            "re-save a .bin checkpoint with save_pretrained(safe_serialization=True)")
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            if not (path / name).is_file():
                raise SpecError(f"{path}: shard {name} listed in model.safetensors.index.json is missing")
            self._handles[name] = handle = safe_open(str(path / name), framework="pt")
            for key in handle.keys():
                self._file_of[key] = name
        self.unused = set(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> torch.Tensor:
        if key not in self._file_of:
            raise SpecError(f"{self.path}: the checkpoint lacks {key}, which config.json implies")
        self.unused.discard(key)
        return self._handles[self._file_of[key]].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[key]].get_slice(key).get_shape())


def hf_name(name: str, model_type: str, *, stacked: bool = False) -> str:
    """The HF key of a zoo state_dict key (routed experts excepted: see _EXPERTS), as released checkpoints
    name it (`stacked`: as transformers v5 modules do)."""
    ffn = "mlp" if stacked else FAMILIES[model_type].moe_module
    rules = (
        (r"embed\.(.+)", r"model.embed_tokens.\1"),
        (r"norm\.(.+)", r"model.norm.\1"),
        (r"lm_head\.(.+)", r"lm_head.\1"),
        (r"layers\.(\d+)\.attention_norm\.(.+)", r"model.layers.\1.input_layernorm.\2"),
        (r"layers\.(\d+)\.ffn_norm\.(.+)", r"model.layers.\1.post_attention_layernorm.\2"),
        (r"layers\.(\d+)\.ffn\.router\.(.+)", rf"model.layers.\1.{ffn}.gate.\2"),
        (r"layers\.(\d+)\.ffn\.(.+)", rf"model.layers.\1.{ffn}.\2"),
        HF_NAME_RULE,
    )
    match = re.fullmatch(r"layers\.(\d+)\.attention\.(\w+)\.(.+)", name)
    if match:
        module = FAMILIES[model_type].attention_names.get(match[2], match[2])
        return f"model.layers.{match[1]}.self_attn.{module}.{match[3]}"
    for pattern, replacement in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ValueError(f"no Hugging Face name for zoo parameter {name!r}")


def stacked_experts(
    tensors: SafetensorsDir, layer: int, which: str, n_experts: int, model_type: str
) -> torch.Tensor:
    """gate_up_proj (E, 2F, D) or down_proj (E, D, F) of one layer, from a stacked or per-expert checkpoint."""
    stacked = f"model.layers.{layer}.mlp.experts.{which}"
    if stacked in tensors:
        return tensors.get(stacked)
    family = FAMILIES[model_type]
    prefix = f"model.layers.{layer}.{family.moe_module}.experts"
    gate, up, down = family.expert_names
    if which == "down_proj":
        return torch.stack([tensors.get(f"{prefix}.{e}.{down}.weight") for e in range(n_experts)])  # (E, D, F)
    gate_EFD = torch.stack([tensors.get(f"{prefix}.{e}.{gate}.weight") for e in range(n_experts)])
    up_EFD = torch.stack([tensors.get(f"{prefix}.{e}.{up}.weight") for e in range(n_experts)])
    return torch.cat((gate_EFD, up_EFD), dim=1)  # (E, 2F, D), gate rows first


def load_hf_weights(model: DecoderLM, spec: ModelSpec, model_type: str, tensors: SafetensorsDir) -> None:
    layers = spec.layer_specs() + spec.mtp_layer_specs()
    state = {}
    for name, target in model.state_dict().items():
        if spec.tie_embeddings and name == "lm_head.weight":
            continue  # the same tensor as embed.weight
        layer_name = layer_style_name(name, spec.n_layers)
        experts = _EXPERTS.fullmatch(layer_name)
        if experts:
            layer = int(experts[1])
            value = stacked_experts(tensors, layer, experts[2], layers[layer].ffn.n_experts, model_type)
            key = f"model.layers.{layer}.mlp.experts (stacked {experts[2]})"
        else:
            key = hf_name(layer_name, model_type)
            if key not in tensors:  # saved with transformers' in-memory names (save_original_format=False)
                key = hf_name(layer_name, model_type, stacked=True)
            value = tensors.get(key)
        if tuple(value.shape) != tuple(target.shape):
            raise SpecError(f"{tensors.path}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                            f"{tuple(target.shape)} from config.json")
        state[name] = value.to(target.dtype)
    if spec.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True)

    def ignorable(key: str) -> bool:
        if spec.tie_embeddings and key == "lm_head.weight":
            return True
        if ".mlp.shared_experts." in key and math.prod(tensors.shape(key)) == 0:
            return True  # transformers builds a zero-width shared expert when n_shared_experts = 0
        return key.endswith("rotary_emb.inv_freq")  # older checkpoints saved the RoPE table

    leftover = sorted(key for key in tensors.unused if not ignorable(key))
    if leftover:
        raise SpecError(f"{tensors.path}: {len(leftover)} checkpoint tensors have no place in the model config.json "
                        f"describes, e.g. {leftover[:3]}")


# ----------------------------------------------------------------------------- export


def hf_tensors(
    model: DecoderLM, spec: ModelSpec, model_type: str, *, stacked: bool = False
) -> dict[str, torch.Tensor]:
    """The model's weights under HF names, experts one by one as released checkpoints store them
    (`stacked`: as transformers v5 modules hold them, gate_up_proj (E, 2F, D) and down_proj (E, D, F))."""
    out = shared_copies(model, spec)
    for name, tensor in model.state_dict().items():
        if spec.tie_embeddings and name == "lm_head.weight":
            continue
        name = layer_style_name(name, spec.n_layers)
        experts = _EXPERTS.fullmatch(name)
        if experts and stacked:
            out[f"model.layers.{experts[1]}.mlp.experts.{experts[2]}"] = tensor.detach()
            continue
        if not experts:
            out[hf_name(name, model_type, stacked=stacked)] = tensor.detach()
            continue
        family = FAMILIES[model_type]
        prefix = f"model.layers.{experts[1]}.{family.moe_module}.experts"
        gate, up, down = family.expert_names
        for e, weight in enumerate(tensor.detach()):
            if experts[2] == "down_proj":
                out[f"{prefix}.{e}.{down}.weight"] = weight.clone()  # (D, F)
            else:
                gate_FD, up_FD = weight.chunk(2, dim=0)
                out[f"{prefix}.{e}.{gate}.weight"] = gate_FD.clone()
                out[f"{prefix}.{e}.{up}.weight"] = up_FD.clone()
    # transformers builds a zero-width shared expert when n_shared_experts = 0; give it its empty weights
    for index, layer in enumerate(spec.layer_specs() + spec.mtp_layer_specs()):
        if (FAMILIES[model_type].empty_shared_experts and isinstance(layer.ffn, MoESpec)
                and layer.ffn.n_shared_experts == 0):
            prefix = f"model.layers.{index}.mlp.shared_experts"
            dtype = model.embed.weight.dtype
            out[f"{prefix}.gate_proj.weight"] = torch.empty(0, spec.d_model, dtype=dtype)
            out[f"{prefix}.up_proj.weight"] = torch.empty(0, spec.d_model, dtype=dtype)
            out[f"{prefix}.down_proj.weight"] = torch.empty(spec.d_model, 0, dtype=dtype)
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name].contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
