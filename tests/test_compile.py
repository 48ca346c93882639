"""torch.compile (train.compile=true) traces the whole model in one graph and changes nothing."""

import pytest
import torch

from zoo import presets
from zoo.builders import build


@pytest.fixture
def dynamo():
    import torch._dynamo

    # the trainer turns dynamo off process-wide when train.compile is false; undo that here
    was = torch._dynamo.config.disable
    torch._dynamo.config.disable = False
    torch._dynamo.reset()
    try:
        yield torch._dynamo
    finally:
        torch._dynamo.reset()
        torch._dynamo.config.disable = was


@pytest.mark.parametrize("preset", ["perf_w1", "deepseek_glm4"])
def test_whole_model_is_one_graph_with_grouped_gemm_dispatch(preset, dynamo, monkeypatch):
    """No graph break with the grouped-GEMM dispatch (CUDA's, and CPU's with unbalanced experts): it
    keeps the expert counts on the device. CPU's padded dispatch breaks the graph once per MoE layer."""
    import zoo.blocks.moe as moe_mod

    monkeypatch.setattr(moe_mod, "_auto_impl", lambda x, counts, aligned=True: ("grouped_mm", None))
    model = build(presets.get(preset, tiny=True))
    ids = torch.randint(0, model.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = dynamo.explain(model)(ids, labels=ids, return_logits=False)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow
def test_compiled_loss_and_gradients_equal_eager(dynamo):
    """fp32 (loop dispatch): compiled equals eager. bf16 autocast (padded dispatch: graph breaks and
    a recompilation for a new largest expert count): compiled is no further from the fp32 gradients
    than eager bf16 is (inductor keeps some intermediates in fp32, so the two bf16 runs differ)."""
    torch.manual_seed(0)
    model = build(presets.get("perf_w1", tiny=True))
    compiled_model = torch.compile(model)
    params = list(model.parameters())

    def loss_and_grads(m, ids, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = m(ids, labels=ids, return_logits=False).loss
        return loss.detach(), torch.autograd.grad(loss, params)

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    for _ in range(2):  # the second batch has another largest expert count
        ids = torch.randint(0, model.vocab_size, (2, 16))
        loss32, grads32 = loss_and_grads(model, ids, False)
        compiled32, compiled_grads32 = loss_and_grads(compiled_model, ids, False)
        torch.testing.assert_close(compiled32, loss32, atol=1e-5, rtol=1e-5)
        assert max(rel(a, b) for a, b in zip(compiled_grads32, grads32)) < 1e-4
        eager16, eager_grads16 = loss_and_grads(model, ids, True)
        compiled16, compiled_grads16 = loss_and_grads(compiled_model, ids, True)
        assert abs(compiled16 - loss32) <= max(2 * abs(eager16 - loss32), 1e-2)
        for c, e, ref in zip(compiled_grads16, eager_grads16, grads32):
            assert rel(c, ref) <= max(2 * rel(e, ref), 2e-2)
