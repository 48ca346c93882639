"""The loop's validation: held-out loss, perplexity and accuracy, and HellaSwag at the training length."""

from __future__ import annotations

import math

import torch

from training.data import Tokenizer
from zoo.specs import RunSpec


@torch.no_grad()
def evaluate(engine, batches: list[torch.Tensor], device: torch.device) -> dict[str, float]:
    """Token-weighted validation cross-entropy, perplexity and next-token accuracy; with MoE layers, each
    layer's MaxVio over the whole validation set (`max_vio_global`); with MTP modules, per depth k: its
    cross-entropy, its accuracy, and how often its guess is the main model's (`mtp_counts`)."""
    engine.module.eval()
    loss_sum, correct, count, mtp = 0.0, 0, 0, 0
    loads: dict[int, torch.Tensor] = {}
    for batch in batches:
        batch = batch.to(device)
        out = engine(batch, labels=batch)
        n = batch[:, 1:].numel()
        loss_sum += out.ce_loss.item() * n
        correct += (out.logits[:, :-1].argmax(-1) == batch[:, 1:]).sum().item()
        count += n
        mtp = mtp + mtp_counts(out, batch)
        for layer, stats in out.router_stats.items():
            loads[layer] = loads.get(layer, 0) + stats.load_E.double()
    engine.module.train()
    loss = loss_sum / count
    metrics = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/acc": correct / count}
    if loads:
        vio = {layer: max_vio(load) for layer, load in sorted(loads.items())}
        metrics.update({f"moe/layer_{layer}/max_vio_global": v for layer, v in vio.items()})
        metrics["val/max_vio_global"] = sum(vio.values()) / len(vio)
    for k, (loss_k, correct_k, matches_k, n_k) in enumerate(mtp.tolist() if torch.is_tensor(mtp) else [], start=1):
        metrics.update({f"val/mtp_loss_{k}": loss_k / n_k, f"val/mtp_acc_{k}": correct_k / n_k,
                        f"val/mtp_draft_acceptance_{k}": matches_k / n_k})
    return metrics


def max_vio(load_E: torch.Tensor) -> float:
    """(max load - mean load) / mean load: Wang et al. 2024's MaxVio, here of loads summed over a whole set
    (their MaxVio_global when the set is the validation set)."""
    mean = load_E.mean().clamp_min(1e-9)
    return ((load_E.max() - mean) / mean).item()


def mtp_counts(out, batch: torch.Tensor) -> torch.Tensor | int:
    """(depth, 4) float64 sums over one batch, per MTP depth k: cross-entropy x positions; positions where its
    guess of token t+1+k is right; positions where that guess is the main model's at position t+k, which
    predicts the same token (a greedy draft the main model would accept); positions. 0 without MTP."""
    rows = []
    for k, logits in enumerate(out.mtp_logits or [], start=1):
        guess = logits[:, :-1].argmax(-1)  # (B, T - k - 1)
        n = guess.numel()
        rows.append([out.mtp_losses[k - 1].item() * n, (guess == batch[:, k + 1:]).sum().item(),
                     (guess == out.logits[:, k:-1].argmax(-1)).sum().item(), n])
    return torch.tensor(rows, dtype=torch.float64) if rows else 0


def hellaswag_scores(engine, tokenizer: Tokenizer, spec: RunSpec) -> dict[str, float]:
    """hellaswag_accuracy's {"acc", "acc_norm", "n"} at the length the model trains on."""
    from zoo.evaluation import hellaswag_accuracy

    return hellaswag_accuracy(engine.module, tokenizer, spec.eval.hellaswag_path, limit=spec.eval.hellaswag_limit,
                              batch_size=spec.train.micro_batch_size, max_length=spec.data.seq_len)
