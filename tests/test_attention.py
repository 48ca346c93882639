"""Attention: causality for every kind, and equivalences that pin MHA/GQA/MQA and MLA down."""

import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.blocks.mha import MultiHeadAttention
from zoo.blocks.mla import MultiHeadLatentAttention
from zoo.blocks.rope import RotaryEmbedding
from zoo.specs import (
    DynamicNTKScaling,
    LinearScaling,
    MHASpec,
    MLASpec,
    MLPSpec,
    ModelSpec,
    RopeSpec,
    YarnScaling,
)

D = 64
YARN = RopeSpec(scaling=YarnScaling(factor=4.0, original_max_seq_len=16, mscale=1.0, mscale_all_dim=1.0))
ATTENTION_KINDS = {
    "mha": MHASpec(n_heads=4),
    "gqa": MHASpec(n_heads=4, n_kv_heads=2),
    "mqa": MHASpec(n_heads=4, n_kv_heads=1),
    "gqa_glm4": MHASpec(n_heads=4, n_kv_heads=2, qk_norm="head", qkv_bias=True, rotary_fraction=0.5),
    "gqa_projection_qk_norm_biases": MHASpec(n_heads=4, n_kv_heads=2, qk_norm="projection", qkv_bias=True,
                                             o_bias=True),  # as in olmoe
    "gqa_head_qk_norm_sliding_window": MHASpec(n_heads=4, n_kv_heads=2, qk_norm="head", sliding_window=5),
    "mha_linear_rope": MHASpec(n_heads=4, rope=RopeSpec(scaling=LinearScaling(factor=2.0))),
    "mha_dynamic_ntk": MHASpec(n_heads=4, rope=RopeSpec(scaling=DynamicNTKScaling(factor=2.0, original_max_seq_len=16))),
    "mha_yarn": MHASpec(n_heads=4, rope=YARN),
    "mla": MLASpec(n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
    "mla_q_lora": MLASpec(n_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
    "mla_interleaved_yarn": MLASpec(n_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                    v_head_dim=12, rope_layout="interleaved", rope=YARN),
}


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_causality(kind):
    spec = ModelSpec(vocab_size=97, d_model=D, n_layers=2, max_seq_len=48,
                     attention=ATTENTION_KINDS[kind], ffn=MLPSpec(d_hidden=96))
    model = zoo.build(spec).eval()
    T = 48
    ids = torch.randint(0, 97, (2, T))
    with torch.no_grad():
        base = model(ids).logits
        for t in (1, 17, 40):
            changed = ids.clone()
            changed[:, t:] = torch.randint(0, 97, (2, T - t))
            logits = model(changed).logits
            assert (logits[:, :t] - base[:, :t]).abs().max() < 1e-6, f"{kind}: position < {t} saw the future"
            # The check can fail: some later logit must move.
            assert (logits[:, t:] - base[:, t:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_positions_must_be_one_per_step(kind):
    """(B, T) positions are refused: when B equals the head count their (B, T, R/2) cos/sin would
    broadcast against (B, H, T, R/2) and rotate head h of every row by row h's positions."""
    spec = ModelSpec(vocab_size=97, d_model=D, n_layers=1, max_seq_len=16,
                     attention=ATTENTION_KINDS[kind], ffn=MLPSpec(d_hidden=96))
    model = zoo.build(spec).eval()
    B, T = 4, 8  # B = n_heads
    ids = torch.randint(0, 97, (B, T))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, positions=torch.arange(T)).logits, model(ids).logits, rtol=0, atol=0)
        per_row_BT = torch.arange(T).expand(B, T)
        with pytest.raises(ValueError, match=r"positions has shape \(4, 8\), expected \(8,\)"):
            model(ids, positions=per_row_BT)
        with pytest.raises(ValueError, match=r"positions has shape \(4, 8\), expected \(8,\)"):
            model.layers[0].attention(model.embed(ids), per_row_BT)
        with pytest.raises(ValueError, match=r"positions has shape \(5,\), expected \(8,\)"):
            model(ids, positions=torch.arange(5))


def _rope(dim):
    return RotaryEmbedding(dim=dim)


def _reference_attention(x, wq, wk, wv, wo, n_heads, n_kv, head_dim, rope):
    """Textbook attention with an explicit mask and repeated K/V heads, written independently."""
    B, T, _ = x.shape
    q = (x @ wq.T).view(B, T, n_heads, head_dim).transpose(1, 2)
    k = (x @ wk.T).view(B, T, n_kv, head_dim).transpose(1, 2)
    v = (x @ wv.T).view(B, T, n_kv, head_dim).transpose(1, 2)
    cos, sin = rope(torch.arange(T))
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)

    def rot(t):
        t1, t2 = t[..., : head_dim // 2], t[..., head_dim // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    q, k = rot(q), rot(k)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, n_heads * head_dim) @ wo.T


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_mha_gqa_mqa_equal_reference_attention(n_kv):
    attn = MultiHeadAttention(d_model=D, n_heads=4, n_kv_heads=n_kv, head_dim=16, rope=_rope(16))
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 24, D)
    ref = _reference_attention(x, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
                               4, n_kv, 16, attn.rope)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = MultiHeadAttention(d_model=D, n_heads=4, n_kv_heads=2, head_dim=16, rope=_rope(16))
    mha = MultiHeadAttention(d_model=D, n_heads=4, n_kv_heads=4, head_dim=16, rope=_rope(16))
    for p in gqa.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, 16, D)  # (G, Dh, D)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(4 * 16, D))
    x = torch.randn(2, 20, D)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_mla_equals_mha_on_expanded_weights():
    """MLA is MHA whose K/V come from the latent: recompute it by hand from its own weights."""
    H, N, R, V, C = 4, 8, 8, 12, 16
    mla = MultiHeadLatentAttention(d_model=D, n_heads=H, kv_lora_rank=C, qk_nope_head_dim=N, qk_rope_head_dim=R,
                                   v_head_dim=V, rope=_rope(R))
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 20, D)
    B, T, _ = x.shape
    q = (x @ mla.q_proj.weight.T).view(B, T, H, N + R).transpose(1, 2)
    kv_a = x @ mla.kv_a_proj.weight.T
    latent, k_rope = kv_a[..., :C], kv_a[..., C:]
    latent = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + 1e-6) * mla.kv_a_norm.weight
    kv = (latent @ mla.kv_b_proj.weight.T).view(B, T, H, N + V).transpose(1, 2)
    cos, sin = mla.rope(torch.arange(T))

    def rot(t):  # half layout
        t1, t2 = t[..., : R // 2], t[..., R // 2:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

    q = torch.cat([q[..., :N], rot(q[..., N:])], -1)
    k = torch.cat([kv[..., :N], rot(k_rope).unsqueeze(1).expand(B, H, T, R)], -1)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    y = ((q @ k.transpose(-1, -2)) / math.sqrt(N + R)).masked_fill(mask, float("-inf")).softmax(-1) @ kv[..., N:]
    ref = y.transpose(1, 2).reshape(B, T, H * V) @ mla.o_proj.weight.T
    torch.testing.assert_close(mla(x), ref, atol=1e-5, rtol=1e-5)


def test_interleaved_layout_equals_half_layout_on_permuted_weights():
    """Interleaved RoPE is half-layout RoPE on a fixed permutation of the rotary dims."""
    kw = dict(d_model=D, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)
    inter = MultiHeadLatentAttention(**kw, rope=_rope(8), rope_layout="interleaved")
    half = MultiHeadLatentAttention(**kw, rope=_rope(8), rope_layout="half")
    for p in inter.parameters():
        torch.nn.init.normal_(p, std=0.2)
    half.load_state_dict(inter.state_dict())
    perm = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])  # interleaved pairs -> halves
    with torch.no_grad():
        q = half.q_proj.weight.view(4, 16, D)
        q[:, 8:] = q[:, 8:][:, perm]
        kv_a = half.kv_a_proj.weight
        kv_a[16:] = kv_a[16:][perm]
    x = torch.randn(2, 12, D)
    torch.testing.assert_close(inter(x), half(x), atol=1e-5, rtol=1e-5)
    assert (inter(x) - MultiHeadLatentAttention(**kw, rope=_rope(8)).eval()(x)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_yarn_softmax_scale_correction_applies(kind, monkeypatch):
    """YaRN with mscale_all_dim scales the softmax by d**-0.5 * mscale(factor, mscale_all_dim)**2 (DeepSeek's
    correction; d the query/key head dim), for MHA as for MLA: the block's output equals the same block
    with its attention replaced by a reference softmax(q k^T * that scale + causal mask) v. Here
    mscale = 0.1 * ln 4 + 1 = 1.139: a plain d**-0.5 scores 23% colder and moves the output by 0.1-0.3
    here; in fp32 the two sides differ by summation order only (~1e-7)."""
    from zoo.blocks import mha, mla

    factor, mscale_all_dim = 4.0, 1.0
    rope = RotaryEmbedding(dim=8, scaling="yarn", factor=factor, original_max_seq_len=16, mscale=1.0,
                           mscale_all_dim=mscale_all_dim)
    if kind == "mha":
        block = MultiHeadAttention(d_model=D, n_heads=4, n_kv_heads=2, head_dim=16, rope=rope)
        module, head_dim = mha, 16
    else:
        block = MultiHeadLatentAttention(d_model=D, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                                         qk_rope_head_dim=8, v_head_dim=12, rope=rope)
        module, head_dim = mla, 8 + 8  # scores use the nope and rope dims
    mscale = 0.1 * mscale_all_dim * math.log(factor) + 1
    x = 3 * torch.randn(2, 12, D)  # scores well away from 0, where a wrong scale shows
    y = block(x)

    def reference_with(scale):
        def attention(q, k, v, **_):  # ignores the block's scale
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # GQA: G -> H heads
            T = q.shape[2]
            scores = (q @ k.transpose(-2, -1) * scale).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            return scores.softmax(-1) @ v  # (B, H, T, Dv)
        return attention

    monkeypatch.setattr(module, "causal_attention", reference_with(head_dim**-0.5 * mscale**2))
    torch.testing.assert_close(y, block(x), rtol=1e-5, atol=1e-6)
    # The same reference with d**-0.5 alone lands far off: the comparison above can fail.
    monkeypatch.setattr(module, "causal_attention", reference_with(head_dim**-0.5))
    assert (y - block(x)).abs().max() > 1e-3


@pytest.mark.parametrize("query_block", [128, 3], ids=["one-block", "blocks-of-3"])
@pytest.mark.parametrize("n_heads,n_kv_heads,n_past", [(4, 4, 0), (4, 2, 0), (4, 1, 3), (4, 2, 5)])
def test_cpu_bf16_matmul_attention_equals_sdpa(n_heads, n_kv_heads, n_past, query_block, monkeypatch):
    """The CPU bf16 path (baddbmm-softmax-bmm) against fp32 SDPA with the same causal mask, for MHA,
    GQA, MQA and queries after cached positions, in one query block and in blocks of 3 (7 queries:
    3 + 3 + 1, each against the keys up to its last query); gradients included."""
    import zoo.blocks.sdpa as sdpa_mod
    from zoo.blocks.kv_cache import causal_sdpa_mask
    from zoo.blocks.sdpa import causal_attention

    monkeypatch.setattr(sdpa_mod, "QUERY_BLOCK", query_block)

    B, T, Dk, Dv = 2, 7, 16, 8
    S = n_past + T
    q = torch.randn(B, n_heads, T, Dk)
    k, v = torch.randn(B, n_kv_heads, S, Dk), torch.randn(B, n_kv_heads, S, Dv)
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    y = causal_attention(*leaves, scale=0.3, n_past=n_past)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y_ref = F.scaled_dot_product_attention(*ref_leaves, scale=0.3, enable_gqa=n_kv_heads != n_heads,
                                           **causal_sdpa_mask(T, n_past, q.device))
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, leaves, g.to(torch.bfloat16))
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, g)
    assert y.dtype == torch.bfloat16 and y.shape == (B, n_heads, T, Dv)
    torch.testing.assert_close(y.float(), y_ref, atol=3e-2, rtol=3e-2)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("query_block", [128, 4])
