"""Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, section 2.1; used unchanged in V3).

Legend: B = batch, T = sequence, D = d_model, H = heads, C = kv_lora_rank (the cached latent),
Cq = q_lora_rank, N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim.

Keys and values are up-projected from a per-token latent c (C dims) plus one rotary key (R dims)
shared by all heads; only those C + R numbers per token need caching. Queries come from their own
low-rank path (Cq) or a plain projection. Scores use N + R dims per head, values V dims, so q.k and
v have different head sizes, which SDPA handles.

With a `LayerCache`, only the normalised latent and the rotated shared key are cached (C + R numbers
per token); every step up-projects the cached latent to per-head keys and values again. (Absorbing
kv_b_proj into the query and output projections would skip that up-projection; not done here.)
"""

import torch
from torch import nn

from zoo.blocks.kv_cache import LayerCache
from zoo.blocks.sdpa import causal_attention
from zoo.blocks.norm import RMSNorm
from zoo.blocks.rope import Layout, RotaryEmbedding, apply_rope, check_positions


class MultiHeadLatentAttention(nn.Module):
    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        rope: RotaryEmbedding,
        q_lora_rank: int | None = None,
        rope_layout: Layout = "half",
        bias: bool = False,
        latent_norm_eps: float = 1e-6,
    ):
        super().__init__()
        if rope.dim != qk_rope_head_dim:
            raise ValueError(f"rope dim ({rope.dim}) must equal qk_rope_head_dim ({qk_rope_head_dim})")
        self.n_heads, self.kv_lora_rank = n_heads, kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_dim = qk_nope_head_dim + qk_rope_head_dim
        self.rope, self.rope_layout = rope, rope_layout
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=bias)
            self.q_a_norm = RMSNorm(q_lora_rank, eps=latent_norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, n_heads * self.qk_dim, bias=False)
        self.q_lora_rank = q_lora_rank
        self.kv_a_proj = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_norm = RMSNorm(kv_lora_rank, eps=latent_norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * v_head_dim, d_model, bias=bias)
        self.softmax_scale = self.qk_dim**-0.5 * rope.softmax_scale_factor

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """x: (B, T, D). positions: (T,) absolute positions of these T tokens, shared by the batch;
        default: past, ..., past + T - 1, with past the cache's length (0 without a cache)."""
        B, T, _ = x.shape
        H = self.n_heads
        past = 0 if cache is None else cache.length
        if positions is None:
            positions = torch.arange(past, past + T, device=x.device)
        check_positions(positions, T)
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.qk_dim).transpose(1, 2)  # (B, H, T, N+R)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)

        latent, k_rope = self.kv_a_proj(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)  # (B, T, C), (B, T, R)
        latent = self.kv_a_norm(latent)
        cos, sin = self.rope(positions)  # (T, R/2)
        q_rope = apply_rope(q_rope, cos, sin, self.rope_layout)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin, self.rope_layout)  # (B, 1, T, R): one key for all heads
        if cache is not None:
            latent, k_rope = cache.append(latent, k_rope.squeeze(1))  # (B, S, C), (B, S, R): past + T positions
            k_rope = k_rope.unsqueeze(1)  # (B, 1, S, R)
        S = latent.shape[1]

        kv = self.kv_b_proj(latent).view(B, S, H, self.nope_dim + self.v_dim).transpose(1, 2)  # (B, H, S, N+V)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(B, H, S, self.rope_dim)), dim=-1)  # (B, H, S, N+R)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, N+R)
        y = causal_attention(q, k, v, scale=self.softmax_scale, n_past=past)  # (B, H, T, V)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))
