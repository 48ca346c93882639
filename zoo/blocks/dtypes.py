"""The dtype a tensor's matmuls run in: autocast's where autocast is on for its device, else its own."""

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
