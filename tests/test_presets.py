"""Registry-driven: every preset, at toy size, builds, trains a step's worth, and is described truthfully.

Adding a preset adds it to every test here; nobody writes a new test.
"""

import pytest
import torch

import zoo
from zoo import presets
from zoo.describe import describe
from zoo.overrides import with_changes
from zoo.presets.tiny import tiny
from zoo.specs import (
    LayerOverride,
    MLPSpec,
    ModelSpec,
    MoESpec,
    RunSpec,
    SigmoidGroupTopKRouterSpec,
    SoftmaxTopKRouterSpec,
)

PRESETS = presets.names()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_forward_backward_every_param_gets_gradient(name):
    spec = presets.get(name, tiny=True)
    model = zoo.build(spec)
    vocab = spec.model.vocab_size
    # 4 x 64 tokens: enough assignments that every expert of a tiny MoE is routed to at least once.
    ids = torch.randint(0, vocab, (4, spec.model.max_seq_len))
    out = model(ids, labels=ids)
    assert out.logits.shape == (4, spec.model.max_seq_len, vocab)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    # Cross-entropy of a fresh model is near ln(V), the MTP modules' too; the aux losses are small positive
    # extras; the MTP loss enters with its weight.
    ln_v = torch.log(torch.tensor(float(vocab))).item()
    assert abs(out.ce_loss.item() - ln_v) < 0.5
    mtp = spec.model.mtp
    assert (out.mtp_losses is None) == (mtp.depth == 0)
    mtp_loss = 0.0 if out.mtp_losses is None else mtp.loss_weight * out.mtp_losses.mean().item()
    if mtp.depth:
        assert out.mtp_losses.shape == (mtp.depth,) and (out.mtp_losses - ln_v).abs().max() < 0.5
    assert out.loss.item() == pytest.approx(out.ce_loss.item() + out.aux_loss.item() + mtp_loss, rel=1e-6)
    out.loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_spec_json_round_trip(name):
    for spec in (presets.get(name), presets.get(name, tiny=True)):
        assert RunSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize("name", PRESETS)
def test_describe_counts_match_the_built_module(name):
    spec = presets.get(name)
    info = describe(spec)
    model = zoo.build(spec.model)
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert sum(b["params"] for b in info["blocks"]) == info["total_params"]
    # Active = total minus the routed experts a token skips, counted here independently.
    skipped = 0
    for block in model.blocks():
        if isinstance(block.ffn, zoo.blocks.moe.MoE):
            experts = sum(p.numel() for p in block.ffn.experts.parameters())
            k, e = block.ffn.router.top_k, block.ffn.router.n_experts
            skipped += experts * (e - k) // e
    assert info["active_params"] == info["total_params"] - skipped
    # The MTP modules' share is exactly what the model without them lacks.
    mtp = info["mtp"]
    assert mtp["depth"] == spec.model.mtp.depth and (mtp["params"] > 0) == (mtp["depth"] > 0)
    main = describe(with_changes(spec, {"model.mtp.depth": 0}))
    for key, mtp_key in (("total_params", "params"), ("active_params", "active_params"),
                         ("flops_per_token", "flops_per_token")):
        assert info[key] - mtp[mtp_key] == main[key], key
    assert info["kv_cache_bytes_per_token"] == main["kv_cache_bytes_per_token"]


def test_every_preset_has_a_description():
    for name in PRESETS:
        assert len(presets.describe_line(name)) > 20


def test_required_presets_exist():
    required = {"baseline", "dense", "deepseek", "glm4", "deepseek_glm4", "exp1_baseline", "exp1_mlp",
                "exp1_attention_mlp", "exp1_moe", "exp1_attention_moe"}
    assert required <= set(PRESETS)


