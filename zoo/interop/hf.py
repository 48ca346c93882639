"""Hugging Face checkpoints <-> zoo models: DeepSeek-V3 (`deepseek_v3`) and GLM-4-MoE (`glm4_moe`).

    model, spec = from_hf("path/to/hf_dir")      # config.json + safetensors -> DecoderLM, ModelSpec
    to_hf(model, spec, "path/to/out")             # -> a directory AutoModelForCausalLM.from_pretrained loads

The two formats are one decoder (pre-norm blocks, SwiGLU FFNs, the first `first_k_dense_replace`
layers dense, then sigmoid-routed MoE layers with shared experts) with different attention: MLA for
`deepseek_v3`, GQA with partial rotary, q/k/v bias and qk-norm for `glm4_moe`. Export picks the
format from the spec's attention kind. Parity means the forward pass: transformers' logits and loss.

Legend: E = routed experts, F = expert hidden size, D = d_model.

Weights on disk. Released checkpoints, and transformers' `save_pretrained`, store experts one by
one (`mlp.experts.{e}.gate_proj.weight` (F, D), `up_proj` (F, D), `down_proj` (D, F)); transformers v5
stacks them at load time into gate_up_proj (E, 2F, D), gate rows first, and down_proj (E, D, F): the
zoo's layout. `from_hf` reads either layout, sharded or not; `to_hf` writes the per-expert one.

Name map (HF -> zoo): model.embed_tokens -> embed, model.norm -> norm, lm_head -> lm_head;
model.layers.{i}.input_layernorm / post_attention_layernorm -> layers.{i}.attention_norm / ffn_norm;
self_attn.* -> attention.* (DeepSeek: q_a_layernorm -> q_a_norm, kv_a_proj_with_mqa -> kv_a_proj,
kv_a_layernorm -> kv_a_norm); mlp.gate.{weight, e_score_correction_bias} -> ffn.router.*; mlp.* -> ffn.*.

Not carried over, by design: training-only fields (the routing-bias update rate and the sequence-wise
auxiliary loss: import takes the spec defaults, export drops them); multi-token-prediction layers
(`model.layers.{num_hidden_layers}.*` in released DeepSeek-V3/GLM-4.5 checkpoints: dropped on import,
none written); `num_key_value_heads` of a `deepseek_v3` config (MLA gives every head its own key, the
field changes no weight; export writes n_heads). Anything else either format can say and the other
cannot is an error naming the field.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from zoo.blocks.model import DecoderLM
from zoo.blocks.rope import yarn_mscale
from zoo.builders import build
from zoo.overrides import SpecError
from zoo.specs import (
    DataSpec,
    DynamicNTKScaling,
    LinearScaling,
    MHASpec,
    MLASpec,
    MLPSpec,
    ModelSpec,
    MoESpec,
    NoScaling,
    RopeSpec,
    RunSpec,
    SigmoidGroupTopKRouterSpec,
    YarnScaling,
)

MLA_FORMAT, MHA_FORMAT = "deepseek_v3", "glm4_moe"
SUPPORTED = (MLA_FORMAT, MHA_FORMAT)
ARCHITECTURES = {MLA_FORMAT: "DeepseekV3ForCausalLM", MHA_FORMAT: "Glm4MoeForCausalLM"}
HF_ROPE_KINDS = {"default": "none", "linear": "linear", "dynamic": "dynamic_ntk", "yarn": "yarn"}
HF_DEFAULT_THETA = 10000.0  # transformers' default_theta when rope_theta is absent
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # transformers' defaults when the config leaves them unset
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
HF_TOKENIZER_DIR = "hf_tokenizer"  # where import-hf keeps the source's tokenizer inside a run folder
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")

# zoo attention submodule -> HF name, where they differ.
_ATTENTION_NAMES = {
    MLA_FORMAT: {"q_a_norm": "q_a_layernorm", "kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm"},
    MHA_FORMAT: {},
}
_EXPERTS = re.compile(r"layers\.(\d+)\.ffn\.experts\.(gate_up_proj|down_proj)")
_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


# ----------------------------------------------------------------------------- import


def from_hf(path: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[DecoderLM, ModelSpec]:
    """Read a transformers directory of model_type deepseek_v3 or glm4_moe: (model in eval mode, spec)."""
    path = Path(path)
    config = _read_hf_config(path)
    spec = spec_from_hf_config(config)
    model = build(spec).to(dtype)
    _load_hf_weights(model, spec, config.model_type, _SafetensorsDir(path))
    return model.eval(), spec


def spec_from_hf_config(config: Any) -> ModelSpec:
    """The ModelSpec of a transformers DeepseekV3Config / Glm4MoeConfig (or anything with their fields)."""
    model_type = config.model_type
    if model_type not in SUPPORTED:
        raise SpecError(f"model_type {model_type!r} is not supported; the zoo reads {' and '.join(SUPPORTED)}")
    _check_hf_fields(config)
    rope, rotary_fraction = _rope_from_hf(config)
    if model_type == MLA_FORMAT:
        attention = _make(
            MLASpec, "MLA fields (q_lora_rank, kv_lora_rank, qk_*_head_dim, v_head_dim)",
            n_heads=config.num_attention_heads,
            q_lora_rank=config.q_lora_rank,
            kv_lora_rank=config.kv_lora_rank,
            qk_nope_head_dim=config.qk_nope_head_dim,
            qk_rope_head_dim=config.qk_rope_head_dim,
            v_head_dim=config.v_head_dim,
            rope_layout="interleaved" if config.rope_interleave else "half",
            attention_bias=bool(config.attention_bias),
            rope=rope,
        )
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads or config.num_attention_heads
        attention = _make(
            MHASpec, "attention fields (num_attention_heads, num_key_value_heads, head_dim)",
            n_heads=config.num_attention_heads,
            n_kv_heads=None if kv_heads == config.num_attention_heads else kv_heads,
            head_dim=head_dim,
            qk_norm=bool(config.use_qk_norm),
            qkv_bias=bool(config.attention_bias),
            rotary_fraction=rotary_fraction,
            rope=rope,
        )

    n_layers = config.num_hidden_layers
    n_dense = min(config.first_k_dense_replace or 0, n_layers)  # transformers: layer i is MoE iff i >= k
    dense = _make(MLPSpec, "intermediate_size", d_hidden=config.intermediate_size) if n_dense else None
    if n_dense == n_layers:
        ffn, first_k_dense, dense_ffn = dense, 0, None  # every layer dense: the MoE fields are unused
    else:
        router = _make(
            SigmoidGroupTopKRouterSpec, "routing fields (n_group, topk_group, routed_scaling_factor)",
            n_groups=config.n_group or 1,
            topk_groups=config.topk_group or 1,
            norm_topk_prob=bool(config.norm_topk_prob),
            routed_scaling_factor=config.routed_scaling_factor,
        )
        ffn = _make(
            MoESpec, "MoE fields (n_routed_experts, num_experts_per_tok, moe_intermediate_size, n_group)",
            n_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            d_expert=config.moe_intermediate_size,
            n_shared_experts=config.n_shared_experts or 0,
            router=router,
        )
        first_k_dense, dense_ffn = n_dense, dense
    return _make(
        ModelSpec, "model fields",
        vocab_size=config.vocab_size,
        d_model=config.hidden_size,
        n_layers=n_layers,
        max_seq_len=config.max_position_embeddings,
        norm_eps=config.rms_norm_eps,
        tie_embeddings=bool(config.tie_word_embeddings),
        init_std=config.initializer_range,
        attention=attention,
        ffn=ffn,
        first_k_dense=first_k_dense,
        dense_ffn=dense_ffn,
    )


def _make(cls, where: str, **fields):
    """cls(**fields), with a validation failure turned into one line naming the config fields."""
    try:
        return cls(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise SpecError(f"config.json {where}: {loc + ': ' if loc else ''}{message}") from None


def _check_hf_fields(config: Any) -> None:
    """Fields the zoo cannot express: an error naming the field rather than a silently different model."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise SpecError(f"config.json hidden_act={act!r}: the zoo's FFNs are SwiGLU (silu) only")
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    if dropout != 0:
        raise SpecError(f"config.json attention_dropout={dropout}: the zoo has no attention dropout; set it to 0.0")
    # Fields of DeepSeek's original code that transformers ignores; any other value means another model.
    allowed = {
        "scoring_func": ("sigmoid", "the routers score experts with a sigmoid"),
        "topk_method": ("noaux_tc", "experts are picked by score + correction bias within the best groups"),
        "moe_layer_freq": (1, "every layer after first_k_dense_replace is an MoE"),
    }
    for field, (value_ok, why) in allowed.items():
        value = getattr(config, field, None)
        if value is not None and value != value_ok:
            raise SpecError(f"config.json {field}={value!r} is not supported: only {value_ok!r} ({why})")
    for field in ("mlp_layer_types", "layer_types"):
        value = getattr(config, field, None)
        if value is not None and any(kind != "full_attention" for kind in value):
            raise SpecError(f"config.json {field}={value!r}: per-layer types are not supported")
    if getattr(config, "quantization_config", None):
        raise SpecError("config.json quantization_config is set: dequantize the checkpoint (bf16/fp32) first")


