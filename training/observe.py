"""What a run shows: TensorBoard scalars and histograms, and a progress bar on the console.

Only rank 0 writes; every other rank gets a silent observer, so the loop never asks who it is.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from zoo.blocks.moe import RouterStats


class Observer:
    def __init__(self, log_dir, *, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.interactive = sys.stderr.isatty()
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            disable=not self.interactive, desc="train")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def routers(self, step: int, stats: dict[int, RouterStats], loads: dict[int, torch.Tensor],
                biases: dict[int, torch.Tensor]) -> None:
        """Per-layer expert load (histogram over experts, and each expert's share), MaxVio, entropy, bias norm."""
        if not self.writer:
            return
        for layer, load in loads.items():
            share = load / load.sum().clamp_min(1)
            mean = load.mean().clamp_min(1e-9)
            self.writer.add_scalar(f"moe/layer_{layer}/max_vio", ((load.max() - mean) / mean).item(), step)
            self.writer.add_histogram(f"moe/layer_{layer}/expert_share", share, step)
            for expert, value in enumerate(share.tolist()):
                self.writer.add_scalar(f"moe_load/layer_{layer}/expert_{expert}", value, step)
            self.writer.add_scalar(f"moe/layer_{layer}/router_entropy", stats[layer].entropy.item(), step)
            if layer in biases:
                self.writer.add_scalar(f"moe/layer_{layer}/routing_bias_norm", biases[layer].norm().item(), step)

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
        else:
            print(f"step {step}/{self.bar.total} " + " ".join(f"{k} {v}" for k, v in postfix.items()), flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.interactive else print)(text)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.writer:
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.close()
