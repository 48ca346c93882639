"""Pre-norm transformer block: x + attention(norm(x)), then x + ffn(norm(x))."""

import torch
from torch import nn

from zoo.blocks.kv_cache import LayerCache
from zoo.blocks.norm import RMSNorm


class TransformerBlock(nn.Module):
    def __init__(self, *, d_model: int, attention: nn.Module, ffn: nn.Module, norm_eps: float = 1e-6):
        super().__init__()
        self.attention_norm = RMSNorm(d_model, eps=norm_eps)
        self.attention = attention
        self.ffn_norm = RMSNorm(d_model, eps=norm_eps)
        self.ffn = ffn

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        h = self.attention_norm(x)
        # The cache is passed only when given, so attention modules without cache support still fit.
        x = x + (self.attention(h, positions) if cache is None else self.attention(h, positions, cache=cache))
        return x + self.ffn(self.ffn_norm(x))
