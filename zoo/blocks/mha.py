"""Causal multi-head attention: MHA, GQA (1 < n_kv_heads < n_heads) and MQA (n_kv_heads = 1).

Legend: B = batch, T = sequence, D = d_model, H = query heads, G = key/value heads,
Dh = head dim, R = rotary dims (a prefix of each head, R = Dh * rotary fraction).

Options cover the attentions of GLM-4.5, Qwen3-MoE, OLMoE and Mixtral: q/k/v bias and an output bias;
RMSNorm on q and k before RoPE, per head (`qk_norm="head"`: GLM-4.5, Qwen3) or over the whole
projection, all heads at once (`qk_norm="projection"`: OLMoE); partial rotary (RoPE on the first R
dims of each head, the rest position-free); a sliding window (each query sees the last
`sliding_window` keys up to itself: Mistral, Mixtral).

With a `LayerCache`, keys (rotated) and values of G heads are cached: 2 * G * Dh numbers per token
(every position, also with a sliding window: the mask hides the old ones).
"""

import torch
from torch import nn

from zoo.blocks.kv_cache import LayerCache
from zoo.blocks.sdpa import causal_attention
from zoo.blocks.norm import RMSNorm
from zoo.blocks.rope import RotaryEmbedding, apply_rope, check_positions


class MultiHeadAttention(nn.Module):
    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rope: RotaryEmbedding,
        qk_norm: str | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        sliding_window: int | None = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        if rope.dim > head_dim:
            raise ValueError(f"rotary dim ({rope.dim}) exceeds head_dim ({head_dim})")
        if qk_norm not in (None, "head", "projection"):
            raise ValueError(f"qk_norm must be None, 'head' or 'projection', got {qk_norm!r}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.qk_norm, self.sliding_window = qk_norm, sliding_window
        self.rope = rope
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=o_bias)
        per_head = qk_norm == "head"
        self.q_norm = RMSNorm(head_dim if per_head else n_heads * head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim if per_head else n_kv_heads * head_dim, eps=norm_eps) if qk_norm else None
        self.softmax_scale = head_dim**-0.5 * rope.softmax_scale_factor

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """x: (B, T, D). positions: (T,) absolute positions of these T tokens, shared by the batch;
        default: past, ..., past + T - 1, with past the cache's length (0 without a cache)."""
        B, T, _ = x.shape
        past = 0 if cache is None else cache.length
        if positions is None:
            positions = torch.arange(past, past + T, device=x.device)
        check_positions(positions, T)
        q, k = self.q_proj(x), self.k_proj(x)  # (B, T, H * Dh), (B, T, G * Dh)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, Dh)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rope(positions)  # (T, R/2)
        q, k = _rotate_prefix(q, cos, sin), _rotate_prefix(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, G, S, Dh): the past and these T positions
        y = causal_attention(q, k, v, scale=self.softmax_scale, n_past=past,
                             window=self.sliding_window)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def _rotate_prefix(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first R dims of each head; the remaining dims pass through (partial rotary)."""
    rotary = cos.shape[-1] * 2
    if rotary == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
