"""The fused LM-head cross-entropy against F.cross_entropy on materialised logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from zoo import presets
from zoo.builders import build
import zoo.blocks.lm_loss as lm_loss
from zoo.blocks.lm_loss import linear_cross_entropy


@pytest.mark.parametrize("chunk_elements", [2**20, 300])  # one chunk; many chunks with a ragged last one
def test_equals_cross_entropy_with_ignored_rows(chunk_elements, monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", {"cpu": chunk_elements})
    torch.manual_seed(0)
    h = torch.randn(53, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (53,))
    labels[::5] = -100
    ref = F.cross_entropy(F.linear(h, w), labels, ignore_index=-100)
    ref_grads = torch.autograd.grad(2.5 * ref, (h, w))
    out = linear_cross_entropy(h, w, labels)
    grads = torch.autograd.grad(2.5 * out, (h, w))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_matmuls_keep_an_fp32_weight_gradient():
    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    labels = torch.randint(0, 32, (64,))
    out = linear_cross_entropy(h, w, labels, dtype=torch.bfloat16)
    out.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    ref = F.cross_entropy(F.linear(h.detach(), w.detach()), labels)
    assert abs(out.item() - ref.item()) < 2e-2 * ref.item()


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_evaluation_computes_only_the_loss(no_grad, monkeypatch):
    """Under no_grad a Function still sees needs_input_grad True for inputs that require grad; it must
    skip the two gradient matmuls per chunk (3x the FLOPs of the logits alone) all the same."""
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", {"cpu": 300})  # several chunks
    N, D, V = 53, 16, 40
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    with FlopCounterMode(display=False) as training_flops:
        trained = linear_cross_entropy(h, w, labels)
    with no_grad(), FlopCounterMode(display=False) as eval_flops:
        evaluated = linear_cross_entropy(h, w, labels)
    assert torch.equal(evaluated, trained.detach()) and not evaluated.requires_grad
    logits_flops = 2 * N * D * V
    assert training_flops.get_total_flops() == 3 * logits_flops  # the count sees the gradient matmuls
    assert eval_flops.get_total_flops() == logits_flops


def test_all_rows_ignored_gives_nan_like_cross_entropy():
    out = linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.full((4,), -100))
    assert torch.isnan(out) and torch.isnan(F.cross_entropy(torch.randn(4, 10), torch.full((4,), -100)))


@pytest.mark.parametrize("preset", ["deepseek_glm4", "baseline"])
def test_model_loss_without_logits_equals_the_logits_path(preset):
    """DecoderLM(return_logits=False) gives the loss and every gradient of the default path."""
    torch.manual_seed(0)
    model = build(presets.get(preset, tiny=True))
    ids = torch.randint(0, model.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, 5] = -100
    full = model(ids, labels=labels)
    full_grads = torch.autograd.grad(full.loss, list(model.parameters()))
    fused = model(ids, labels=labels, return_logits=False)
    fused_grads = torch.autograd.grad(fused.loss, list(model.parameters()))
    assert fused.logits is None and full.logits is not None
    torch.testing.assert_close(fused.loss, full.loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
