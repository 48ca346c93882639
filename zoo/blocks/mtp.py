"""A multi-token-prediction module (DeepSeek-V3, arXiv 2412.19437 section 2.2, eqs. 21-23).

Legend: B = batch, T = positions, D = d_model, V = vocab.

Module k (k = 1..depth) keeps the causal chain: at position t it combines h^{k-1}_t, what depth k-1
computed at t (the main model for k = 1), with the embedding of token t+k, runs one transformer
block, and its head predicts token t+1+k:

    h'_t  = eh_proj([enorm(Emb(x_{t+k})); hnorm(h^{k-1}_t)])      (2D -> D)
    h^k_t = norm(Block_k(h'_t)),    logits_t = head(h^k_t)

Layout as the released DeepSeek-V3 / GLM-4.5 checkpoints store it (model.layers.{n_layers + k - 1}.
enorm, hnorm, eh_proj, the block's weights, shared_head.norm, shared_head.head, embed_tokens): the
embedding half comes first in eh_proj's input. The paper's OutHead is `norm` + the head. The hidden
each depth hands on, h^k, is the normalised one the head reads, as Megatron-Core does and as the
serving engines feed depth 1 (the main model's output after its final norm).

The embedding and the head are the main model's unless the module has its own (`share_embedding`,
`share_head` False); the model passes the shared ones in, so no parameter is registered twice.
"""

import torch
from torch import nn

from zoo.blocks.kv_cache import LayerCache
from zoo.blocks.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(
        self,
        *,
        d_model: int,
        block: nn.Module,
        vocab_size: int,
        norm_eps: float = 1e-6,
        share_embedding: bool = True,
        share_head: bool = True,
    ):
        super().__init__()
        self.enorm = RMSNorm(d_model, eps=norm_eps)
        self.hnorm = RMSNorm(d_model, eps=norm_eps)
        self.eh_proj = nn.Linear(2 * d_model, d_model, bias=False)
        self.block = block
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.embed = None if share_embedding else nn.Embedding(vocab_size, d_model)
        self.head = None if share_head else nn.Linear(d_model, vocab_size, bias=False)

    def forward(
        self,
        h_prev_BTD: torch.Tensor,
        e_BTD: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """h_prev: depth k-1's normalised hidden at positions t; e: the embeddings of tokens t+k. Returns h^k
        (B, T, D). `positions` (T,) are the hidden's own (default: continuing from the cache, 0 without one)."""
        x_BTD = self.eh_proj(torch.cat((self.enorm(e_BTD), self.hnorm(h_prev_BTD)), dim=-1))
        x_BTD = self.block(x_BTD, positions) if cache is None else self.block(x_BTD, positions, cache=cache)
        return self.norm(x_BTD)
