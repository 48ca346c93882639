"""The loop's validation: held-out loss, perplexity and accuracy, and HellaSwag at the training length."""

from __future__ import annotations

import math

import torch

from training.data import Tokenizer
from zoo.specs import RunSpec


@torch.no_grad()
def evaluate(engine, batches: list[torch.Tensor], device: torch.device) -> dict[str, float]:
    """Token-weighted validation cross-entropy, perplexity and next-token accuracy."""
    engine.module.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = batch.to(device)
        out = engine(batch, labels=batch)
        n = batch[:, 1:].numel()
        loss_sum += out.ce_loss.item() * n
        correct += (out.logits[:, :-1].argmax(-1) == batch[:, 1:]).sum().item()
        count += n
    engine.module.train()
    loss = loss_sum / count
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/acc": correct / count}


def hellaswag_scores(engine, tokenizer: Tokenizer, spec: RunSpec) -> dict[str, float]:
    """hellaswag_accuracy's {"acc", "acc_norm", "n"} at the length the model trains on."""
    from zoo.evaluation import hellaswag_accuracy

    return hellaswag_accuracy(engine.module, tokenizer, spec.eval.hellaswag_path, limit=spec.eval.hellaswag_limit,
                              batch_size=spec.train.micro_batch_size, max_length=spec.data.seq_len)
