"""Hugging Face config.json <-> zoo ModelSpec, for every format in `zoo.interop.families` (one module
per model_type). Here: reading config.json, the fields every format shares, and which format a spec is
written as. Anything a format cannot say is an error naming the field; `zoo.interop.hf` lists what is
dropped by design.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zoo.interop.families import FAMILIES, SUPPORTED, Family
from zoo.interop.families.common import (
    SPECIAL_TOKENS,
    check_common_fields,
    kind_error,
    kind_uses,
    layout,
    make,
    one_attention,
)
from zoo.interop.hf_mtp import check_exportable
from zoo.kinds import kind_of
from zoo.overrides import SpecError
from zoo.specs import ModelSpec, RunSpec

__all__ = ["SPECIAL_TOKENS", "SUPPORTED", "family", "hf_config_dict", "read_hf_config",
           "spec_from_hf_config", "transformers_module"]


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise SpecError(f"model_type {model_type!r} is not supported; the zoo reads {', '.join(SUPPORTED)}")
    return FAMILIES[model_type]


def spec_from_hf_config(config: Any) -> ModelSpec:
    """The ModelSpec of a transformers config of a supported model_type (or anything with its fields)."""
    target = family(config.model_type)
    check_common_fields(config)
    return make(
        ModelSpec, "model fields",
        vocab_size=config.vocab_size,
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        max_seq_len=config.max_position_embeddings,
        norm_eps=config.rms_norm_eps,
        tie_embeddings=bool(config.tie_word_embeddings),
        init_std=config.initializer_range,
        **target.model_fields(config),
    )


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
                        f"the zoo reads {', '.join(SUPPORTED)}")
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
    """The config.json fields (model_type included) of the first HF format (in `FAMILIES` order) that
    expresses `spec`; an error naming the spec field where none can."""
    spec = spec.model if isinstance(spec, RunSpec) else spec
    model_type, fields = _first_format(spec)
    return dict(
        model_type=model_type,
        architectures=[FAMILIES[model_type].architecture],
        vocab_size=spec.vocab_size,
        hidden_size=spec.d_model,
        num_hidden_layers=spec.n_layers,
        max_position_embeddings=spec.max_seq_len,
        rms_norm_eps=spec.norm_eps,
        tie_word_embeddings=spec.tie_embeddings,
        initializer_range=spec.init_std,
        hidden_act="silu",
        attention_dropout=0.0,
        **fields,
        **{name: (special_tokens or {}).get(name) for name in SPECIAL_TOKENS},
    )


def _first_format(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """(model_type, its format-specific config fields) of the first format that expresses `spec`. The
    formats that hold every kind the spec uses, and that the spec resembles where there are any, say
    which field they cannot express; where none holds them all, the kinds are named."""
    check_exportable(spec)
    attention = one_attention(spec)
    candidates = [model_type for model_type in SUPPORTED if model_type in kind_of(attention).hf_formats]
    if not candidates:
        raise SpecError(f"model.attention.kind={attention.kind!r}: no Hugging Face format has this attention; "
                        f"the zoo writes {', '.join(SUPPORTED)}")
    shape = layout(spec)
    uses = kind_uses(spec)
    missing = {model_type: [use for use in uses if model_type not in use.formats] for model_type in candidates}
    fitting = [model_type for model_type in candidates if not missing[model_type]]
    if not fitting:
        shared = [use for use in uses if all(use in missing[model_type] for model_type in candidates)]
        if shared:
            raise SpecError(kind_error(shared[0], candidates))
        raise SpecError(_each(kind_error(missing[model_type][0], [model_type]) for model_type in candidates))
    errors = {}
    for model_type in fitting:
        try:
            return model_type, FAMILIES[model_type].config_fields(spec, shape)
        except SpecError as err:
            errors[model_type] = str(err)
    reported = [error for model_type, error in errors.items() if FAMILIES[model_type].resembles(shape)]
    reported = reported or list(errors.values())
    raise SpecError(reported[0] if len(reported) == 1 else _each(reported))


def _each(errors) -> str:
    return "no Hugging Face format expresses this spec: " + "; ".join(errors)
