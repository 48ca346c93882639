"""Pre-norm transformer block: x + attention(norm(x)), then x + ffn(norm(x))."""

import torch
from torch import nn

from zoo.blocks.norm import RMSNorm


class TransformerBlock(nn.Module):
    def __init__(self, *, d_model: int, attention: nn.Module, ffn: nn.Module, norm_eps: float = 1e-6):
        super().__init__()
        self.attention_norm = RMSNorm(d_model, eps=norm_eps)
        self.attention = attention
        self.ffn_norm = RMSNorm(d_model, eps=norm_eps)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), positions)
        return x + self.ffn(self.ffn_norm(x))
