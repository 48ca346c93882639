"""Typed specs: the vocabulary of what a block *is*.

Every slot (attention, FFN, router, RoPE scaling) is a discriminated union keyed by `kind`, made of
the kinds registered in `zoo.kinds` (one module per kind family; the kinds' spec classes are
re-exported here). Specs are frozen pydantic models: presets change copies (see
`zoo.overrides.with_changes`), and every spec round-trips through JSON exactly. Cross-field rules live
in validators whose messages name the field, the value and the fix.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, model_validator

from zoo.kinds import kind_of, union
from zoo.kinds.mha import MHASpec
from zoo.kinds.mla import MLASpec
from zoo.kinds.mlp import MLPSpec
from zoo.kinds.moe import MoESpec
from zoo.kinds.registry import Spec
from zoo.kinds.rope_scaling import DynamicNTKScaling, LinearScaling, NoScaling, RopeSpec, YarnScaling
from zoo.kinds.routers import SigmoidGroupTopKRouterSpec, SoftmaxTopKRouterSpec

__all__ = [
    "DataSpec", "DeepSpeedSpec", "DynamicNTKScaling", "EvalSpec", "LayerOverride", "LayerSpec", "LinearScaling",
    "MHASpec", "MLASpec", "MLPSpec", "MTPSpec", "ModelSpec", "MoESpec", "NoScaling", "RopeSpec", "RunSpec",
    "SigmoidGroupTopKRouterSpec", "SoftmaxTopKRouterSpec", "Spec", "TrainSpec", "YarnScaling",
]

# The field annotations of the attention and FFN slots, as registered when this module loads; not
# exported: `zoo.kinds.register` re-points the fields below at every kind registered later, while these
# names keep the old union. `zoo.kinds.union(slot)` is the live one.
AttentionSpec = union("attention")
FFNSpec = union("ffn")


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


class MTPSpec(Spec):
    """Multi-token prediction (DeepSeek-V3, arXiv 2412.19437 section 2.2): `depth` modules after the main
    model, module k (1..depth) predicting at position t the token t+1+k, each one transformer block of the
    model's `attention` and `ffn`. 0 = off."""

    depth: int = Field(0, ge=0, description="sequential MTP modules (DeepSeek-V3 and GLM-4.5 release 1); 0 = off")
    loss_weight: float = Field(0.3, ge=0.0, description="lambda: the training loss adds lambda x the mean of the "
                               "depths' cross-entropies (DeepSeek-V3: 0.3 for its first 10T tokens, then 0.1)")
    share_embedding: bool = Field(True, description="the modules embed with the main model's embedding")
    share_head: bool = Field(True, description="the modules' logits come from the main model's LM head")


class ModelSpec(Spec):
    """A decoder-only LM: embedding, `n_layers` pre-norm blocks, final RMSNorm, LM head.

    Every layer uses `attention` and `ffn`, except the first `first_k_dense` layers, which use
    `dense_ffn` (DeepSeek's first_k_dense_replace), and layers selected by `overrides` (applied in
    order, later ones win). `mtp` adds multi-token-prediction modules after the last layer.
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
    mtp: MTPSpec = MTPSpec()

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
        layers = [(f"layer {i}", layer) for i, layer in enumerate(self.layer_specs())]
        layers += [(f"MTP module {k + 1}", layer) for k, layer in enumerate(self.mtp_layer_specs())]
        for where, layer in layers:
            for slot, spec in (("attention", layer.attention), ("ffn", layer.ffn)):
                check = kind_of(spec).check
                if check is not None:
                    check(spec, d_model=self.d_model, where=f"{where} {slot}")
        return self

    def training_warnings(self) -> list[str]:
        """One line per distinct concern of the MoE layers that train poorly (MoESpec.training_warning)."""
        layers: dict[str, list[int]] = {}
        for index, layer in enumerate(self.layer_specs()):
            concern = layer.ffn.training_warning() if isinstance(layer.ffn, MoESpec) else None
            if concern:
                layers.setdefault(concern, []).append(index)
        return [f"model layers {indices}: {concern}" for concern, indices in layers.items()]

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

    def mtp_layer_specs(self) -> list[LayerSpec]:
        """The block of each MTP module: the model's own `attention` and `ffn` (overrides name main layers only)."""
        return [LayerSpec(attention=self.attention, ffn=self.ffn)] * self.mtp.depth


# ----------------------------------------------------------------------------- run


class TrainSpec(Spec):
    """Optimisation. Steps count optimizer steps (one step = grad_accum micro-batches)."""

    steps: int = Field(200, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    optimizer: Literal["muon", "adamw"] = Field(
        "muon", description="muon: Muon (muon_lr) for hidden matrices, AdamW (adam_lr) for embeddings, head, "
                            "routers, norms and biases; adamw: every parameter on AdamW at adam_lr")
    muon_experts: bool = Field(True, description="train.optimizer=muon: stacked expert weights on Muon (per "
                               "expert); false puts them on AdamW, whose step costs no Newton-Schulz")
    muon_lr: float = Field(0.02, gt=0.0, description="Muon's peak LR (train.optimizer=muon)")
    adam_lr: float = Field(3e-3, gt=0.0, description="AdamW's peak LR: the non-Muon parameters, or all of them "
                                                     "under train.optimizer=adamw")
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
        depth = self.model.mtp.depth
        if depth and self.data.seq_len < depth + 2:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) leaves MTP module {depth} (model.mtp.depth) no token to "
                f"predict: it predicts token t+{depth + 1}; use data.seq_len >= {depth + 2}"
            )
        return self