def _rope_from_hf(config: Any) -> tuple[RopeSpec, float]:
    """(RopeSpec, partial rotary factor) from `rope_parameters` as transformers standardises it."""
    mla = config.model_type == MLA_FORMAT
    params = dict(getattr(config, "rope_parameters", None) or {})
    hf_kind = params.get("rope_type", "default")
    if hf_kind not in HF_ROPE_KINDS:
        raise SpecError(f"config.json rope_parameters.rope_type={hf_kind!r} is not supported; "
                        f"the zoo has {', '.join(HF_ROPE_KINDS)}")
    theta = float(params.get("rope_theta") or HF_DEFAULT_THETA)
    fraction = float(params.get("partial_rotary_factor") or 1.0)
    if mla and fraction != 1.0 and hf_kind != "default":
        raise SpecError(f"config.json rope_parameters.partial_rotary_factor={fraction}: deepseek_v3 rotates all "
                        "qk_rope_head_dim dims; remove it")
    if mla:
        fraction = 1.0  # DeepSeek's default RoPE ignores it
    mscale_all_dim = float(params.get("mscale_all_dim") or 0.0)
    if mla and mscale_all_dim and hf_kind not in ("default", "yarn"):
        raise SpecError(f"config.json rope_parameters.mscale_all_dim={mscale_all_dim} with rope_type={hf_kind!r}: "
                        "the zoo applies DeepSeek's softmax correction with yarn only")
    if hf_kind == "default":
        scaling = NoScaling()
    elif hf_kind == "linear":
        scaling = _make(LinearScaling, "rope_parameters", factor=params.get("factor"))
    elif hf_kind == "dynamic":
        # transformers' dynamic NTK takes max_position_embeddings as the original context length.
        scaling = _make(DynamicNTKScaling, "rope_parameters", factor=params.get("factor"),
                        original_max_seq_len=config.max_position_embeddings)
    else:
        original = params.get("original_max_position_embeddings") or config.max_position_embeddings
        factor = params.get("factor") or config.max_position_embeddings / original
        mscale = float(params.get("mscale") or 0.0)
        if not mla and mscale_all_dim and yarn_mscale(factor, mscale_all_dim) != 1.0:
            if mscale:
                raise SpecError(
                    f"config.json rope_parameters.mscale_all_dim={mscale_all_dim} with mscale={mscale}: glm4_moe uses "
                    "it in the cos/sin factor only, while the zoo's YaRN also applies DeepSeek's softmax correction"
                )
            mscale_all_dim = 0.0  # without mscale, transformers uses it nowhere outside MLA
        scaling = _make(
            YarnScaling, "rope_parameters",
            factor=factor,
            original_max_seq_len=original,
            beta_fast=params.get("beta_fast") or YARN_BETA_FAST,
            beta_slow=params.get("beta_slow") or YARN_BETA_SLOW,
            # transformers: cos/sin scale mscale(f, mscale) / mscale(f, mscale_all_dim) only when both are set;
            # the zoo's rule is the same with mscale=0 standing for "unset".
            mscale=mscale if mscale_all_dim else 1.0,
            mscale_all_dim=mscale_all_dim,
            truncate=bool(params.get("truncate", True)),
        )
        expected = params.get("attention_factor")
        if expected is not None:
            ours = (yarn_mscale(factor, scaling.mscale) / yarn_mscale(factor, mscale_all_dim)
                    if scaling.mscale and mscale_all_dim else yarn_mscale(factor))
            if not math.isclose(expected, ours, rel_tol=1e-9):
                raise SpecError(f"config.json rope_parameters.attention_factor={expected}: the zoo derives it from "
                                f"factor/mscale/mscale_all_dim ({ours:.6g}); remove it or match it")
    return RopeSpec(theta=theta, scaling=scaling), fraction


