"""RoPE in config.json (`rope_parameters`, as transformers standardises it) <-> the zoo's RopeSpec.

Two things differ between formats: whether the format rotates a fraction of each head
(`partial_rotary_factor`: glm4_moe does; the others ignore it with the default RoPE), and whether YaRN's
`mscale_all_dim` also rescales the softmax (DeepSeek's MLA correction; no other format does).
"""

from __future__ import annotations

import math
from typing import Any

from zoo.blocks.rope import yarn_mscale
from zoo.interop.families.common import make
from zoo.overrides import SpecError
from zoo.specs import DynamicNTKScaling, LinearScaling, ModelSpec, NoScaling, RopeSpec, YarnScaling

HF_ROPE_KINDS = {"default": "none", "linear": "linear", "dynamic": "dynamic_ntk", "yarn": "yarn"}
HF_DEFAULT_THETA = 10000.0  # transformers' default_theta when rope_theta is absent
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # transformers' defaults when the config leaves them unset


def rope_from_hf(config: Any, *, partial_rotary: bool, softmax_mscale: bool) -> tuple[RopeSpec, float]:
    """(RopeSpec, partial rotary factor) of `config`. `partial_rotary`: the format rotates
    partial_rotary_factor of each head; `softmax_mscale`: YaRN's mscale_all_dim rescales the softmax."""
    model_type = config.model_type
    params = dict(getattr(config, "rope_parameters", None) or {})
    hf_kind = params.get("rope_type", "default")
    if hf_kind not in HF_ROPE_KINDS:
        raise SpecError(f"config.json rope_parameters.rope_type={hf_kind!r} is not supported; "
                        f"the zoo has {', '.join(HF_ROPE_KINDS)}")
    theta = float(params.get("rope_theta") or HF_DEFAULT_THETA)
    fraction = float(params.get("partial_rotary_factor") or 1.0)
    if not partial_rotary:
        if fraction != 1.0 and hf_kind != "default":
            raise SpecError(f"config.json rope_parameters.partial_rotary_factor={fraction}: {model_type} rotates "
                            "every rotary dim; remove it")
        fraction = 1.0  # the format's default RoPE ignores it
    mscale_all_dim = float(params.get("mscale_all_dim") or 0.0)
    if softmax_mscale and mscale_all_dim and hf_kind not in ("default", "yarn"):
        raise SpecError(f"config.json rope_parameters.mscale_all_dim={mscale_all_dim} with rope_type={hf_kind!r}: "
                        "the zoo applies DeepSeek's softmax correction with yarn only")
    if hf_kind == "default":
        scaling = NoScaling()
    elif hf_kind == "linear":
        scaling = make(LinearScaling, "rope_parameters", factor=params.get("factor"))
    elif hf_kind == "dynamic":
        # transformers' dynamic NTK takes max_position_embeddings as the original context length.
        scaling = make(DynamicNTKScaling, "rope_parameters", factor=params.get("factor"),
                       original_max_seq_len=config.max_position_embeddings)
    else:
        original = params.get("original_max_position_embeddings") or config.max_position_embeddings
        factor = params.get("factor") or config.max_position_embeddings / original
        mscale = float(params.get("mscale") or 0.0)
        if not softmax_mscale and mscale_all_dim and yarn_mscale(factor, mscale_all_dim) != 1.0:
            if mscale:
                raise SpecError(
                    f"config.json rope_parameters.mscale_all_dim={mscale_all_dim} with mscale={mscale}: {model_type} "
                    "uses it in the cos/sin factor only, while the zoo's YaRN also applies DeepSeek's softmax correction"
                )
            mscale_all_dim = 0.0  # without mscale, transformers uses it nowhere outside MLA
        scaling = make(
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


def rope_to_hf(rope: RopeSpec, spec: ModelSpec, *, where: str, model_type: str,
               softmax_mscale: bool) -> dict[str, Any]:
    """`rope_parameters` for `rope` (`softmax_mscale`: as in rope_from_hf)."""
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
    elif isinstance(scaling, YarnScaling):
        params.update(
            rope_type="yarn", factor=scaling.factor, original_max_position_embeddings=scaling.original_max_seq_len,
            beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, truncate=scaling.truncate,
        )
        if scaling.mscale_all_dim:
            if not softmax_mscale and yarn_mscale(scaling.factor, scaling.mscale_all_dim) != 1.0:
                raise SpecError(
                    f"{where}.scaling.mscale_all_dim={scaling.mscale_all_dim}: the zoo then rescales the softmax "
                    f"(DeepSeek's MLA correction), which {model_type} attention does not; set it to 0"
                )
            params["mscale_all_dim"] = scaling.mscale_all_dim
            if scaling.mscale:  # unset in HF means what mscale=0 means in the zoo
                params["mscale"] = scaling.mscale
    else:  # a kind that lists the format in its hf_formats but has no mapping here
        raise SpecError(f"{where}.scaling.kind={scaling.kind!r}: zoo/interop/families/rope.py writes no {model_type} "
                        "rope_parameters for it")
    return params
