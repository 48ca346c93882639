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

- multi-token-prediction modules: counted in the totals (what training runs) and apart under "mtp"
  (what decoding without them drops): eh_proj, the block, the norms, and the head's FLOPs (its
  parameters only where it is the module's own), per token at the same T. The KV-cache total is the
  main model's; an MTP block caches only while drafting (its rows say how much).

Each layer's attention and FFN are counted by their kind's `describe` rule (zoo/kinds/).
"""

from dataclasses import asdict, dataclass

import torch

from zoo.builders import build
from zoo.kinds import kind_of
from zoo.kinds.registry import numel
from zoo.specs import ModelSpec, RunSpec


@dataclass
class BlockRow:
    name: str
    kind: str
    params: int
    active_params: int
    flops_per_token: int
    kv_cache_bytes_per_token: int = 0


def describe(spec: ModelSpec | RunSpec, seq_len: int | None = None) -> dict:
    """Counts for `spec`; attention FLOPs at `seq_len` (default: the model's max_seq_len)."""
    model_spec = spec.model if isinstance(spec, RunSpec) else spec
    seq_len = seq_len or model_spec.max_seq_len
    with torch.device("meta"):
        model = build(model_spec)
    rows = [BlockRow("embed", "embedding", numel(model.embed), numel(model.embed), 0)]
    norms = model.norm.weight.numel()
    mha_cache_total = 0
    for i, (layer, layer_spec) in enumerate(zip(model.layers, model_spec.layer_specs())):
        rows += _block_rows(f"layers.{i}", layer, layer_spec, seq_len)
        mha_cache_total += sum(_mha_equivalent(layer, layer_spec, seq_len))
        norms += numel(layer.attention_norm) + numel(layer.ffn_norm)
    rows.append(BlockRow("norms", "rmsnorm", norms, norms, 0))
    tied = model.lm_head.weight is model.embed.weight
    head_params = 0 if tied else model.lm_head.weight.numel()
    rows.append(BlockRow("lm_head" + (" (tied to embed)" if tied else ""), "linear", head_params, head_params,
                         2 * model.lm_head.weight.numel()))
    mtp_rows = [row for k, (module, layer_spec) in enumerate(zip(model.mtp, model_spec.mtp_layer_specs()), start=1)
                for row in _mtp_rows(model, k, module, layer_spec, seq_len)]
    main_rows, rows = rows, rows + mtp_rows
    total = numel(model)
    if sum(r.params for r in rows) != total:
        raise AssertionError("describe's per-block rows do not add up to the module's parameters")
    return {
        "total_params": total,
        "active_params": sum(r.active_params for r in rows),
        "seq_len": seq_len,
        "flops_per_token": sum(r.flops_per_token for r in rows),
        "kv_cache_bytes_per_token": sum(r.kv_cache_bytes_per_token for r in main_rows),
        "kv_cache_bytes_per_token_mha_equivalent": mha_cache_total,
        "mtp": {
            "depth": len(model.mtp),
            "params": sum(r.params for r in mtp_rows),
            "active_params": sum(r.active_params for r in mtp_rows),
            "flops_per_token": sum(r.flops_per_token for r in mtp_rows),
            "kv_cache_bytes_per_token": sum(r.kv_cache_bytes_per_token for r in mtp_rows),
        },
        "blocks": [asdict(r) for r in rows],
    }


def _block_rows(name: str, block, layer_spec, seq_len: int) -> list[BlockRow]:
    rows = []
    for slot in ("attention", "ffn"):
        spec = getattr(layer_spec, slot)
        count = kind_of(spec).describe(getattr(block, slot), seq_len)
        rows.append(BlockRow(f"{name}.{slot}", count.label, count.params, count.active_params,
                             count.flops_per_token, count.kv_cache_bytes_per_token))
    return rows


def _mha_equivalent(block, layer_spec, seq_len: int) -> list[int]:
    return [kind_of(getattr(layer_spec, slot)).describe(getattr(block, slot), seq_len).kv_cache_bytes_mha_equivalent
            for slot in ("attention", "ffn")]


def _mtp_rows(model, k: int, module, layer_spec, seq_len: int) -> list[BlockRow]:
    """MTP module k: eh_proj, its block, its norms (enorm, hnorm, the block's two, the head's), and its
    embedding and head (counted as parameters only where they are its own; the head's FLOPs always)."""
    name = f"mtp.{k}"
    eh = numel(module.eh_proj)
    norms = sum(numel(m) for m in (module.enorm, module.hnorm, module.norm, module.block.attention_norm,
                                   module.block.ffn_norm))
    rows = [BlockRow(f"{name}.eh_proj", "linear", eh, eh, 2 * eh),
            *_block_rows(name, module.block, layer_spec, seq_len),
            BlockRow(f"{name}.norms", "rmsnorm", norms, norms, 0)]
    if module.embed is not None:
        rows.append(BlockRow(f"{name}.embed", "embedding", numel(module.embed), numel(module.embed), 0))
    head = model.mtp_head(k)
    own = 0 if module.head is None else head.weight.numel()
    rows.append(BlockRow(f"{name}.head" + (" (shared)" if module.head is None else ""), "linear", own, own,
                         2 * head.weight.numel()))
    return rows


def format_description(info: dict) -> str:
    def human(n: float) -> str:
        for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(n) >= size:
                return f"{n / size:.2f}{unit}"
        return str(int(n))

    mtp = info["mtp"]

    def apart(total: str, key: str) -> str:  # the MTP modules' share of a total, when there are any
        if not mtp["depth"]:
            return ""
        return f"; main model {human(info[total] - mtp[key])} + MTP modules {human(mtp[key])}"

    lines = [
        f"total parameters        {info['total_params']:>14,}  ({human(info['total_params'])}"
        f"{apart('total_params', 'params')})",
        f"active per token        {info['active_params']:>14,}  ({human(info['active_params'])}"
        f"{apart('active_params', 'active_params')})",
        f"forward FLOPs per token {info['flops_per_token']:>14,}  ({human(info['flops_per_token'])}, "
        f"T={info['seq_len']}{apart('flops_per_token', 'flops_per_token')})",
        f"KV cache per token      {info['kv_cache_bytes_per_token']:>14,} B  (bf16; an MHA with the same heads: "
        f"{info['kv_cache_bytes_per_token_mha_equivalent']:,} B)",
        *([f"MTP modules             {mtp['depth']:>14}    (training pays for them; decoding drops them, or drafts "
           f"with them and caches {mtp['kv_cache_bytes_per_token']:,} B/token more)"] if mtp["depth"] else []),
        "",
        f"{'block':<28}{'kind':<10}{'params':>12}{'active':>12}{'FLOPs/token':>14}{'KV B/token':>12}",
    ]
    for row in info["blocks"]:
        lines.append(
            f"{row['name']:<28}{row['kind']:<10}{row['params']:>12,}{row['active_params']:>12,}"
            f"{row['flops_per_token']:>14,}{row['kv_cache_bytes_per_token']:>12,}"
        )
    return "\n".join(lines)
