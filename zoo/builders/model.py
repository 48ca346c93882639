"""The model builder: a ModelSpec (or RunSpec) -> fdl.Config[DecoderLM] -> nn.Module."""

import fiddle as fdl
from torch import nn

from zoo.blocks.block import TransformerBlock
from zoo.blocks.model import DecoderLM
from zoo.kinds import build_slot
from zoo.specs import ModelSpec, RunSpec


def model_config(spec: ModelSpec | RunSpec) -> fdl.Config:
    """The whole module graph as a Fiddle config: print it, diff it, select and edit it, then build."""
    if isinstance(spec, RunSpec):
        spec = spec.model
    layers = [
        fdl.Config(
            TransformerBlock,
            d_model=spec.d_model,
            attention=build_slot("attention", layer.attention, d_model=spec.d_model, norm_eps=spec.norm_eps),
            ffn=build_slot("ffn", layer.ffn, d_model=spec.d_model),
            norm_eps=spec.norm_eps,
        )
        for layer in spec.layer_specs()
    ]
    return fdl.Config(
        DecoderLM,
        vocab_size=spec.vocab_size,
        d_model=spec.d_model,
        layers=layers,
        norm_eps=spec.norm_eps,
        tie_embeddings=spec.tie_embeddings,
        init_std=spec.init_std,
    )


def build(spec: ModelSpec | RunSpec) -> nn.Module:
    return fdl.build(model_config(spec))
