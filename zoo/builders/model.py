"""The model builder: a ModelSpec (or RunSpec) -> fdl.Config[DecoderLM] -> nn.Module."""

import fiddle as fdl
from torch import nn

from zoo.blocks.block import TransformerBlock
from zoo.blocks.model import DecoderLM
from zoo.blocks.mtp import MTPModule
from zoo.kinds import build_slot
from zoo.specs import LayerSpec, ModelSpec, RunSpec


def model_config(spec: ModelSpec | RunSpec) -> fdl.Config:
    """The whole module graph as a Fiddle config: print it, diff it, select and edit it, then build."""
    if isinstance(spec, RunSpec):
        spec = spec.model
    mtp = [
        fdl.Config(
            MTPModule,
            d_model=spec.d_model,
            block=_block(spec, layer),
            vocab_size=spec.vocab_size,
            norm_eps=spec.norm_eps,
            share_embedding=spec.mtp.share_embedding,
            share_head=spec.mtp.share_head,
        )
        for layer in spec.mtp_layer_specs()
    ]
    return fdl.Config(
        DecoderLM,
        vocab_size=spec.vocab_size,
        d_model=spec.d_model,
        layers=[_block(spec, layer) for layer in spec.layer_specs()],
        norm_eps=spec.norm_eps,
        tie_embeddings=spec.tie_embeddings,
        init_std=spec.init_std,
        mtp=mtp,
        mtp_loss_weight=spec.mtp.loss_weight,
    )


def _block(spec: ModelSpec, layer: LayerSpec) -> fdl.Config:
    return fdl.Config(
        TransformerBlock,
        d_model=spec.d_model,
        attention=build_slot("attention", layer.attention, d_model=spec.d_model, norm_eps=spec.norm_eps),
        ffn=build_slot("ffn", layer.ffn, d_model=spec.d_model),
        norm_eps=spec.norm_eps,
    )


def build(spec: ModelSpec | RunSpec) -> nn.Module:
    return fdl.build(model_config(spec))