def _read_hf_config(path: Path) -> Any:
    if not path.is_dir():
        raise SpecError(f"{path}: no such directory (expected a Hugging Face model directory with config.json)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SpecError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise SpecError(f"{config_file} is not valid JSON: {err}") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        raise SpecError(f"{config_file}: model_type {model_type!r} is not supported; "
                        f"the zoo reads {' and '.join(SUPPORTED)}")
    if raw.get("quantization_config"):
        raise SpecError(f"{config_file}: quantization_config is set: dequantize the checkpoint (bf16/fp32) first")
    # transformers reads the file so that defaults and legacy fields (rope_scaling, top-level rope_theta,
    # partial_rotary_factor) mean exactly what they mean to the reference implementation.
    return _transformers().AutoConfig.from_pretrained(str(path))


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SpecError("Hugging Face interop needs transformers>=5: pip install 'transformers>=5'") from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise SpecError(f"Hugging Face interop needs transformers>=5 (stacked experts, rope_parameters); "
                        f"found {transformers.__version__}")
    return transformers


class _SafetensorsDir:
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


def _hf_name(name: str, model_type: str) -> str:
    """The HF key of a zoo state_dict key (routed experts excepted: see _EXPERTS)."""
    rules = (
        (r"embed\.(.+)", r"model.embed_tokens.\1"),
        (r"norm\.(.+)", r"model.norm.\1"),
        (r"lm_head\.(.+)", r"lm_head.\1"),
        (r"layers\.(\d+)\.attention_norm\.(.+)", r"model.layers.\1.input_layernorm.\2"),
        (r"layers\.(\d+)\.ffn_norm\.(.+)", r"model.layers.\1.post_attention_layernorm.\2"),
        (r"layers\.(\d+)\.ffn\.router\.(.+)", r"model.layers.\1.mlp.gate.\2"),
        (r"layers\.(\d+)\.ffn\.(.+)", r"model.layers.\1.mlp.\2"),
    )
    match = re.fullmatch(r"layers\.(\d+)\.attention\.(\w+)\.(.+)", name)
    if match:
        module = _ATTENTION_NAMES[model_type].get(match[2], match[2])
        return f"model.layers.{match[1]}.self_attn.{module}.{match[3]}"
    for pattern, replacement in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ValueError(f"no Hugging Face name for zoo parameter {name!r}")


