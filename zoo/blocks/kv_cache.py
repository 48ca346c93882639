"""A key/value cache for incremental decoding, and the attention mask that goes with it.

Legend: B = batch, S = cached positions (past + new), T = new positions, F = a cached feature dim.

The cache stores, per layer, whatever tensors that layer's attention chooses, each laid out
(..., S, F) with time second to last: MHA/GQA its rotated keys and values (B, G, S, Dh) each; MLA
only its normalised latent (B, S, C) and the rotated rotary key shared by all heads (B, S, R).
It knows nothing about attention: `append` writes the new positions and returns everything so far.

Keys are cached after RoPE, so a cached key keeps the rotation it was computed with. For every
scaling but dynamic NTK that is the rotation a full forward would give it. Dynamic NTK's frequencies
depend on the sequence length seen so far: once the length passes `original_max_seq_len`, new
positions use the rescaled base while cached keys keep the base of their own step, so cached decoding
then differs from recomputing the whole prefix. transformers' dynamic RoPE with its cache does the
same (it recomputes inv_freq for new positions and never re-rotates cached keys).

Buffers grow by doubling, so a step copies only the new positions (amortised O(1) per token)
instead of concatenating the whole past again.
"""

import torch

MIN_CAPACITY = 64  # positions allocated on the first append when no capacity is given


class LayerCache:
    """The cached tensors of one attention layer."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.length = 0
        self._buffers: list[torch.Tensor] | None = None

    def append(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write `new` (each (..., T, F), the same T) after the cached positions; return views (..., S, F)."""
        T = new[0].shape[-2]
        end = self.length + T
        if self._buffers is None:
            size = max(end, self.capacity or MIN_CAPACITY)
            self._buffers = [x.new_empty(*x.shape[:-2], size, x.shape[-1]) for x in new]
        elif end > self._buffers[0].shape[-2]:
            size = max(end, 2 * self._buffers[0].shape[-2])
            grown = [buf.new_empty(*buf.shape[:-2], size, buf.shape[-1]) for buf in self._buffers]
            for old, buf in zip(self._buffers, grown):
                buf[..., : self.length, :] = old[..., : self.length, :]
            self._buffers = grown
        for buf, x in zip(self._buffers, new, strict=True):
            buf[..., self.length : end, :] = x
        self.length = end
        return tuple(buf[..., :end, :] for buf in self._buffers)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (speculative decoding drops the keys of rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def nbytes_per_position(self) -> int:
        """Bytes one position of one sequence occupies (0 before the first append)."""
        if self._buffers is None:
            return 0
        return sum(buf[..., :1, :].numel() // buf.shape[0] * buf.element_size() for buf in self._buffers)


class KVCache:
    """One LayerCache per layer; `length` is the number of positions every layer has seen."""

    def __init__(self, n_layers: int, capacity: int | None = None):
        self.layers = [LayerCache(capacity) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)

    def nbytes_per_token(self) -> int:
        """Cache bytes per position per sequence, summed over layers (in the cache's own dtype)."""
        return sum(layer.nbytes_per_position() for layer in self.layers)


def causal_sdpa_mask(n_new: int, n_past: int, device: torch.device, window: int | None = None) -> dict:
    """Keyword arguments for `F.scaled_dot_product_attention` when `n_new` queries follow `n_past`
    cached positions. SDPA's `is_causal=True` aligns its triangle to the top-left corner, which is
    right only without a past; a single new query sees every key; otherwise new query i (absolute
    position n_past + i) sees keys 0 .. n_past + i. With a sliding `window`, it sees only the last
    `window` of those (itself included), keys n_past + i - window + 1 .. n_past + i."""
    if window is not None and n_past + n_new > window:
        keep_TS = torch.ones(n_new, n_past + n_new, dtype=torch.bool, device=device)
        return {"attn_mask": keep_TS.tril(diagonal=n_past).triu(diagonal=n_past - window + 1)}
    if n_past == 0:
        return {"is_causal": True}
    if n_new == 1:
        return {}
    keep_TS = torch.ones(n_new, n_past + n_new, dtype=torch.bool, device=device).tril(diagonal=n_past)
    return {"attn_mask": keep_TS}
