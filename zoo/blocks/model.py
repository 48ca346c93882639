"""Decoder-only language model: token embedding, transformer blocks, final RMSNorm, LM head.

Legend: B = batch, T = sequence, D = d_model, V = vocab.

`labels` follow the transformers convention: the same shape as `input_ids`, shifted inside, so
position t predicts token t+1; -100 is ignored. The returned loss is cross-entropy plus every MoE
layer's auxiliary loss.

Incremental decoding: pass a `KVCache` (one `LayerCache` per layer); positions then continue from
the cache's length, and each attention layer appends what it needs to see the past.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zoo.blocks.dtypes import compute_dtype
from zoo.blocks.kv_cache import KVCache
from zoo.blocks.lm_loss import linear_cross_entropy
from zoo.blocks.moe import MoE, RouterStats
from zoo.blocks.norm import RMSNorm
from zoo.blocks.rope import check_positions

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # (B, T, V); None when forward(return_logits=False) computed a loss
    loss: torch.Tensor | None  # ce_loss + aux_loss, when labels are given
    ce_loss: torch.Tensor | None
    aux_loss: torch.Tensor  # sum over MoE layers (0 for a dense model)
    router_stats: dict[int, RouterStats] = field(default_factory=dict)  # layer index -> stats


class DecoderLM(nn.Module):
    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        layers: list[nn.Module],
        norm_eps: float = 1e-6,
        tie_embeddings: bool = True,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.vocab_size, self.d_model, self.init_std = vocab_size, d_model, init_std
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) for every matrix (embeddings, projections, stacked experts, routers),
        zeros for biases, ones for norm gains."""
        for name, param in self.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, self.init_std)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache for this model (`capacity`: positions to allocate up front)."""
        return KVCache(len(self.layers), capacity)

    def moe_layers(self) -> dict[int, MoE]:
        return {i: layer.ffn for i, layer in enumerate(self.layers) if isinstance(layer.ffn, MoE)}

    @torch.no_grad()
    def update_routing_biases(self, loads: dict[int, torch.Tensor]) -> None:
        """Auxiliary-loss-free balancing, once per optimizer step: `loads` maps a layer index to its
        expert loads summed over the accumulation window (and data-parallel ranks)."""
        for index, moe in self.moe_layers().items():
            if moe.router.has_routing_bias and index in loads:
                moe.router.update_bias(loads[index])

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool = True,
    ) -> CausalLMOutput:
        """`input_ids`, `labels`: (B, T). `positions`: (T,), shared by every row (default: 0..T-1,
        or continuing from the cache). `return_logits=False` (with labels): the loss from
        `linear_cross_entropy`, which never holds the (B, T, V) logits; `logits` is then None."""
        if positions is not None:
            check_positions(positions, input_ids.shape[1])
        x = self.embed(input_ids)  # (B, T, D)
        if cache is not None and positions is None:
            positions = torch.arange(cache.length, cache.length + input_ids.shape[1], device=input_ids.device)
        stats: dict[int, RouterStats] = {}
        for index, layer in enumerate(self.layers):
            x = layer(x, positions) if cache is None else layer(x, positions, cache=cache.layers[index])
            if isinstance(layer.ffn, MoE):
                stats[index] = layer.ffn.pop_stats()
        h = self.norm(x)
        aux_loss = sum((s.aux_loss for s in stats.values()), h.new_zeros((), dtype=torch.float32))
        logits = ce_loss = loss = None
        if return_logits or labels is None:
            logits = self.lm_head(h)  # (B, T, V)
        if labels is not None:
            if logits is not None:
                ce_loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
                )
            else:  # position t predicts t+1: shift the labels, not h (no copy of h)
                next_BT = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
                ce_loss = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, next_BT.flatten(),
                                               ignore_index=IGNORE_INDEX, dtype=compute_dtype(h))
            loss = ce_loss + aux_loss
        return CausalLMOutput(logits=logits, loss=loss, ce_loss=ce_loss, aux_loss=aux_loss, router_stats=stats)
