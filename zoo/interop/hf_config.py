"""Hugging Face config.json <-> zoo ModelSpec, for DeepSeek-V3 (`deepseek_v3`, MLA) and GLM-4-MoE
(`glm4_moe`, GQA with partial rotary, q/k/v bias and qk-norm). Anything one side can say and the other
cannot is an error naming the field; `zoo.interop.hf` lists what is dropped by design.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from zoo.blocks.rope import yarn_mscale
from zoo.interop.hf_mtp import check_exportable
from zoo.kinds import Spec, kind_of, kinds
from zoo.overrides import SpecError
from zoo.specs import (
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
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


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


def read_hf_config(path: Path) -> Any:
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
    return transformers_module().AutoConfig.from_pretrained(str(path))


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise SpecError("Hugging Face interop needs transformers>=5: pip install 'transformers>=5'") from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise SpecError(f"Hugging Face interop needs transformers>=5 (stacked experts, rope_parameters); "
                        f"found {transformers.__version__}")
    return transformers


def hf_config_dict(spec: ModelSpec | RunSpec, *, special_tokens: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json fields (model_type included) of the HF format that expresses `spec`; an error
    naming the spec field where neither can."""
    spec = spec.model if isinstance(spec, RunSpec) else spec
    model_type, attention, n_dense, dense, moe = _uniform_layout(spec)
    where = "model.attention"
    if model_type == MLA_FORMAT:
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
            rope_parameters=_rope_to_hf(attention.rope, spec, where=f"{where}.rope", model_type=model_type),
        )
    else:
        rope = _rope_to_hf(attention.rope, spec, where=f"{where}.rope", model_type=model_type)
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
        if model_type not in kind_of(router).hf_formats:
            raise SpecError(f"model.ffn.router.kind={router.kind!r}: {model_type} has no such router; "
                            f"its router kinds: {_kinds_in('router', model_type)}")
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
        num_nextn_predict_layers=spec.mtp.depth,  # zoo.interop.hf_mtp
        **fields,
        **moe_fields,
        **{name: (special_tokens or {}).get(name) for name in SPECIAL_TOKENS},
    )


def hf_format(attention: Spec) -> str:
    """The HF model_type whose attention is `attention`'s kind (zoo/kinds/ says which kind maps where)."""
    formats = kind_of(attention).hf_formats
    if len(formats) != 1:
        raise SpecError(f"model.attention.kind={attention.kind!r}: no Hugging Face format has this attention; "
                        f"the zoo writes {' and '.join(SUPPORTED)}")
    return formats[0]


def _kinds_in(slot: str, model_type: str) -> str:
    """The `slot` kinds that `model_type` can express, for an error message."""
    return ", ".join(k.name for k in kinds(slot) if model_type in k.hf_formats) or "none"


def _uniform_layout(spec: ModelSpec) -> tuple[str, MHASpec | MLASpec, int, MLPSpec | None, MoESpec | None]:
    """(HF model_type, attention, number of leading dense layers, their MLP, the MoE of the rest): the only
    layouts the HF formats have. Overrides are fine as long as the resolved layers still fit it."""
    check_exportable(spec)
    layers = spec.layer_specs() + spec.mtp_layer_specs()  # the MTP layers follow the last one (hf_mtp)
    cause = "model.overrides" if spec.overrides else "model.first_k_dense / model.dense_ffn / model.ffn"
    attention = layers[0].attention
    for index, layer in enumerate(layers):
        if layer.attention != attention:
            raise SpecError(f"model.overrides: layer {index} has a different attention from layer 0; "
                            "deepseek_v3 and glm4_moe use one attention for every layer")
    model_type = hf_format(attention)
    for index, layer in enumerate(layers):
        ffn = layer.ffn
        if model_type not in kind_of(ffn).hf_formats:
            field = ("model.ffn" if ffn == spec.ffn else "model.dense_ffn" if ffn == spec.dense_ffn
                     else f"model.overrides: layer {index}'s ffn")
            raise SpecError(f"{field}.kind={ffn.kind!r}: {model_type} has no such FFN; "
                            f"its FFN kinds: {_kinds_in('ffn', model_type)}")
    n_dense = next((i for i, layer in enumerate(layers) if isinstance(layer.ffn, MoESpec)), len(layers))
    dense = layers[0].ffn if n_dense else None
    moe = layers[n_dense].ffn if n_dense < len(layers) else None
    for index, layer in enumerate(layers):
        expected = dense if index < n_dense else moe
        if layer.ffn != expected:
            raise SpecError(
                f"{cause}: layer {index}'s FFN breaks the layout deepseek_v3/glm4_moe can express: the first "
                "first_k_dense_replace layers one dense MLP, every later layer one MoE"
            )
    return model_type, attention, n_dense, dense, moe


def _rope_to_hf(rope: RopeSpec, spec: ModelSpec, *, where: str, model_type: str) -> dict[str, Any]:
    scaling, mla = rope.scaling, model_type == MLA_FORMAT
    if model_type not in kind_of(scaling).hf_formats:
        raise SpecError(f"{where}.scaling.kind={scaling.kind!r}: {model_type} has no such RoPE scaling; "
                        f"its scalings: {_kinds_in('rope_scaling', model_type)}")
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
    elif isinstance(scaling, YarnScaling):
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
    else:  # a kind that lists the format in hf_formats but has no mapping here
        raise SpecError(f"{where}.scaling.kind={scaling.kind!r}: zoo/interop/hf_config.py writes no {model_type} "
                        "rope_parameters for it")
    return params