def _stacked_experts(tensors: _SafetensorsDir, layer: int, which: str, n_experts: int) -> torch.Tensor:
    """gate_up_proj (E, 2F, D) or down_proj (E, D, F) of one layer, from a stacked or per-expert checkpoint."""
    prefix = f"model.layers.{layer}.mlp.experts"
    if f"{prefix}.{which}" in tensors:
        return tensors.get(f"{prefix}.{which}")
    if which == "down_proj":
        return torch.stack([tensors.get(f"{prefix}.{e}.down_proj.weight") for e in range(n_experts)])  # (E, D, F)
    gate_EFD = torch.stack([tensors.get(f"{prefix}.{e}.gate_proj.weight") for e in range(n_experts)])
    up_EFD = torch.stack([tensors.get(f"{prefix}.{e}.up_proj.weight") for e in range(n_experts)])
    return torch.cat((gate_EFD, up_EFD), dim=1)  # (E, 2F, D), gate rows first


def _load_hf_weights(model: DecoderLM, spec: ModelSpec, model_type: str, tensors: _SafetensorsDir) -> None:
    layers = spec.layer_specs()
    state = {}
    for name, target in model.state_dict().items():
        if spec.tie_embeddings and name == "lm_head.weight":
            continue  # the same tensor as embed.weight
        experts = _EXPERTS.fullmatch(name)
        if experts:
            layer = int(experts[1])
            value = _stacked_experts(tensors, layer, experts[2], layers[layer].ffn.n_experts)
            key = f"model.layers.{layer}.mlp.experts (stacked {experts[2]})"
        else:
            key = _hf_name(name, model_type)
            value = tensors.get(key)
        if tuple(value.shape) != tuple(target.shape):
            raise SpecError(f"{tensors.path}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                            f"{tuple(target.shape)} from config.json")
        state[name] = value.to(target.dtype)
    if spec.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True)

    def ignorable(key: str) -> bool:
        layer = _LAYER_INDEX.match(key)
        if layer and int(layer[1]) >= spec.n_layers:
            return True  # multi-token-prediction layers
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