def test_matmul_attention_is_causal(query_block, monkeypatch):
    """Changing a later key or value leaves earlier outputs of the matmul path unchanged."""
    import zoo.blocks.sdpa as sdpa_mod
    from zoo.blocks.sdpa import causal_attention

    monkeypatch.setattr(sdpa_mod, "QUERY_BLOCK", query_block)
    q, k, v = (torch.randn(1, 2, 6, 8).to(torch.bfloat16) for _ in range(3))
    y = causal_attention(q, k, v, scale=0.35)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 4:], v2[:, :, 4:] = 5.0, -5.0
    y2 = causal_attention(q, k2, v2, scale=0.35)
    assert torch.equal(y[:, :, :4], y2[:, :, :4])
    assert not torch.equal(y[:, :, 4:], y2[:, :, 4:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["sdpa", "cpu-bf16-matmul"])
@pytest.mark.parametrize("n_past,n_new", [(0, 9), (5, 4), (8, 1)])
def test_sliding_window_attention_equals_a_banded_reference(dtype, n_past, n_new, monkeypatch):
    """The query at position p sees keys p - W + 1 .. p (transformers' sliding_window_overlay), on both
    paths, in query blocks of 4 and after cached positions."""
    import zoo.blocks.sdpa as sdpa_mod
    from zoo.blocks.sdpa import causal_attention

    monkeypatch.setattr(sdpa_mod, "QUERY_BLOCK", 4)
    W, B, H, G, Dk = 3, 2, 4, 2, 8
    S = n_past + n_new
    q, k, v = torch.randn(B, H, n_new, Dk), torch.randn(B, G, S, Dk), torch.randn(B, G, S, Dk)
    position_T, key_S = torch.arange(n_past, S)[:, None], torch.arange(S)
    visible_TS = (key_S <= position_T) & (key_S > position_T - W)
    k_H, v_H = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    reference = (q @ k_H.transpose(-2, -1) * 0.4).masked_fill(~visible_TS, float("-inf")).softmax(-1) @ v_H
    cast = [t.to(dtype) for t in (q, k, v)]
    y = causal_attention(*cast, scale=0.4, n_past=n_past, window=W)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), reference, atol=tol, rtol=tol)
    # Every case has a key out of the window: without it, the output moves.
    assert (causal_attention(*cast, scale=0.4, n_past=n_past).float() - reference).abs().max() > 0.1