def test_preset_architectures_are_what_they_say():
    base = presets.get("baseline").model
    assert (base.d_model, base.n_layers, base.attention.n_heads, base.max_seq_len) == (384, 6, 8, 512)
    assert (base.ffn.n_experts, base.ffn.top_k, base.ffn.d_expert) == (8, 2, 1536)
    assert base.ffn.router.kind == "softmax_topk" and base.ffn.router.balance_loss_weight == 0.01
    assert base.tie_embeddings
    assert presets.get("dense").model.ffn.kind == "mlp"
    ds = presets.get("deepseek").model
    assert ds.attention.kind == "mla" and ds.ffn.router.kind == "sigmoid_group_topk"
    assert ds.ffn.router.n_groups > 1 and ds.ffn.n_shared_experts == 1 and ds.first_k_dense == 1
    glm = presets.get("glm4").model
    assert glm.attention.kind == "mha" and glm.attention.kv_heads() < glm.attention.n_heads
    assert glm.attention.rotary_fraction == 0.5 and glm.attention.qk_norm and glm.attention.qkv_bias
    dg = presets.get("deepseek_glm4").model
    assert dg.attention == ds.attention and dg.ffn == glm.ffn


def test_tiny_keeps_the_architecture():
    full, small = presets.get("glm4").model, presets.get("glm4", tiny=True).model
    assert small.d_model < full.d_model and small.n_layers <= full.n_layers
    assert small.attention.kind == full.attention.kind
    assert 1 < small.attention.kv_heads() < small.attention.n_heads  # GQA stays GQA
    assert small.first_k_dense == full.first_k_dense
    assert small.ffn.router == full.ffn.router


def test_tiny_keeps_routing_valid_whatever_top_k_and_grouping():
    """tiny() capped n_experts at max(8, 2 x n_groups) whatever top_k: a 64-expert top-10 preset failed."""
    flat = MoESpec(n_experts=64, top_k=10, router=SoftmaxTopKRouterSpec(norm_topk_prob=True))
    grouped = MoESpec(n_experts=64, top_k=10, router=SigmoidGroupTopKRouterSpec(n_groups=8, topk_groups=2))
    for ffn in (flat, grouped):
        small = tiny(RunSpec(model=ModelSpec(ffn=ffn))).model.ffn
        groups, chosen = getattr(ffn.router, "n_groups", 1), getattr(ffn.router, "topk_groups", 1)
        assert small.top_k == 10 and small.router == ffn.router and small.n_experts < ffn.n_experts
        assert small.n_experts % groups == 0 and chosen * small.n_experts // groups > small.top_k  # still a choice
    few = tiny(RunSpec(model=ModelSpec(ffn=MoESpec(n_experts=4, top_k=4)))).model.ffn
    assert few.n_experts == 4  # never more experts than the full size


def test_tiny_keeps_the_first_layer_of_each_periodic_override():
    """tiny() keeps enough layers for a periodic override (every=3 from offset=3) to select one."""
    spec = RunSpec(model=ModelSpec(n_layers=12, ffn=MoESpec(), overrides=[
        LayerOverride(every=3, offset=3, ffn=MLPSpec(d_hidden=256))]))
    small = tiny(spec).model
    assert small.n_layers < spec.model.n_layers
    assert [layer.ffn.kind for layer in small.layer_specs()][3] == "mlp"


def _count_forward_flops(forward):
    """(FLOPs FlopCounterMode counts in `forward()` but for attention's; the (q, k, v) shapes of
    every attention call). Attention runs with the counter switched off: on CPU, SDPA's flash kernel is
    not in the counter's registry (0 FLOPs), while its math fallback (taken when q/k and v head dims
    differ) is counted as bmm over the full, unmasked T x T square, so the kernel chosen would decide."""
    from torch.utils._python_dispatch import _disable_current_modes
    from torch.utils.flop_counter import FlopCounterMode

    from zoo.blocks import mha, mla, sdpa

    shapes = []

    def uncounted_attention(q, k, v, **kwargs):
        shapes.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        with _disable_current_modes():
            return sdpa.causal_attention(q, k, v, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mha, "causal_attention", uncounted_attention)
        patch.setattr(mla, "causal_attention", uncounted_attention)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            forward()
    return counter.get_total_flops(), shapes


