"""bf16 autocast training tracks fp32 training: the optimized CPU bf16 paths (grouped-GEMM dispatch,
matmul attention, fused LM-head loss) must not cost accuracy."""

import argparse
from pathlib import Path

import torch

from zoo import presets
from zoo.builders import build

STEPS = 40


def _batches(seq: int, batch: int, steps: int) -> list[torch.Tensor]:
    """Byte tokens of a real text (Python's argparse source), consecutive windows."""
    data = torch.tensor(list(Path(argparse.__file__).read_bytes()), dtype=torch.long)
    size = seq * batch
    return [data[i * size:(i + 1) * size].view(batch, seq) for i in range(steps)]


def _train(precision: str, seed: int) -> list[float]:
    torch.manual_seed(seed)
    spec = presets.get("perf_w1", tiny=True)
    model = build(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for ids in _batches(spec.data.seq_len, 4, STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(ids, labels=ids, return_logits=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.ce_loss.item())
    return losses


def test_bf16_training_reaches_the_fp32_loss_within_seed_noise():
    fp32_a, fp32_b, bf16 = _train("fp32", 0), _train("fp32", 1), _train("bf16", 0)

    def tail(losses):  # mean of the last quarter: less noisy than one step
        return sum(losses[-STEPS // 4:]) / (STEPS // 4)

    assert tail(fp32_a) < 0.7 * fp32_a[0], "the model did not learn; the comparison would be empty"
    seed_noise = abs(tail(fp32_a) - tail(fp32_b))
    assert abs(tail(bf16) - tail(fp32_a)) <= max(2 * seed_noise, 0.02 * tail(fp32_a)), (
        f"bf16 {tail(bf16):.4f} vs fp32 {tail(fp32_a):.4f} (seed noise {seed_noise:.4f})")
