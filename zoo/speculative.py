"""Speculative greedy decoding with the model's own multi-token-prediction modules as the drafter.

    stats = SpeculativeStats()
    tokens = list(iter_generate_mtp(model, prompt_ids, max_new_tokens=64, stats=stats))

Each round the MTP modules draft up to `depth` tokens (module k, from the hidden state of depth k-1 and
the token before, guesses the token k places after the newest confirmed one), then the main model
runs once over the newest token and the drafts. A draft is accepted while it equals the main model's
greedy token at its place; the first mismatch is replaced by the main model's token, and if all are
accepted the main model's next token comes free: 1 to depth + 1 tokens per main forward, and exactly
the tokens plain greedy decoding gives (numerics aside: the main model scores a few positions at once
instead of one; the tests compare them token for token).

State between rounds, with N confirmed tokens x_0 .. x_{N-1} of which the last has not been fed yet:
the main KV cache and hidden states cover positions 0 .. N-2; module k's cache and outputs cover the
positions whose inputs are all confirmed (module k at position t reads tokens up to t + k). Rejected
drafts leave the caches by truncation (`LayerCache.truncate`), never by recomputation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from zoo.blocks.kv_cache import LayerCache
from zoo.generate import GenerationError, check_fits


@dataclass
class SpeculativeStats:
    """What a speculative decode did: drafts offered and accepted, main-model forwards, tokens produced."""

    drafted: int = 0
    accepted: int = 0
    forwards: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else float("nan")


@torch.no_grad()
def iter_generate_mtp(
    model,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    max_seq_len: int | None = None,
    tokenizer_vocab_size: int | None = None,
    stats: SpeculativeStats | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` greedy tokens after `prompt_ids`, stopping before `eos_id`, as
    `zoo.generate.iter_generate` with greedy sampling does; `stats` (when given) counts the work."""
    depth = len(getattr(model, "mtp", ()))
    if depth == 0:
        raise GenerationError("speculative decoding with MTP needs MTP modules, and this model has none "
                              "(model.mtp.depth = 0): train with model.mtp.depth >= 1, or decode without --speculative")
    prompt = list(prompt_ids)
    check_fits(len(prompt), max_new_tokens, max_seq_len)
    stats = stats if stats is not None else SpeculativeStats()
    device = next(model.parameters()).device
    capacity = len(prompt) + max_new_tokens + depth
    main_cache = model.new_cache(capacity)
    mtp_caches = [LayerCache(capacity) for _ in range(depth)]

    def greedy(logits_TV: torch.Tensor) -> list[int]:
        if tokenizer_vocab_size is not None:
            logits_TV[:, tokenizer_vocab_size:] = float("-inf")
        return logits_TV.argmax(-1).tolist()

    def main_forward(ids: list[int]) -> tuple[list[int], torch.Tensor]:
        out = model(torch.tensor([ids], device=device), cache=main_cache)
        stats.forwards += 1
        return greedy(out.logits[0]), out.hidden[0]

    guesses, hidden_main = main_forward(prompt)
    tokens = prompt + guesses[-1:]  # confirmed; the last one is not fed yet
    # hiddens[0]: the main model's at positions 0 .. N-2; hiddens[k]: module k's at the positions it covers
    hiddens = [hidden_main] + [hidden_main[:0] for _ in range(depth)]
    produced = 0
    while True:
        for token in tokens[len(prompt) + produced:]:
            if token == eos_id or produced == max_new_tokens:
                return
            produced += 1
            stats.tokens += 1
            yield token
        if produced == max_new_tokens:
            return
        N = len(tokens)
        drafts = _draft(model, tokens, hiddens, mtp_caches, min(depth, max_new_tokens - produced - 1), greedy)
        guesses, hidden = main_forward([tokens[-1], *drafts])
        accepted = next((i for i, (d, g) in enumerate(zip(drafts, guesses)) if d != g), len(drafts))
        stats.drafted += len(drafts)
        stats.accepted += accepted
        tokens += drafts[:accepted] + [guesses[accepted]]
        main_cache.truncate(N + accepted)  # fed: x_{N-1} and the accepted drafts
        hiddens[0] = torch.cat((hiddens[0], hidden[: accepted + 1]))
        for k, cache in enumerate(mtp_caches, start=1):  # module k's output at t read tokens up to t + k
            keep = min(cache.length, len(tokens) - 1 - k)
            cache.truncate(keep)
            hiddens[k] = hiddens[k][:keep]


def _draft(model, tokens: list[int], hiddens: list[torch.Tensor], caches: list[LayerCache], n_drafts: int,
           greedy) -> list[int]:
    """Up to `n_drafts` guesses of the tokens after `tokens`: module k catches up from the end of its cache to
    position N-2 (its inputs: depth k-1's hidden there, tokens t+k, the later ones drafts) and guesses token
    N-1+k from its last position."""
    N, drafts = len(tokens), []
    device = hiddens[0].device
    for k in range(1, n_drafts + 1):
        start = caches[k - 1].length
        ids = (tokens + drafts)[start + k: N - 1 + k]  # token t+k for t = start .. N-2
        h_TD = model.mtp_step(k, hiddens[k - 1][start: N - 1][None], torch.tensor([ids], device=device),
                              cache=caches[k - 1])[0]
        hiddens[k] = torch.cat((hiddens[k], h_TD))
        drafts += greedy(model.mtp_head(k)(h_TD[-1:]))
    return drafts
