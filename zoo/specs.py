"""Typed specs: the vocabulary of what a block *is*.

Every slot (attention, FFN, router, RoPE scaling) is a discriminated union keyed by `kind`.
Specs are frozen pydantic models: presets change copies (see `zoo.overrides.with_changes`), and
every spec round-trips through JSON exactly. Cross-field rules live in validators whose messages
name the field, the value and the fix.

Nothing here imports torch: a spec can be written, validated and diffed without building a model.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator


class Spec(BaseModel):
    # No NaN or infinity in any field: every bound check passes for NaN (NaN <= 1 is False), and JSON
    # writes both as null, so spec.json could not be read back.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- RoPE


class NoScaling(Spec):
    kind: Literal["none"] = "none"


class LinearScaling(Spec):
    """Position interpolation (Chen et al., 2023): positions divided by `factor`."""

    kind: Literal["linear"] = "linear"
    factor: float = Field(2.0, ge=1.0)


class DynamicNTKScaling(Spec):
    """NTK-aware base change applied only when the sequence exceeds `original_max_seq_len`."""

    kind: Literal["dynamic_ntk"] = "dynamic_ntk"
    factor: float = Field(2.0, ge=1.0)
    original_max_seq_len: int = Field(512, ge=1)


class YarnScaling(Spec):
    """YaRN (Peng et al., 2023) as released with DeepSeek-V2/V3.

    The cos/sin attention factor is mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both
    are set, else 0.1 ln(factor) + 1; a non-zero `mscale_all_dim` also multiplies the softmax scale by
    mscale(factor, mscale_all_dim)^2 (DeepSeek's correction).
    """

    kind: Literal["yarn"] = "yarn"
    factor: float = Field(4.0, ge=1.0)
    original_max_seq_len: int = Field(512, ge=1)
    beta_fast: float = Field(32.0, gt=0)
    beta_slow: float = Field(1.0, gt=0)
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    @model_validator(mode="after")
    def _betas(self) -> YarnScaling:
        if self.beta_slow >= self.beta_fast:
            raise ValueError(
                f"beta_slow ({self.beta_slow}) must be < beta_fast ({self.beta_fast}): "
                "the ramp runs from beta_fast rotations down to beta_slow"
            )
        return self


RopeScaling = Annotated[
    Union[NoScaling, LinearScaling, DynamicNTKScaling, YarnScaling], Field(discriminator="kind")
]


class RopeSpec(Spec):
    theta: float = 10000.0
    scaling: RopeScaling = NoScaling()

    @model_validator(mode="after")
    def _theta(self) -> RopeSpec:
        if self.theta <= 1:
            raise ValueError(
                f"theta ({self.theta}) must be > 1: the frequencies theta^(-2i/R) are all 1 at theta=1 (no "
                "position signal) and YaRN divides by ln(theta); use the model's RoPE base, e.g. 10000"
            )
        return self


# ----------------------------------------------------------------------------- attention


class MHASpec(Spec):
    """Multi-head attention; GQA when 1 < n_kv_heads < n_heads, MQA when n_kv_heads == 1."""

    kind: Literal["mha"] = "mha"
    n_heads: int = Field(8, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="None means n_heads (plain MHA)")
    head_dim: int | None = Field(None, ge=2, description="None means d_model // n_heads")
    qk_norm: bool = False
    qkv_bias: bool = False
    rotary_fraction: float = Field(1.0, gt=0.0, le=1.0)
    rope: RopeSpec = RopeSpec()

    @model_validator(mode="after")
    def _heads(self) -> MHASpec:
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}); "
                f"pick a divisor of {self.n_heads}"
            )
        return self

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def rotary_dim(self, d_model: int) -> int:
        return int(self.resolved_head_dim(d_model) * self.rotary_fraction)


class MLASpec(Spec):
    """Multi-head latent attention (DeepSeek-V2/V3): K and V come from a compressed latent.

    `q_lora_rank=None` projects queries directly (DeepSeek-V2-Lite); `rope_layout="interleaved"`
    matches the released checkpoints, whose rotary dims come in adjacent pairs.
    """

    kind: Literal["mla"] = "mla"
    n_heads: int = Field(8, ge=1)
    q_lora_rank: int | None = Field(None, ge=1)
    kv_lora_rank: int = Field(64, ge=1)
    qk_nope_head_dim: int = Field(32, ge=0)
    qk_rope_head_dim: int = Field(32, ge=2)
    v_head_dim: int = Field(64, ge=1)
    rope_layout: Literal["half", "interleaved"] = "half"
    attention_bias: bool = False
    rope: RopeSpec = RopeSpec()

    @model_validator(mode="after")
    def _even_rope(self) -> MLASpec:
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: RoPE rotates pairs of dims"
            )
        return self


AttentionSpec = Annotated[Union[MHASpec, MLASpec], Field(discriminator="kind")]


# ----------------------------------------------------------------------------- FFN and routers


class MLPSpec(Spec):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    kind: Literal["mlp"] = "mlp"
    d_hidden: int = Field(1536, ge=1)


class SoftmaxTopKRouterSpec(Spec):
    """Softmax over experts, top-k; Switch/GShard balance loss and ST-MoE z-loss."""

    kind: Literal["softmax_topk"] = "softmax_topk"
    balance_loss_weight: float = Field(0.01, ge=0.0)
    z_loss_weight: float = Field(0.0, ge=0.0)
    noise_std: float = Field(0.0, ge=0.0, description="Gaussian noise on logits while training")
    norm_topk_prob: bool = False


class SigmoidGroupTopKRouterSpec(Spec):
    """DeepSeek-V3 / GLM-4.5 routing: sigmoid scores, bias for selection only, group-limited top-k."""

    kind: Literal["sigmoid_group_topk"] = "sigmoid_group_topk"
    n_groups: int = Field(1, ge=1)
    topk_groups: int = Field(1, ge=1)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = Field(1.0, gt=0.0)
    bias_update_rate: float = Field(1e-3, ge=0.0, description="aux-loss-free balancing step")
    seq_aux_loss_weight: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _groups(self) -> SigmoidGroupTopKRouterSpec:
        if self.topk_groups > self.n_groups:
            raise ValueError(
                f"topk_groups ({self.topk_groups}) must be <= n_groups ({self.n_groups}); "
                f"set topk_groups to at most {self.n_groups}"
            )
        return self


RouterSpec = Annotated[
    Union[SoftmaxTopKRouterSpec, SigmoidGroupTopKRouterSpec], Field(discriminator="kind")
]


class MoESpec(Spec):
    """Routed experts (stacked weights) plus optional always-on shared experts."""

    kind: Literal["moe"] = "moe"
    n_experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    d_expert: int = Field(1536, ge=1)
    n_shared_experts: int = Field(0, ge=0)
    router: RouterSpec = SoftmaxTopKRouterSpec()
    dispatcher: Literal["dropless"] = "dropless"

    @model_validator(mode="after")
    def _routing(self) -> MoESpec:
        if self.top_k > self.n_experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts}); "
                f"lower top_k or raise n_experts"
            )
        router = self.router
        if self.top_k == 1 and router.norm_topk_prob:
            # One weight normalised by itself is 1 (times routed_scaling_factor): a constant, so the LM
            # loss sends the router no gradient.
            raise ValueError(
                f"top_k (1) with router.norm_topk_prob (True) makes every combine weight a constant and "
                "leaves the router without gradient from the LM loss; set router.norm_topk_prob=false "
                "or top_k >= 2"
            )
        if isinstance(router, SigmoidGroupTopKRouterSpec):
            if self.n_experts % router.n_groups:
                raise ValueError(
                    f"router.n_groups ({router.n_groups}) must divide n_experts ({self.n_experts}); "
                    "pick a divisor"
                )
            reachable = router.topk_groups * (self.n_experts // router.n_groups)
            if self.top_k > reachable:
                raise ValueError(
                    f"top_k ({self.top_k}) exceeds the {reachable} experts in the router.topk_groups "
                    f"({router.topk_groups}) chosen groups; raise topk_groups or lower top_k"
                )
        return self


FFNSpec = Annotated[Union[MLPSpec, MoESpec], Field(discriminator="kind")]


# ----------------------------------------------------------------------------- model


class LayerOverride(Spec):
    """Replace the attention and/or FFN of some layers: those listed, and/or every `every`-th from `offset`."""

    layers: list[int] = []
    every: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)
    attention: AttentionSpec | None = None
    ffn: FFNSpec | None = None

    @model_validator(mode="after")
    def _selects_something(self) -> LayerOverride:
        if not self.layers and self.every is None:
            raise ValueError("a layer override needs `layers` or `every`: say which layers it changes")
        if self.attention is None and self.ffn is None:
            raise ValueError("a layer override needs `attention` or `ffn`: say what it changes")
        return self

    def selects(self, index: int) -> bool:
        periodic = self.every is not None and index >= self.offset and (index - self.offset) % self.every == 0
        return index in self.layers or periodic


class LayerSpec(Spec):
    attention: AttentionSpec
    ffn: FFNSpec


class ModelSpec(Spec):
    """A decoder-only LM: embedding, `n_layers` pre-norm blocks, final RMSNorm, LM head.

    Every layer uses `attention` and `ffn`, except the first `first_k_dense` layers, which use
    `dense_ffn` (DeepSeek's first_k_dense_replace), and layers selected by `overrides` (applied in
    order, later ones win).
    """

    vocab_size: int = Field(4096, ge=2)
    d_model: int = Field(384, ge=2)
    n_layers: int = Field(6, ge=1)
    max_seq_len: int = Field(512, ge=1)
    norm_eps: float = Field(1e-6, gt=0.0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0.0)
    attention: AttentionSpec = MHASpec()
    ffn: FFNSpec = MLPSpec()
    first_k_dense: int = Field(0, ge=0)
    dense_ffn: MLPSpec | None = None
    overrides: list[LayerOverride] = []

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.first_k_dense > self.n_layers:
            raise ValueError(
                f"first_k_dense ({self.first_k_dense}) must be <= n_layers ({self.n_layers})"
            )
        if self.first_k_dense and self.dense_ffn is None:
            raise ValueError(
                f"first_k_dense is {self.first_k_dense} but dense_ffn is unset: "
                'give dense_ffn, e.g. {"kind": "mlp", "d_hidden": 1536}'
            )
        for i, override in enumerate(self.overrides):
            bad = [layer for layer in override.layers if not 0 <= layer < self.n_layers]
            if bad:
                raise ValueError(
                    f"overrides[{i}].layers has {bad}, outside 0..{self.n_layers - 1} (n_layers={self.n_layers})"
                )
        for index, layer in enumerate(self.layer_specs()):
            _check_attention(layer.attention, self.d_model, f"layer {index} attention")
        return self

    def layer_specs(self) -> list[LayerSpec]:
        """The resolved attention and FFN of every layer."""
        layers = []
        for index in range(self.n_layers):
            attention, ffn = self.attention, self.ffn
            if index < self.first_k_dense:
                ffn = self.dense_ffn
            for override in self.overrides:
                if override.selects(index):
                    attention = override.attention or attention
                    ffn = override.ffn or ffn
            layers.append(LayerSpec(attention=attention, ffn=ffn))
        return layers


def _check_attention(spec: MHASpec | MLASpec, d_model: int, where: str) -> None:
    if isinstance(spec, MHASpec):
        if spec.head_dim is None and d_model % spec.n_heads:
            raise ValueError(
                f"{where}: d_model ({d_model}) must be divisible by n_heads ({spec.n_heads}), "
                "or set head_dim explicitly"
            )
        head_dim = spec.resolved_head_dim(d_model)
        rotary = head_dim * spec.rotary_fraction
        if rotary != math.floor(rotary) or int(rotary) % 2 or rotary < 2:
            raise ValueError(
                f"{where}: head_dim ({head_dim}) x rotary_fraction ({spec.rotary_fraction}) = {rotary} "
                "must be an even whole number >= 2: RoPE rotates pairs of dims"
            )
        rotary_dim = int(rotary)
        got = f"head_dim ({head_dim}) x rotary_fraction ({spec.rotary_fraction}) = {rotary_dim}"
        fix = "raise rotary_fraction or head_dim"
    else:
        rotary_dim = spec.qk_rope_head_dim
        got, fix = f"qk_rope_head_dim ({rotary_dim})", "set qk_rope_head_dim >= 4"
    if spec.rope.scaling.kind == "dynamic_ntk" and rotary_dim < 4:
        # NTK rescales the base by ratio^(R / (R - 2)): R = 2 divides by zero on the first long sequence.
        raise ValueError(
            f"{where}: rope.scaling dynamic_ntk needs >= 4 rotary dims, got {got}; {fix}, or pick another rope.scaling"
        )


# ----------------------------------------------------------------------------- run


class TrainSpec(Spec):
    """Optimisation. Steps count optimizer steps (one step = grad_accum micro-batches)."""

    steps: int = Field(200, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    muon_lr: float = Field(0.02, gt=0.0)
    adam_lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the device computes it natively (CUDA; a CPU with avx512_bf16 or AMX) "
                            "and ZeRO >= 1, else fp32")
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    ckpt_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    compile: bool = False


class DataSpec(Spec):
    """Where text comes from: "builtin" (ships with Python), a local path or glob, or "hf:NAME[:CONFIG]"."""

    source: str = "builtin"
    text_field: str = "text"
    seq_len: int = Field(256, ge=2)
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    max_documents: int | None = Field(None, ge=1)
    tokenizer_sample_chars: int = Field(5_000_000, ge=1000)


class EvalSpec(Spec):
    # In blocks, not batches: a cap in batches scored more validation tokens the larger
    # train.micro_batch_size was, so runs differing in batch size reported val/loss on different text.
    val_blocks: int = Field(160, ge=1, description="validation blocks of data.seq_len tokens scored at every "
                            "evaluation: the first N of the validation split (all of it when it has fewer)")
    hellaswag_limit: int = Field(0, ge=0, description="0 disables HellaSwag during training")
    hellaswag_path: str | None = None


class DeepSpeedSpec(Spec):
    zero_stage: Literal[0, 1, 2, 3] = 1
    ep_size: int = Field(1, ge=1)
    config: str | None = Field(None, description="a ds_configs/ JSON file; None picks one by stage and precision")


# A whole number >= 1, strictly (no True, 2.0 or "3"): what an old spec.json's val_batches must be to migrate.
_WHOLE_POSITIVE = TypeAdapter(Annotated[int, Field(ge=1, strict=True)])


class RunSpec(Spec):
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    data: DataSpec = DataSpec()
    eval: EvalSpec = EvalSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()

    @model_validator(mode="before")
    @classmethod
    def _val_batches_to_blocks(cls, data: Any) -> Any:
        """Run folders saved before eval.val_blocks hold eval.val_batches, a cap in micro-batches: read as
        val_batches x train.micro_batch_size blocks. A value that is not a whole number >= 1, or both
        keys at once, is left for validation to refuse by name (extra fields are forbidden)."""
        evals = data.get("eval") if isinstance(data, dict) else None
        if not isinstance(evals, dict) or "val_batches" not in evals or "val_blocks" in evals:
            return data
        train = data.get("train") if isinstance(data.get("train"), dict) else {}
        try:
            batches = _WHOLE_POSITIVE.validate_python(evals["val_batches"])
            micro = _WHOLE_POSITIVE.validate_python(
                train.get("micro_batch_size", TrainSpec.model_fields["micro_batch_size"].default))
        except ValueError:
            return data
        rest = {k: v for k, v in evals.items() if k != "val_batches"}
        return {**data, "eval": {**rest, "val_blocks": batches * micro}}

    @model_validator(mode="after")
    def _fits(self) -> RunSpec:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len}); "
                "lower data.seq_len or raise model.max_seq_len"
            )
        return self
