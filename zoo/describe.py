"""`zoo describe`: parameter counts, active parameters, FLOPs and KV-cache size, read off the built module.

The model is built on the meta device (no memory, no init cost), so every count is the module's
own, not a formula that could drift from it.

Conventions:
- active parameters per token: all parameters except the routed experts a token does not use
  (a MoE layer counts top_k / n_experts of its routed experts; router and shared experts in full).
- forward FLOPs per token: 2 per multiply-accumulate of every matrix a token passes through
  (projections, active experts, router, LM head; the embedding lookup is free), plus attention's
  scores and weighted sum over the (T + 1) / 2 keys a token sees on average under the causal mask
  at T = max_seq_len. Norms, activations and softmax are left out (well under 1%).
- KV-cache bytes per token in bf16: MHA/GQA cache K and V for their kv heads; MLA caches only the
  latent (kv_lora_rank) and the shared rotary key (qk_rope_head_dim).
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn

from zoo.blocks.mha import MultiHeadAttention
from zoo.blocks.mla import MultiHeadLatentAttention
from zoo.blocks.moe import MoE
from zoo.builders import build
from zoo.specs import ModelSpec, RunSpec

CACHE_BYTES = 2  # bf16


@dataclass
class BlockRow:
    name: str
    kind: str
    params: int
    active_params: int
    flops_per_token: int
    kv_cache_bytes_per_token: int = 0


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _matrix_numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.ndim >= 2)


def _attention_row(name: str, attn: nn.Module, seq_len: int) -> tuple[BlockRow, int]:
    """The attention's row and the KV-cache bytes an MHA with the same heads would need."""
    mean_keys = (seq_len + 1) / 2
    if isinstance(attn, MultiHeadLatentAttention):
        kind = "mla"
        per_key = 2 * attn.n_heads * (attn.qk_dim + attn.v_dim)
        cache = (attn.kv_lora_rank + attn.rope_dim) * CACHE_BYTES
        mha_cache = attn.n_heads * (attn.qk_dim + attn.v_dim) * CACHE_BYTES
    elif isinstance(attn, MultiHeadAttention):
        kind = "mha" if attn.n_kv_heads == attn.n_heads else ("mqa" if attn.n_kv_heads == 1 else "gqa")
        per_key = 2 * attn.n_heads * 2 * attn.head_dim
        cache = 2 * attn.n_kv_heads * attn.head_dim * CACHE_BYTES
        mha_cache = 2 * attn.n_heads * attn.head_dim * CACHE_BYTES
    else:
        raise TypeError(f"describe does not know attention {type(attn).__name__}")
    params = _numel(attn)
    flops = 2 * _matrix_numel(attn) + round(per_key * mean_keys)
    return BlockRow(name, kind, params, params, flops, cache), mha_cache


def _ffn_row(name: str, ffn: nn.Module) -> BlockRow:
    params = _numel(ffn)
    if not isinstance(ffn, MoE):
        return BlockRow(name, "mlp", params, params, 2 * _matrix_numel(ffn))
    experts = _numel(ffn.experts)
    top_k, n_experts = ffn.router.top_k, ffn.router.n_experts
    # Active routed params = experts * K / E exactly, since every expert has the same size.
    active_experts = experts // n_experts * top_k
    active = params - experts + active_experts
    flops = 2 * (_matrix_numel(ffn) - experts + active_experts)
    return BlockRow(name, "moe", params, active, flops)


def describe(spec: ModelSpec | RunSpec, seq_len: int | None = None) -> dict:
    """Counts for `spec`; attention FLOPs at `seq_len` (default: the model's max_seq_len)."""
    model_spec = spec.model if isinstance(spec, RunSpec) else spec
    seq_len = seq_len or model_spec.max_seq_len
    with torch.device("meta"):
        model = build(model_spec)
    rows = [BlockRow("embed", "embedding", _numel(model.embed), _numel(model.embed), 0)]
    norms = model.norm.weight.numel()
    mha_cache_total = 0
    for i, layer in enumerate(model.layers):
        row, mha_cache = _attention_row(f"layers.{i}.attention", layer.attention, seq_len)
        rows.append(row)
        rows.append(_ffn_row(f"layers.{i}.ffn", layer.ffn))
        mha_cache_total += mha_cache
        norms += _numel(layer.attention_norm) + _numel(layer.ffn_norm)
    rows.append(BlockRow("norms", "rmsnorm", norms, norms, 0))
    tied = model.lm_head.weight is model.embed.weight
    head_params = 0 if tied else model.lm_head.weight.numel()
    rows.append(BlockRow("lm_head" + (" (tied to embed)" if tied else ""), "linear", head_params, head_params,
                         2 * model.lm_head.weight.numel()))
    total = _numel(model)
    if sum(r.params for r in rows) != total:
        raise AssertionError("describe's per-block rows do not add up to the module's parameters")
    return {
        "total_params": total,
        "active_params": sum(r.active_params for r in rows),
        "seq_len": seq_len,
        "flops_per_token": sum(r.flops_per_token for r in rows),
        "kv_cache_bytes_per_token": sum(r.kv_cache_bytes_per_token for r in rows),
        "kv_cache_bytes_per_token_mha_equivalent": mha_cache_total,
        "blocks": [asdict(r) for r in rows],
    }


def format_description(info: dict) -> str:
    def human(n: float) -> str:
        for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(n) >= size:
                return f"{n / size:.2f}{unit}"
        return str(int(n))

    lines = [
        f"total parameters        {info['total_params']:>14,}  ({human(info['total_params'])})",
        f"active per token        {info['active_params']:>14,}  ({human(info['active_params'])})",
        f"forward FLOPs per token {info['flops_per_token']:>14,}  ({human(info['flops_per_token'])}, T={info['seq_len']})",
        f"KV cache per token      {info['kv_cache_bytes_per_token']:>14,} B  (bf16; an MHA with the same heads: "
        f"{info['kv_cache_bytes_per_token_mha_equivalent']:,} B)",
        "",
        f"{'block':<28}{'kind':<10}{'params':>12}{'active':>12}{'FLOPs/token':>14}{'KV B/token':>12}",
    ]
    for row in info["blocks"]:
        lines.append(
            f"{row['name']:<28}{row['kind']:<10}{row['params']:>12,}{row['active_params']:>12,}"
            f"{row['flops_per_token']:>14,}{row['kv_cache_bytes_per_token']:>12,}"
        )
    return "\n".join(lines)
