"""Sampling from a DecoderLM: greedy, temperature, top-k and top-p (nucleus), with or without a KV cache.

    tokens = generate(model, prompt_ids, max_new_tokens=64, sampling=Sampling(temperature=0.8, top_p=0.95), seed=0)

With the cache (the default) the prompt runs through the model once and every later step feeds only
the newest token, attending to the cached past (`zoo.blocks.kv_cache`); without it every step runs the
whole sequence again. Greedy decoding gives the same tokens either way (tested for every preset),
except with dynamic-NTK RoPE once the sequence grows past the scaling's `original_max_seq_len`: its
frequencies depend on the length so far and cached keys keep the rotation of their own step (as in
transformers), so from there the tokens may differ; `zoo generate` warns when a request can get there
(`dynamic_ntk_limit`). The cache is the fast path, the uncached one the reference.

Sampling follows transformers' order: logits / temperature, then keep the top_k, then the smallest set
whose probability reaches top_p; temperature 0 is greedy (argmax, top_k/top_p unused, as transformers
ignores them without do_sample; `zoo generate` refuses --top-k/--top-p without a temperature).

`load_run(RUN_DIR)` gives (model, spec, tokenizer) for `zoo generate` and `zoo eval`; `zoo generate`
puts EOS before the prompt, since every training document starts after one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Below the smallest normal float32, a temperature rounds to a subnormal or to 0 in the float32 logits and
# (logit - max) / temperature gives 0 / 0 at the top token; such a temperature is greedy in all but name.
MIN_SAMPLING_TEMPERATURE = torch.finfo(torch.float32).tiny


class GenerationError(ValueError):
    """Bad generation settings or a prompt that does not fit; the message names the value and the fix."""


class RunError(ValueError):
    """A run folder that cannot be used for evaluation or generation."""


def load_run(run_dir: str | Path, *, dtype: torch.dtype = torch.float32):
    """(model in eval mode, RunSpec, tokenizer) from a run folder: spec.json + model.safetensors
    (zoo.checkpoint) + tokenizer.model (zoo.tokenizer.Tokenizer, the tokenizer the run trained with),
    or for a folder `zoo import-hf` made, the source's tokenizer files in hf_tokenizer/ (HFTokenizer)."""
    from zoo.checkpoint import load_run_folder
    from zoo.tokenizer import HF_TOKENIZER_DIR, TOKENIZER_FILENAME, HFTokenizer, Tokenizer

    run_dir = Path(run_dir)
    check_run_folder(run_dir)
    if (run_dir / TOKENIZER_FILENAME).is_file():
        tokenizer, name = Tokenizer.load(run_dir), TOKENIZER_FILENAME
    else:
        tokenizer, name = HFTokenizer.load(run_dir / HF_TOKENIZER_DIR), f"the tokenizer in {HF_TOKENIZER_DIR}/"
    model, spec = load_run_folder(run_dir, dtype=dtype)
    if tokenizer.vocab_size > spec.model.vocab_size:
        raise RunError(f"{run_dir}: {name} has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                       f"{spec.model.vocab_size}: the tokenizer does not belong to this model")
    return model, spec, tokenizer


def check_run_folder(run_dir: str | Path) -> None:
    """RunError unless `run_dir` is a folder with a tokenizer, the run's tokenizer.model or an imported
    model's hf_tokenizer/ (checked before slower work)."""
    from zoo.tokenizer import HF_TOKENIZER_DIR, TOKENIZER_FILENAME

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    if not ((run_dir / TOKENIZER_FILENAME).is_file() or (run_dir / HF_TOKENIZER_DIR).is_dir()):
        raise RunError(f"run folder {run_dir} has no {TOKENIZER_FILENAME}: evaluation and generation need the "
                       "run's SentencePiece tokenizer (training writes it with Tokenizer.save(run_dir)), or for an "
                       f"imported model the source's tokenizer files in {HF_TOKENIZER_DIR}/")


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. Temperature 0 is greedy and ignores top_k/top_p, as transformers
    does without do_sample (lm-eval tasks such as mimic_repsum set top_p without sampling)."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # None = all tokens
    top_p: float | None = None  # None = no nucleus cut

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationError(f"temperature={self.temperature} must be a finite number >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k={self.top_k} must be >= 1 (or unset for all tokens)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p} must be in (0, 1] (or unset for no nucleus cut)")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE


def sample_next(logits_BV: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token (B,) from last-position logits (B, V)."""
    if sampling.greedy:
        return logits_BV.argmax(dim=-1)
    # Shift the top logit to 0 before dividing: a small temperature then sends the others towards -inf
    # instead of overflowing every logit to inf (inf - inf is NaN in the softmax).
    logits_BV = logits_BV.float()
    logits_BV = (logits_BV - logits_BV.max(dim=-1, keepdim=True).values) / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
        drop_BV = probs_BV.cumsum(dim=-1) - probs_BV >= sampling.top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def iter_generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int | None = None,
    eos_id: int | None = None,
    max_seq_len: int | None = None,
    use_cache: bool = True,
    tokenizer_vocab_size: int | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new tokens after `prompt_ids`, stopping before `eos_id`.

    `max_seq_len` (the model's context, when given) bounds prompt + new tokens: a request that cannot
    fit raises GenerationError before any work. `seed` makes sampling reproducible.
    `tokenizer_vocab_size` keeps every new id below it: a model's vocab may be larger than its
    tokenizer's (`load_run` allows it), and the tokenizer cannot decode the ids past its own."""
    prompt = list(prompt_ids)
    check_fits(len(prompt), max_new_tokens, max_seq_len)
    device = next(model.parameters()).device
    generator = None
    if seed is not None and not sampling.greedy:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids_1T = torch.tensor([prompt], dtype=torch.long, device=device)
    cache = model.new_cache(capacity=len(prompt) + max_new_tokens) if use_cache else None
    step_ids_1T = ids_1T  # what the next forward sees: all tokens without a cache, the newest with one
    for _ in range(max_new_tokens):
        logits_1V = model(step_ids_1T, cache=cache).logits[:, -1]
        if tokenizer_vocab_size is not None:
            logits_1V[:, tokenizer_vocab_size:] = float("-inf")
        token = int(sample_next(logits_1V, sampling, generator))
        if token == eos_id:
            return
        yield token
        new_11 = torch.tensor([[token]], dtype=torch.long, device=device)
        ids_1T = torch.cat((ids_1T, new_11), dim=1)
        step_ids_1T = new_11 if use_cache else ids_1T


def generate(model: nn.Module, prompt_ids: Sequence[int], **kwargs) -> list[int]:
    """The new tokens of `iter_generate` as a list (the prompt not included)."""
    return list(iter_generate(model, prompt_ids, **kwargs))


def dynamic_ntk_limit(spec) -> int | None:
    """The smallest `original_max_seq_len` of a dynamic-NTK layer of a ModelSpec (None if there is none):
    past it, cached decoding may differ from recomputing the prefix (see the module docstring)."""
    limits = [layer.attention.rope.scaling.original_max_seq_len for layer in spec.layer_specs()
              if layer.attention.rope.scaling.kind == "dynamic_ntk"]
    return min(limits, default=None)


def check_fits(prompt_len: int, max_new_tokens: int, max_seq_len: int | None) -> None:
    if prompt_len < 1:
        raise GenerationError("the prompt is empty: give at least one token (e.g. the EOS id as a document start)")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if max_seq_len is None:
        return
    if prompt_len >= max_seq_len:
        raise GenerationError(
            f"the prompt is {prompt_len} tokens, but the model's context (max_seq_len) is {max_seq_len}: "
            f"shorten the prompt to under {max_seq_len} tokens"
        )
    if prompt_len + max_new_tokens > max_seq_len:
        raise GenerationError(
            f"the prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"(max_seq_len {max_seq_len}): use max_new_tokens <= {max_seq_len - prompt_len}"
        )
