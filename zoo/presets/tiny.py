"""`tiny(spec)`: the same architecture at toy size, so tests and smoke runs never wait on full-size speed.

Kinds, flags, ratios that change behaviour (GQA vs MQA, partial rotary, group-limited routing,
first-k-dense, per-layer overrides, RoPE scaling, sliding windows) survive; widths, depth, vocabulary
and budget shrink.
"""

from dataclasses import dataclass

from zoo.kinds import shrink
from zoo.overrides import validate
from zoo.specs import RunSpec

TINY_VOCAB = 512  # the smallest comfortable byte-fallback SentencePiece vocabulary
TINY_D_MODEL = 64
TINY_HEADS = 4
TINY_SEQ = 64
TINY_MAX_EXPERTS = 8  # raised where top_k or group-limited routing needs more
TINY_ORIGINAL_CONTEXT = 32  # below TINY_SEQ: dynamic NTK, YaRN and sliding windows act


@dataclass(frozen=True)
class ToySize:
    """tiny()'s target (a `zoo.kinds.Size`): every width at its kind's own toy size."""

    d_model: int = TINY_D_MODEL
    n_heads: int = TINY_HEADS
    max_experts: int | None = TINY_MAX_EXPERTS

    def kv_heads(self, n_heads: int, n_kv_heads: int) -> int:
        if n_kv_heads == n_heads:
            return self.n_heads
        return 1 if n_kv_heads == 1 else self.n_heads // 2  # keep MQA as MQA and GQA as GQA

    def width(self, value: int, *, toy: int) -> int:
        return toy

    def per_head(self, value: int, *, toy: int, even: bool = False) -> int:
        return toy

    def context(self, value: int) -> int:
        return min(value, TINY_ORIGINAL_CONTEXT)


def tiny(spec: RunSpec) -> RunSpec:
    data = spec.model_dump(mode="json")
    model = data["model"]
    # Keep every layer an override names and the first layer each periodic override selects.
    listed = [i for o in model["overrides"] for i in o["layers"]]
    periodic_starts = [o["offset"] for o in model["overrides"] if o["every"] is not None]
    deepest_override = max(listed + periodic_starts, default=-1)
    model["n_layers"] = min(model["n_layers"], max(2, model["first_k_dense"] + 2, deepest_override + 1))
    model.update(vocab_size=TINY_VOCAB, d_model=TINY_D_MODEL, max_seq_len=TINY_SEQ)
    shrink(spec.model, model, ToySize())
    data["data"].update(seq_len=min(data["data"]["seq_len"], TINY_SEQ), tokenizer_sample_chars=200_000)
    data["train"].update(steps=2, micro_batch_size=2, grad_accum=1, warmup_steps=1, eval_every=1, ckpt_every=1)
    data["eval"].update(val_blocks=4, hellaswag_limit=min(data["eval"]["hellaswag_limit"], 8))
    return validate(RunSpec, data)