def hf_config_dict(spec: ModelSpec | RunSpec, *, special_tokens: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json fields (model_type included) of the HF format that expresses `spec`; an error
    naming the spec field where neither can."""
    spec = spec.model if isinstance(spec, RunSpec) else spec
    attention, n_dense, dense, moe = _uniform_layout(spec)
    where = "model.attention"
    if isinstance(attention, MLASpec):
        model_type = MLA_FORMAT
        fields = dict(
            num_attention_heads=attention.n_heads,
            num_key_value_heads=attention.n_heads,
            q_lora_rank=attention.q_lora_rank,
            kv_lora_rank=attention.kv_lora_rank,
            qk_nope_head_dim=attention.qk_nope_head_dim,
            qk_rope_head_dim=attention.qk_rope_head_dim,
            v_head_dim=attention.v_head_dim,
            rope_interleave=attention.rope_layout == "interleaved",
            attention_bias=attention.attention_bias,
            rope_parameters=_rope_to_hf(attention.rope, spec, where=f"{where}.rope", mla=True),
        )
    else:
        model_type = MHA_FORMAT
        rope = _rope_to_hf(attention.rope, spec, where=f"{where}.rope", mla=False)
        rope["partial_rotary_factor"] = attention.rotary_fraction  # always written: glm4_moe defaults to 0.5
        fields = dict(
            num_attention_heads=attention.n_heads,
            num_key_value_heads=attention.kv_heads(),
            head_dim=attention.resolved_head_dim(spec.d_model),
            use_qk_norm=attention.qk_norm,
            attention_bias=attention.qkv_bias,
            rope_parameters=rope,
        )
    if moe is not None:
        router = moe.router
        if not isinstance(router, SigmoidGroupTopKRouterSpec):
            raise SpecError(f"model.ffn.router.kind={router.kind!r}: {model_type} routes with sigmoid scores and a "
                            "correction bias (sigmoid_group_topk); a softmax top-k router cannot be expressed")
        if router.n_groups > 1 and moe.n_experts // router.n_groups < 2:
            raise SpecError(f"model.ffn.router.n_groups={router.n_groups}: {model_type} scores a group by its top-2 "
                            f"experts, so groups need >= 2 of the {moe.n_experts} experts")
        moe_fields = dict(
            n_routed_experts=moe.n_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.d_expert,
            n_shared_experts=moe.n_shared_experts, n_group=router.n_groups, topk_group=router.topk_groups,
            norm_topk_prob=router.norm_topk_prob, routed_scaling_factor=router.routed_scaling_factor,
        )
    else:  # every layer dense: first_k_dense_replace = n_layers, and the MoE fields are placeholders
        moe_fields = dict(
            n_routed_experts=1, num_experts_per_tok=1, moe_intermediate_size=dense.d_hidden, n_shared_experts=0,
            n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        )
    return dict(
        model_type=model_type,
        architectures=[ARCHITECTURES[model_type]],
        vocab_size=spec.vocab_size,
        hidden_size=spec.d_model,
        num_hidden_layers=spec.n_layers,
        intermediate_size=dense.d_hidden if dense else moe.d_expert,  # unused without dense layers
        first_k_dense_replace=n_dense,
        max_position_embeddings=spec.max_seq_len,
        rms_norm_eps=spec.norm_eps,
        tie_word_embeddings=spec.tie_embeddings,
        initializer_range=spec.init_std,
        hidden_act="silu",
        attention_dropout=0.0,
        num_nextn_predict_layers=0,  # no multi-token-prediction layers
        **fields,
        **moe_fields,
        **{name: (special_tokens or {}).get(name) for name in SPECIAL_TOKENS},
    )


def _uniform_layout(spec: ModelSpec) -> tuple[MHASpec | MLASpec, int, MLPSpec | None, MoESpec | None]:
    """(attention, number of leading dense layers, their MLP, the MoE of the rest): the only layouts the
    HF formats have. Overrides are fine as long as the resolved layers still fit it."""
    layers = spec.layer_specs()
    cause = "model.overrides" if spec.overrides else "model.first_k_dense / model.dense_ffn / model.ffn"
    attention = layers[0].attention
    for index, layer in enumerate(layers):
        if layer.attention != attention:
            raise SpecError(f"model.overrides: layer {index} has a different attention from layer 0; "
                            "deepseek_v3 and glm4_moe use one attention for every layer")
    n_dense = next((i for i, layer in enumerate(layers) if not isinstance(layer.ffn, MLPSpec)), len(layers))
    dense = layers[0].ffn if n_dense else None
    moe = layers[n_dense].ffn if n_dense < len(layers) else None
    for index, layer in enumerate(layers):
        expected = dense if index < n_dense else moe
        if layer.ffn != expected:
            raise SpecError(
                f"{cause}: layer {index}'s FFN breaks the layout deepseek_v3/glm4_moe can express: the first "
                "first_k_dense_replace layers one dense MLP, every later layer one MoE"
            )
    return attention, n_dense, dense, moe


def _rope_to_hf(rope: RopeSpec, spec: ModelSpec, *, where: str, mla: bool) -> dict[str, Any]:
    scaling = rope.scaling
    params: dict[str, Any] = {"rope_theta": rope.theta}
    if isinstance(scaling, NoScaling):
        params["rope_type"] = "default"
    elif isinstance(scaling, LinearScaling):
        params.update(rope_type="linear", factor=scaling.factor)
    elif isinstance(scaling, DynamicNTKScaling):
        if scaling.original_max_seq_len != spec.max_seq_len:
            raise SpecError(
                f"{where}.scaling.original_max_seq_len={scaling.original_max_seq_len}: transformers' dynamic NTK takes "
                f"max_position_embeddings (model.max_seq_len={spec.max_seq_len}) as the original length; make them equal"
            )
        params.update(rope_type="dynamic", factor=scaling.factor)
    else:
        params.update(
            rope_type="yarn", factor=scaling.factor, original_max_position_embeddings=scaling.original_max_seq_len,
            beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, truncate=scaling.truncate,
        )
        if scaling.mscale_all_dim:
            if not mla and yarn_mscale(scaling.factor, scaling.mscale_all_dim) != 1.0:
                raise SpecError(
                    f"{where}.scaling.mscale_all_dim={scaling.mscale_all_dim}: the zoo then rescales the softmax "
                    "(DeepSeek's MLA correction), which glm4_moe attention does not; set it to 0"
                )
            params["mscale_all_dim"] = scaling.mscale_all_dim
            if scaling.mscale:  # unset in HF means what mscale=0 means in the zoo
                params["mscale"] = scaling.mscale
    return params


def _hf_tensors(
    model: DecoderLM, spec: ModelSpec, model_type: str, *, stacked: bool = False
) -> dict[str, torch.Tensor]:
    """The model's weights under HF names, experts one by one as released checkpoints store them
    (`stacked`: as transformers v5 modules hold them, gate_up_proj (E, 2F, D) and down_proj (E, D, F))."""
    out = {}
    for name, tensor in model.state_dict().items():
        if spec.tie_embeddings and name == "lm_head.weight":
            continue
        experts = _EXPERTS.fullmatch(name)
        if experts and stacked:
            out[f"model.layers.{experts[1]}.mlp.experts.{experts[2]}"] = tensor.detach()
            continue
        if not experts:
            out[_hf_name(name, model_type)] = tensor.detach()
            continue
        prefix = f"model.layers.{experts[1]}.mlp.experts"
        for e, weight in enumerate(tensor.detach()):
            if experts[2] == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = weight.clone()  # (D, F)
            else:
                gate_FD, up_FD = weight.chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate_FD.clone()
                out[f"{prefix}.{e}.up_proj.weight"] = up_FD.clone()
    # transformers builds a zero-width shared expert when n_shared_experts = 0; give it its empty weights
    for index, layer in enumerate(spec.layer_specs()):
        if isinstance(layer.ffn, MoESpec) and layer.ffn.n_shared_experts == 0:
            prefix = f"model.layers.{index}.mlp.shared_experts"
            dtype = model.embed.weight.dtype
            out[f"{prefix}.gate_proj.weight"] = torch.empty(0, spec.d_model, dtype=dtype)
            out[f"{prefix}.up_proj.weight"] = torch.empty(0, spec.d_model, dtype=dtype)
            out[f"{prefix}.down_proj.weight"] = torch.empty(spec.d_model, 0, dtype=dtype)
    return out


def to_hf(
    model: nn.Module,
    spec: ModelSpec | RunSpec,
    path: str | Path,
    *,
    special_tokens: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write config.json, generation_config.json and safetensors (sharded above `max_shard_bytes`) that
    transformers' AutoModelForCausalLM.from_pretrained loads as `model`. `special_tokens` may give
    bos_token_id / eos_token_id / pad_token_id."""
    spec = spec.model if isinstance(spec, RunSpec) else spec
    if not isinstance(model, DecoderLM) or len(model.layers) != spec.n_layers:
        raise SpecError(f"to_hf needs the DecoderLM built from this spec ({spec.n_layers} layers)")
    fields = hf_config_dict(spec, special_tokens=special_tokens)
    path = Path(path)
    holds_checkpoint = (path / "config.json").exists() or any(path.glob("*.safetensors"))
    if holds_checkpoint and not overwrite:
        raise SpecError(f"{path} already holds a checkpoint; pick an empty directory")
    tensors = _hf_tensors(model, spec, fields["model_type"])

    transformers = _transformers()
    config = transformers.AutoConfig.for_model(**fields)
    config.dtype = model.embed.weight.dtype
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("model*.safetensors*"):
        stale.unlink()
    config.save_pretrained(str(path))
    transformers.GenerationConfig.from_model_config(config).save_pretrained(str(path))
    _write_safetensors(tensors, path, max_shard_bytes)
    return path


def to_hf_model(model: nn.Module, spec: ModelSpec | RunSpec, **from_config_kwargs: Any) -> nn.Module:
    """The transformers model (in memory, same weights, dtype and device) that `to_hf` would write;
    `from_config_kwargs` go to `AutoModelForCausalLM.from_config` (attn_implementation,
    experts_implementation)."""
    spec = spec.model if isinstance(spec, RunSpec) else spec
    if not isinstance(model, DecoderLM) or len(model.layers) != spec.n_layers:
        raise SpecError(f"to_hf_model needs the DecoderLM built from this spec ({spec.n_layers} layers)")
    fields = hf_config_dict(spec)
    transformers = _transformers()
    config = transformers.AutoConfig.for_model(**fields)
    weight = model.embed.weight
    hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=weight.dtype, **from_config_kwargs)
    hf_model.to(weight.device)
    missing, unexpected = hf_model.load_state_dict(
        _hf_tensors(model, spec, fields["model_type"], stacked=True), strict=False
    )
    missing = [name for name in missing if not (spec.tie_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise SpecError(f"to_hf_model: weights that do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if spec.tie_embeddings:
        hf_model.tie_weights()
    return hf_model


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, max_shard_bytes: int) -> None:
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


# ----------------------------------------------------------------------------- run folders (the CLI)


def import_hf(source: str | Path, run_dir: str | Path) -> list[str]:
    """`zoo import-hf`: a transformers directory -> a run folder (spec.json + model.safetensors, and the
    source's tokenizer files under hf_tokenizer/). Returns the lines to print."""
    from zoo.checkpoint import SPEC_FILE, save_run_folder

    source, run_dir = Path(source), Path(run_dir)
    if (run_dir / SPEC_FILE).exists():
        raise SpecError(f"--out {run_dir} already holds a run folder; pick a new directory")
    model, spec = from_hf(source)
    data = DataSpec(seq_len=min(DataSpec().seq_len, spec.max_seq_len))
    save_run_folder(model, RunSpec(model=spec, data=data), run_dir)
    kind = MLA_FORMAT if isinstance(spec.attention, MLASpec) else MHA_FORMAT
    n_params = sum(p.numel() for p in model.parameters())
    lines = [f"imported {kind} ({spec.n_layers} layers, {n_params / 1e6:.2f}M parameters) from {source} into {run_dir}"]
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if copied:
        (run_dir / HF_TOKENIZER_DIR).mkdir(exist_ok=True)
        for name in copied:
            shutil.copy2(source / name, run_dir / HF_TOKENIZER_DIR / name)
        lines.append(f"copied {', '.join(copied)} to {run_dir / HF_TOKENIZER_DIR}/ (export-hf puts them back)")
    if not set(copied) - {"generation_config.json"}:
        lines.append(f"{source} has no tokenizer files: the run folder has no tokenizer")
    else:
        lines.append("the Hugging Face tokenizer is kept as is: it is not the zoo's SentencePiece tokenizer")
    return lines


def export_hf(run_dir: str | Path, out: str | Path) -> list[str]:
    """`zoo export-hf`: a run folder -> a transformers directory (with hf_tokenizer/'s files, if any)."""
    from zoo.checkpoint import load_run_folder

    run_dir, out = Path(run_dir), Path(out)
    model, run = load_run_folder(run_dir)
    tokenizer_dir = run_dir / HF_TOKENIZER_DIR
    special_tokens = None
    generation = tokenizer_dir / "generation_config.json"
    if generation.is_file():
        special_tokens = {k: v for k, v in json.loads(generation.read_text()).items() if k in SPECIAL_TOKENS}
    to_hf(model, run.model, out, special_tokens=special_tokens)
    kind = json.loads((out / "config.json").read_text())["model_type"]
    lines = [f"exported {run_dir} as {kind} to {out} (AutoModelForCausalLM.from_pretrained loads it)"]
    if tokenizer_dir.is_dir():
        copied = [p.name for p in sorted(tokenizer_dir.iterdir()) if p.is_file() and p.name != "generation_config.json"]
        for name in copied:
            shutil.copy2(tokenizer_dir / name, out / name)
        if copied:
            lines.append(f"copied tokenizer files {', '.join(copied)}")
    else:
        lines.append("no hf_tokenizer/ in the run folder: the export has no tokenizer files")
    return lines