@pytest.mark.parametrize("name", PRESETS)
def test_describe_flops_per_token_match_a_flop_counter(name):
    """describe's forward FLOPs per token, exactly (integers on both sides, no tolerance):
    - every matmul but attention's, as torch's FlopCounterMode counts them (projections, router, routed
      and shared experts, LM head). fp32 on CPU runs the experts as a per-expert loop over the rows
      routed to each (no padding), so the count is exactly top_k experts' worth per token;
    - less the MoE combine, which the counter sees and describe leaves out with norms and softmax (no
      weight matrix): on CPU the weighted sum of a token's K expert outputs is a (1, K) x (K, D) bmm,
      2 * K * D FLOPs per token;
    - plus attention by hand, from the shapes each attention call got: under the causal mask query t
      scores t + 1 keys (2 * Dk FLOPs each) and sums t + 1 values (2 * Dv each), so T queries take
      2 * H * (Dk + Dv) * T (T + 1) / 2 FLOPs, H * (Dk + Dv) * (T + 1) per token.
    MTP modules (counted apart by describe) the same way: each module and its head run on T positions."""
    spec = presets.get(name, tiny=True)
    T, B = spec.model.max_seq_len, 2
    model = zoo.build(spec).eval()
    ids = torch.randint(0, spec.model.vocab_size, (B, T))

    def mtp_forward():
        h = torch.randn(B, T, spec.model.d_model)
        for k in range(1, len(model.mtp) + 1):
            h = model.mtp_step(k, h, ids)
            model.mtp_head(k)(h)

    info = describe(spec, seq_len=T)
    main_flops, mtp_flops = info["flops_per_token"] - info["mtp"]["flops_per_token"], info["mtp"]["flops_per_token"]
    for forward, blocks, expected in ((lambda: model(ids), model.layers, main_flops),
                                      (mtp_forward, [m.block for m in model.mtp], mtp_flops)):
        counted, shapes = _count_forward_flops(forward)
        assert len(shapes) == len(blocks), "an attention call per block"
        attention_per_token = 0
        for (qB, H, qT, Dk), (_, _, S, kDk), (_, _, vS, Dv) in shapes:
            assert (qB, qT, S, vS, kDk) == (B, T, T, T, Dk)
            attention_per_token += H * (Dk + Dv) * (T + 1)
        combine_per_token = sum(2 * block.ffn.router.top_k * spec.model.d_model for block in blocks
                                if isinstance(block.ffn, zoo.blocks.moe.MoE))
        assert counted % (B * T) == 0
        assert expected == counted // (B * T) - combine_per_token + attention_per_token


def test_describe_flop_check_covers_mha_gqa_and_mla():
    kinds = {b["kind"] for name in PRESETS for b in describe(presets.get(name, tiny=True))["blocks"]}
    assert {"mha", "gqa", "mla", "moe", "mlp"} <= kinds


def test_describe_counts_only_the_keys_a_sliding_window_leaves():
    """Query t sees min(t + 1, W) keys instead of t + 1: each attention's FLOPs per token drop by
    2 H (Dk + Dv) (sum_t (t + 1) - sum_t min(t + 1, W)) / T; the matrices are unchanged."""
    spec = presets.get("mixtral", tiny=True)
    T, W = spec.model.max_seq_len, 5
    windowed = with_changes(spec, {"model.attention.sliding_window": W})
    attention = zoo.build(spec).layers[0].attention
    per_key = 2 * attention.n_heads * 2 * attention.head_dim
    full_keys, window_keys = sum(t + 1 for t in range(T)), sum(min(t + 1, W) for t in range(T))
    blocks = list(zip(describe(spec, seq_len=T)["blocks"], describe(windowed, seq_len=T)["blocks"]))
    assert sum(full["name"].endswith("attention") for full, _ in blocks) == spec.model.n_layers
    for full, part in blocks:
        if full["name"].endswith("attention"):
            assert full["flops_per_token"] - part["flops_per_token"] == (
                round(per_key * full_keys / T) - round(per_key * window_keys / T))
        else:
            assert full == part
