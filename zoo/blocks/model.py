"""Decoder-only language model: token embedding, transformer blocks, final RMSNorm, LM head.

Legend: B = batch, T = sequence, D = d_model, V = vocab.

`labels` follow the transformers convention: the same shape as `input_ids`, shifted inside, so
position t predicts token t+1; -100 is ignored. The returned loss is cross-entropy plus every MoE
layer's auxiliary loss, plus, with multi-token-prediction modules (zoo/blocks/mtp.py), their loss
weight times the mean of their cross-entropies (module k at position t predicts token t+1+k). The MTP
modules run only when labels are given; decoding drafts with them through `mtp_step`.

Incremental decoding: pass a `KVCache` (one `LayerCache` per layer); positions then continue from
the cache's length, and each attention layer appends what it needs to see the past.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zoo.blocks.dtypes import compute_dtype
from zoo.blocks.kv_cache import KVCache, LayerCache
from zoo.blocks.lm_loss import linear_cross_entropy
from zoo.blocks.moe import MoE, RouterStats
from zoo.blocks.mtp import MTPModule
from zoo.blocks.norm import RMSNorm
from zoo.blocks.rope import check_positions

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # (B, T, V); None when forward(return_logits=False) computed a loss
    loss: torch.Tensor | None  # ce_loss + aux_loss (+ mtp_loss_weight x mtp_losses.mean()), with labels
    ce_loss: torch.Tensor | None  # the main model's next-token cross-entropy
    aux_loss: torch.Tensor  # sum over MoE layers, the MTP modules' included (0 for a dense model)
    router_stats: dict[int, RouterStats] = field(default_factory=dict)  # block index (blocks()) -> stats
    hidden: torch.Tensor | None = None  # (B, T, D): the final norm's output, what the head reads
    mtp_losses: torch.Tensor | None = None  # (depth,): each MTP module's cross-entropy, with labels
    mtp_logits: list[torch.Tensor] | None = None  # module k's (B, T - k, V), with labels and logits


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
        mtp: list[MTPModule] | None = None,
        mtp_loss_weight: float = 0.0,
    ):
        super().__init__()
        self.vocab_size, self.d_model, self.init_std = vocab_size, d_model, init_std
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Registered last, so the main model's parameters come first in every listing and state_dict.
        self.mtp = nn.ModuleList(mtp or [])
        self.mtp_loss_weight = mtp_loss_weight
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

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks: the layers, then each MTP module's (numbered on, as checkpoints number them)."""
        return [*self.layers, *(module.block for module in self.mtp)]

    def moe_layers(self) -> dict[int, MoE]:
        return {i: block.ffn for i, block in enumerate(self.blocks()) if isinstance(block.ffn, MoE)}

    def mtp_embedding(self, k: int) -> nn.Embedding:
        """The embedding MTP module k (1-based) reads: its own or the main model's."""
        module = self.mtp[k - 1]
        return self.embed if module.embed is None else module.embed

    def mtp_head(self, k: int) -> nn.Linear:
        module = self.mtp[k - 1]
        return self.lm_head if module.head is None else module.head

    def vocab_parameters(self) -> list[nn.Parameter]:
        """The embeddings and output heads (rows indexed by token), the MTP modules' own included."""
        modules = [self.embed, self.lm_head, *(m for k in range(1, len(self.mtp) + 1)
                                               for m in (self.mtp_embedding(k), self.mtp_head(k)))]
        return list({id(m.weight): m.weight for m in modules}.values())

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
        logits = ce_loss = loss = mtp_losses = mtp_logits = None
        if return_logits or labels is None:
            logits = self.lm_head(h)  # (B, T, V)
        if labels is not None:
            ce_loss = _shifted_cross_entropy(h, logits, self.lm_head.weight, labels)
            if self.mtp and cache is None:
                mtp_losses, mtp_logits = self._mtp_losses(input_ids, h, labels, positions, return_logits, stats)
        aux_loss = sum((s.aux_loss for s in stats.values()), h.new_zeros((), dtype=torch.float32))
        if labels is not None:
            loss = ce_loss + aux_loss
            if mtp_losses is not None:
                loss = loss + self.mtp_loss_weight * mtp_losses.mean()
        return CausalLMOutput(logits=logits, loss=loss, ce_loss=ce_loss, aux_loss=aux_loss, router_stats=stats,
                              hidden=h, mtp_losses=mtp_losses, mtp_logits=mtp_logits)

    def mtp_step(self, k: int, h_prev_BTD: torch.Tensor, next_ids_BT: torch.Tensor,
                 positions: torch.Tensor | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        """MTP module k (1-based) on depth k-1's hidden at positions t and the ids of tokens t+k: its h^k."""
        e_BTD = self.mtp_embedding(k)(next_ids_BT)
        return self.mtp[k - 1](h_prev_BTD, e_BTD, positions, cache)

    def _mtp_losses(self, input_ids, h_BTD, labels, positions, return_logits, stats) -> tuple:
        """Each module's cross-entropy (depth,), and its logits when asked. Module k sees the T - k positions
        whose token t+k exists; a sequence too short for a module stops the chain there."""
        T = input_ids.shape[1]
        losses, all_logits = [], []
        for k in range(1, min(len(self.mtp), T - 2) + 1):
            n = T - k
            h_BTD = self.mtp_step(k, h_BTD[:, :n], input_ids[:, k:], None if positions is None else positions[:n])
            block = self.mtp[k - 1].block
            if isinstance(block.ffn, MoE):
                stats[len(self.layers) + k - 1] = block.ffn.pop_stats()
            head = self.mtp_head(k)
            logits = head(h_BTD) if return_logits else None  # (B, T - k, V)
            losses.append(_shifted_cross_entropy(h_BTD, logits, head.weight, labels[:, k:]))
            all_logits.append(logits)
        if not losses:
            return None, None
        return torch.stack(losses), (all_logits if return_logits else None)


def _shifted_cross_entropy(h_BTD, logits_BTV, weight_VD, labels_BT) -> torch.Tensor:
    """Mean cross-entropy of position t against labels[:, t + 1] (the last position has no target): from the
    logits when given, else by `linear_cross_entropy`, which never holds them."""
    if logits_BTV is not None:
        return F.cross_entropy(
            logits_BTV[:, :-1].flatten(0, 1).float(), labels_BT[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
    # position t predicts t+1: shift the labels, not h (no copy of h)
    next_BT = F.pad(labels_BT[:, 1:], (0, 1), value=IGNORE_INDEX)
    return linear_cross_entropy(h_BTD.flatten(0, 1), weight_VD, next_BT.flatten(),
                                ignore_index=IGNORE_INDEX, dtype=compute_dtype(h_BTD))
