"""The device-specific fast paths against device-free fp32 references: MoE dispatch (grouped GEMM and
the multiply-sum combine on CUDA, padded or grouped on CPU), the chunked LM-head loss (large chunks
on CUDA), causal attention (SDPA on CUDA, matmuls for short bf16 sequences on CPU) and a compiled
bf16 train step. Each runs on the CPU here and, where one is present, on a CUDA GPU
(`benchmarks/gpu_check.sh` runs this file on a GPU machine)."""

import pytest
import torch
import torch.nn.functional as F

from zoo import presets
from zoo.blocks.moe import dropless_dispatch
from zoo.blocks.sdpa import causal_attention
from zoo.blocks.lm_loss import linear_cross_entropy
from zoo.builders import build

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_dispatch_tracks_the_fp32_loop(device):
    """Automatic dispatch under bf16 autocast, one expert left empty, against the fp32 per-expert
    loop on the CPU: outputs, the four gradients and the per-expert counts."""
    torch.manual_seed(0)
    T, D, F_hidden, E, K = 256, 64, 32, 8, 2
    x, weights = torch.randn(T, D), torch.rand(T, K)
    gate_up, down = torch.randn(E, 2 * F_hidden, D) * 0.2, torch.randn(E, D, F_hidden) * 0.2
    experts = torch.stack([torch.randperm(E - 1)[:K] for _ in range(T)])  # expert E-1 gets no token
    grad_y = torch.randn(T, D)

    def run(dev, impl, autocast):
        leaves = [t.to(dev).requires_grad_() for t in (x, weights, gate_up, down)]
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            y, counts = dropless_dispatch(leaves[0], leaves[1], experts.to(dev), *leaves[2:], impl=impl)
        grads = torch.autograd.grad(y, leaves, grad_y.to(dev, y.dtype))
        return y, grads, counts

    y32, grads32, counts32 = run("cpu", "loop", autocast=False)
    y, grads, counts = run(device, "auto", autocast=True)
    assert torch.equal(counts.cpu(), counts32) and counts32[-1] == 0
    assert rel(y, y32) < 2e-2
    for g, g32 in zip(grads, grads32):
        assert g.dtype == torch.float32 and rel(g, g32) < 3e-2


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_equals_cross_entropy(device):
    """The device's default chunking (one chunk here), fp32, ignored rows included."""
    torch.manual_seed(0)
    h, w = torch.randn(300, 32), torch.randn(50, 32)
    labels = torch.randint(0, 50, (300,))
    labels[::7] = -100
    ref_h, ref_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(ref_h, ref_w), labels, ignore_index=-100)
    ref.backward()
    dev_h, dev_w = h.to(device).requires_grad_(), w.to(device).requires_grad_()
    out = linear_cross_entropy(dev_h, dev_w, labels.to(device))
    out.backward()
    assert abs(out.item() - ref.item()) < 1e-5
    assert rel(dev_h.grad, ref_h.grad) < 1e-5 and rel(dev_w.grad, ref_w.grad) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads,qk_dim,v_dim", [(4, 4, 96, 64), (8, 2, 64, 64)], ids=["mla_qk96_v64", "gqa"])
def test_bf16_causal_attention_equals_fp32_softmax(device, heads, kv_heads, qk_dim, v_dim):
    """bf16 causal attention (and its gradients) on the device against softmax(q k^T) v in fp32."""
    torch.manual_seed(0)
    B, T = 2, 64
    q, k, v = torch.randn(B, heads, T, qk_dim), torch.randn(B, kv_heads, T, qk_dim), torch.randn(B, kv_heads, T, v_dim)
    scale = qk_dim**-0.5
    grad_out = torch.randn(B, heads, T, v_dim)

    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    r = heads // kv_heads
    k_full, v_full = ref_leaves[1].repeat_interleave(r, 1), ref_leaves[2].repeat_interleave(r, 1)
    scores = ref_leaves[0] @ k_full.transpose(-1, -2) * scale
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = scores.softmax(-1) @ v_full
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)

    leaves = [t.to(device, torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = causal_attention(*leaves, scale=scale)
    grads = torch.autograd.grad(out, leaves, grad_out.to(device, torch.bfloat16))
    assert out.shape == ref.shape
    assert rel(out, ref) < 2e-2
    for g, g_ref in zip(grads, ref_grads):
        assert rel(g, g_ref) < 3e-2


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_bf16_train_loss_tracks_fp32(device):
    """A tiny perf_0p5b (MLA, 64-expert group-limited MoE) on the device: the bf16-autocast loss,
    eager and compiled, within bf16 noise of the fp32 loss; compiled gradients close to eager ones."""
    torch.manual_seed(0)
    model = build(presets.get("perf_0p5b", tiny=True)).to(device)
    ids = torch.randint(0, model.vocab_size, (2, 32), device=device)
    params = list(model.parameters())

    def loss_and_grads(m, bf16):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = m(ids, labels=ids, return_logits=False).loss
        return loss.detach().float(), torch.autograd.grad(loss, params)

    loss32, grads32 = loss_and_grads(model, False)
    eager16, eager_grads16 = loss_and_grads(model, True)
    compiled16, compiled_grads16 = loss_and_grads(torch.compile(model), True)
    assert abs(eager16 - loss32) < 2e-2 * loss32 and abs(compiled16 - loss32) < 2e-2 * loss32
    for c, e, ref in zip(compiled_grads16, eager_grads16, grads32):
        assert rel(c, ref) <= max(2 * rel(e, ref), 3e-2)
