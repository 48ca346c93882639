"""Peak memory and what holds it: weights, gradients, optimizer states and the rest.

The peak is the process's peak resident set on a CPU (`getrusage`: everything, the Python
interpreter and libraries included) and PyTorch's peak allocation on a GPU. Weights are the model's
parameters plus the fp32 master copies a mixed-precision optimizer keeps; optimizer states every
tensor in the optimizer's state (Muon momentum, AdamW moments) plus ZeRO's staging copy of the Muon
momentum; gradients one per parameter in its own dtype plus the fp32 partition the optimizer steps
on (what a step holds at its update). The rest is activations, buffers, data and the runtime.
"""

from __future__ import annotations

import resource
import sys

import torch


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def memory_split(engine, device: torch.device) -> dict[str, int]:
    """Bytes: peak, weights, gradients, optimizer_states, rest (peak minus the three)."""
    params = list(engine.module.parameters())
    zero = engine.optimizer
    masters = list(getattr(zero, "single_partition_of_fp32_groups", None)
                   or getattr(zero, "fp32_groups_flat_partition", None) or [])
    inner = getattr(zero, "optimizer", zero)
    states = [t for state in inner.state.values() for t in state.values()]
    staged = [staged for staged, _ in getattr(zero, "_muon_pending_momentum", {}).values()]
    split = {
        "peak": peak_bytes(device),
        "weights": _bytes(params) + _bytes(masters),
        "gradients": sum(p.numel() * p.element_size() for p in params) + sum(m.numel() * 4 for m in masters),
        "optimizer_states": _bytes(states) + _bytes(staged),
    }
    split["rest"] = split["peak"] - split["weights"] - split["gradients"] - split["optimizer_states"]
    return split


def checkpoint_bytes(engine) -> int:
    """About what one checkpoint writes: the weights (master copies included) and optimizer states, and
    the run folder's copy of the weights."""
    split = memory_split(engine, torch.device("cpu"))
    return split["weights"] + split["optimizer_states"] + sum(p.numel() * 4 for p in engine.module.parameters())


def format_split(split: dict[str, int]) -> str:
    gb = {name: value / 1e9 for name, value in split.items()}
    return (f"peak memory {gb['peak']:.2f} GB: weights {gb['weights']:.2f}, gradients {gb['gradients']:.2f}, "
            f"optimizer states {gb['optimizer_states']:.2f}, rest {gb['rest']:.2f}")
