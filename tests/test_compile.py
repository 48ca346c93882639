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
def test_whole_model_is_one_graph_under_bf16_autocast(preset, dynamo):
    """No graph break: the grouped-GEMM dispatch keeps expert counts on the device (no host sync)."""
    model = build(presets.get(preset, tiny=True))
    ids = torch.randint(0, model.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = dynamo.explain(model)(ids, labels=ids, return_logits=False)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow
def test_compiled_loss_and_gradients_equal_eager(dynamo):
    torch.manual_seed(0)
    model = build(presets.get("perf_w1", tiny=True))
    ids = torch.randint(0, model.vocab_size, (2, 16))
    eager = model(ids, labels=ids, return_logits=False).loss
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model)(ids, labels=ids, return_logits=False).loss
    compiled_grads = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
