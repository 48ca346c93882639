"""`tiny(spec)`: the same architecture at toy size, so tests and smoke runs never wait on full-size speed.

Kinds, flags, ratios that change behaviour (GQA vs MQA, partial rotary, group-limited routing,
first-k-dense, per-layer overrides, RoPE scaling) survive; widths, depth, vocabulary and budget shrink.
"""

import math
from typing import Any

from zoo.overrides import validate
from zoo.specs import RunSpec

TINY_VOCAB = 512  # the smallest comfortable byte-fallback SentencePiece vocabulary
TINY_D_MODEL = 64
TINY_HEADS = 4
TINY_SEQ = 64
TINY_HIDDEN = 128
TINY_EXPERT_HIDDEN = 32
TINY_MAX_EXPERTS = 8  # raised where top_k or group-limited routing needs more
TINY_EXPERTS_PER_GROUP = 2  # so group-limited routing still chooses within each group
TINY_ORIGINAL_CONTEXT = 32  # below TINY_SEQ, so dynamic-NTK and YaRN scaling are exercised


def tiny(spec: RunSpec) -> RunSpec:
    data = spec.model_dump(mode="json")
    model = data["model"]
    # Keep every layer an override names and the first layer each periodic override selects.
    listed = [i for o in model["overrides"] for i in o["layers"]]
    periodic_starts = [o["offset"] for o in model["overrides"] if o["every"] is not None]
    deepest_override = max(listed + periodic_starts, default=-1)
    model["n_layers"] = min(model["n_layers"], max(2, model["first_k_dense"] + 2, deepest_override + 1))
    model.update(vocab_size=TINY_VOCAB, d_model=TINY_D_MODEL, max_seq_len=TINY_SEQ)
    _shrink(model)
    data["data"].update(seq_len=min(data["data"]["seq_len"], TINY_SEQ), tokenizer_sample_chars=200_000)
    data["train"].update(steps=2, micro_batch_size=2, grad_accum=1, warmup_steps=1, eval_every=1, ckpt_every=1)
    data["eval"].update(val_blocks=4, hellaswag_limit=min(data["eval"]["hellaswag_limit"], 8))
    return validate(RunSpec, data)


def _shrink(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _shrink(item)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("kind")
    if kind == "mha":
        heads, kv = node["n_heads"], node["n_kv_heads"]
        node["n_heads"] = TINY_HEADS
        node["head_dim"] = None if node["head_dim"] is None else TINY_D_MODEL // TINY_HEADS
        if kv is not None and kv != heads:
            node["n_kv_heads"] = 1 if kv == 1 else TINY_HEADS // 2  # keep MQA as MQA and GQA as GQA
        elif kv is not None:
            node["n_kv_heads"] = TINY_HEADS
    elif kind == "mla":
        node.update(n_heads=TINY_HEADS, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
        if node["q_lora_rank"] is not None:
            node["q_lora_rank"] = 32
    elif kind == "mlp":
        node["d_hidden"] = TINY_HIDDEN
    elif kind == "moe":
        router = node["router"]
        groups, chosen = router.get("n_groups", 1), router.get("topk_groups", 1)
        # A multiple of n_groups whose topk_groups chosen groups hold more than top_k experts, so the
        # router still picks; never more than the full size, which already satisfies every rule.
        per_group = max(math.ceil(TINY_MAX_EXPERTS / groups), TINY_EXPERTS_PER_GROUP,
                        math.ceil((node["top_k"] + 1) / chosen))
        node["n_experts"] = min(node["n_experts"], groups * per_group)
        node["d_expert"] = TINY_EXPERT_HIDDEN
    if "original_max_seq_len" in node:
        node["original_max_seq_len"] = min(node["original_max_seq_len"], TINY_ORIGINAL_CONTEXT)
    for value in node.values():
        _shrink(value)
