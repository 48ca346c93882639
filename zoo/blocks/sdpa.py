"""Causal attention for every attention kind: SDPA, or on CPU for short bf16 sequences the same
computation written as two batched matmuls around a softmax.

Legend: B = batch, H = query heads, G = key/value heads, T = new positions, S = keys (past + T),
Dk = query/key head dim, Dv = value head dim.

Why two paths: on CPU, SDPA's flash kernel is slow for short sequences, its backward most of all.
The matmul path takes the queries in blocks of 128, each against the keys up to its last query,
which skips most of the causal mask's hidden upper triangle. Measured here (2 cores, B 8, H 8,
head dim 64, forward + backward, bf16, ms; torch.compile'd / eager):

    T      SDPA (flash)    matmul, one block    matmul, blocks of 128
    256     26.6 / 24.8        16.2 / 19.1            8.8 / 14.6
    512     85.4 /   -         67.3 /   -            33.9 /   -
    1024   192.1 / 185.6      246.7 / 274.3         116.9 / 164.0
    2048   632.6 /   -            - /   -           478.1 /   -

The matmul path keeps the (B*H, 128, S) score blocks for the backward (64 MiB a layer at B 8,
H 8, T 1024; quadratic in T), so it stops at MATMUL_PATH_MAX_KEYS. In fp32 the two paths are
even, so fp32 and CUDA always take SDPA (flash or cuDNN attention on a GPU: on an H200 with
torch 2.11 SDPA chose cuDNN for every attention kind, MLA with qk 96 / v 64 included).
"""

import torch
import torch.nn.functional as F

from zoo.blocks.dtypes import compute_dtype
from zoo.blocks.kv_cache import causal_sdpa_mask

MATMUL_PATH_MAX_KEYS = 1024  # CPU bf16 sequences up to this many keys take the matmul path
QUERY_BLOCK = 128  # the matmul path's queries per block


def causal_attention(
    q_BHTD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor, *, scale: float, n_past: int = 0,
    window: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v for T new queries after `n_past` cached positions;
    G may divide H (grouped-query attention). With a sliding `window`, a query sees only the last
    `window` keys up to itself (Mistral's sliding-window attention). Returns (B, H, T, Dv)."""
    B, H, T, _ = q_BHTD.shape
    G, S = k_BGSD.shape[1], k_BGSD.shape[2]
    if q_BHTD.device.type == "cpu" and compute_dtype(q_BHTD) == torch.bfloat16 and S <= MATMUL_PATH_MAX_KEYS:
        return _matmul_attention(q_BHTD, k_BGSD, v_BGSD, scale=scale, n_past=n_past, window=window)
    return F.scaled_dot_product_attention(
        q_BHTD, k_BGSD, v_BGSD, scale=scale, enable_gqa=G != H,
        **causal_sdpa_mask(T, n_past, q_BHTD.device, window=window),
    )


def _matmul_attention(q_BHTD, k_BGSD, v_BGSD, *, scale: float, n_past: int, window: int | None) -> torch.Tensor:
    """Queries in blocks of QUERY_BLOCK; each block scores only the keys up to its last query, so
    the causal mask's hidden upper triangle is mostly skipped (at T = S = 256, a quarter of the
    score and value matmuls and of the softmax)."""
    T = q_BHTD.shape[2]
    if T <= QUERY_BLOCK:
        return _matmul_attention_block(q_BHTD, k_BGSD, v_BGSD, scale=scale, n_past=n_past, window=window)
    outs = []
    for start, q_block in zip(range(0, T, QUERY_BLOCK), q_BHTD.split(QUERY_BLOCK, dim=2)):
        S = n_past + start + q_block.shape[2]  # keys up to this block's last query
        outs.append(_matmul_attention_block(q_block, k_BGSD[:, :, :S], v_BGSD[:, :, :S], scale=scale,
                                            n_past=n_past + start, window=window))
    return torch.cat(outs, dim=2)


def _matmul_attention_block(q_BHTD, k_BGSD, v_BGSD, *, scale: float, n_past: int,
                            window: int | None) -> torch.Tensor:
    dtype = torch.bfloat16
    q_BHTD, k_BGSD, v_BGSD = q_BHTD.to(dtype), k_BGSD.to(dtype), v_BGSD.to(dtype)
    B, H, T, Dk = q_BHTD.shape
    G, S, Dv = k_BGSD.shape[1], k_BGSD.shape[2], v_BGSD.shape[-1]
    r = H // G  # query heads per key head: each key head's r query heads share one (r*T, S) matmul
    q_NMD = q_BHTD.reshape(B * G, r * T, Dk)
    k_NSD = k_BGSD.expand(B, G, S, Dk).reshape(B * G, S, Dk)
    v_NSD = v_BGSD.expand(B, G, S, Dv).reshape(B * G, S, Dv)
    position_T = torch.arange(n_past, n_past + T, device=q_BHTD.device)
    key_S = torch.arange(S, device=q_BHTD.device)
    hidden_TS = key_S > position_T[:, None]  # key after the query
    if window is not None:
        hidden_TS |= key_S <= position_T[:, None] - window  # key out of the sliding window
    mask_MS = torch.zeros(T, S, dtype=q_BHTD.dtype, device=q_BHTD.device).masked_fill_(hidden_TS, float("-inf"))
    scores_NMS = torch.baddbmm(mask_MS.repeat(r, 1).expand(B * G, r * T, S), q_NMD, k_NSD.transpose(1, 2), alpha=scale)
    y_NMD = torch.bmm(scores_NMS.softmax(dim=-1), v_NSD)
    return y_NMD.view(B, H, T, Dv)
