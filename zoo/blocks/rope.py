"""Rotary position embeddings (Su et al., 2021) with linear, dynamic-NTK and YaRN scaling, or a
scaling's own frequency rule.

Legend: T = positions, R = rotary dims (even), R/2 = frequencies.

`RotaryEmbedding(positions)` returns (cos, sin), each (T, R/2) in fp32; `apply_rope` rotates the
pairs of a (..., T, R) tensor. Two layouts: "half" pairs dim i with i + R/2 (Llama, GLM);
"interleaved" pairs 2i with 2i+1 (DeepSeek's released weights). Both write the result in half
layout, as transformers does, which leaves q.k unchanged because q and k are permuted alike.
"""

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

SCALINGS = ("none", "linear", "dynamic_ntk", "yarn")  # the rules defined here
Layout = Literal["half", "interleaved"]


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _yarn_inv_freq(
    dim: int, theta: float, factor: float, original_max_seq_len: int,
    beta_fast: float, beta_slow: float, truncate: bool,
) -> torch.Tensor:
    """Blend interpolated and extrapolated frequencies with a linear ramp over dims (YaRN eq. 23)."""

    def correction_dim(rotations: float) -> float:
        # The dim whose wavelength completes `rotations` turns over the original context.
        return dim * math.log(original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 for high-frequency dims, which keep their original frequency
    base = _base_inv_freq(dim, theta)
    return base / factor * (1 - extrapolate) + base * extrapolate


class RotaryEmbedding(nn.Module):
    """cos/sin tables for `dim` rotary dims.

    `attention_factor` multiplies cos and sin (YaRN's temperature); `softmax_scale_factor` is the
    extra factor attention applies to its 1/sqrt(d) scale (DeepSeek's YaRN correction).

    `scaling` names a rule defined here. Any other scaling brings its own: `frequencies(dim, theta)`
    gives its R/2 frequencies, and `attention_factor` / `softmax_scale_factor` its factors (1 by
    default); the named rules compute their factors themselves.
    """

    def __init__(
        self,
        *,
        dim: int,
        theta: float = 10000.0,
        scaling: str = "none",
        factor: float = 1.0,
        original_max_seq_len: int | None = None,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        mscale: float = 1.0,
        mscale_all_dim: float = 0.0,
        truncate: bool = True,
        frequencies: Callable[[int, float], torch.Tensor] | None = None,
        attention_factor: float = 1.0,
        softmax_scale_factor: float = 1.0,
    ):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RotaryEmbedding dim must be even, got {dim}")
        if theta <= 1:
            raise ValueError(f"RoPE theta must be > 1 (YaRN divides by ln(theta)), got {theta}")
        if scaling == "dynamic_ntk" and dim < 4:
            raise ValueError(f"dynamic NTK RoPE needs dim >= 4 (it rescales by ratio^(dim / (dim - 2))), got {dim}")
        if scaling in ("dynamic_ntk", "yarn") and original_max_seq_len is None:
            raise ValueError(f"RoPE scaling {scaling!r} needs original_max_seq_len")
        self.dim, self.theta, self.scaling, self.factor = dim, theta, scaling, factor
        self.original_max_seq_len = original_max_seq_len
        if (frequencies is None) != (scaling in SCALINGS):
            raise ValueError(f"RoPE scaling {scaling!r}: pass frequencies= for a scaling other than "
                             f"{', '.join(SCALINGS)}, and only for one (those have their rules here)")
        if frequencies is None and (attention_factor, softmax_scale_factor) != (1.0, 1.0):
            raise ValueError(f"RoPE scaling {scaling!r} computes its own attention and softmax factors")
        self.attention_factor = attention_factor
        self.softmax_scale_factor = softmax_scale_factor
        if frequencies is not None:
            inv_freq = frequencies(dim, theta).float()
            if inv_freq.shape != (dim // 2,):
                raise ValueError(f"RoPE scaling {scaling!r}: frequencies({dim}, {theta}) has shape "
                                 f"{tuple(inv_freq.shape)}, expected ({dim // 2},)")
        elif scaling in ("none", "linear", "dynamic_ntk"):
            inv_freq = _base_inv_freq(dim, theta)
            if scaling == "linear":
                inv_freq = inv_freq / factor
        else:  # yarn
            inv_freq = _yarn_inv_freq(dim, theta, factor, original_max_seq_len, beta_fast, beta_slow, truncate)
            if mscale and mscale_all_dim:
                self.attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            else:
                self.attention_factor = yarn_mscale(factor)
            if mscale_all_dim:
                self.softmax_scale_factor = yarn_mscale(factor, mscale_all_dim) ** 2
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep the frequencies in fp32 when the model is cast to bf16: rounded to 8 bits they would
        # misplace position 500 by 0.09 rad and position 4096 by 0.7 rad.
        before = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != before.dtype:
            self.inv_freq = before.to(device=self.inv_freq.device)
        return self

    def inv_freq_for(self, seq_len: int) -> torch.Tensor:
        """Frequencies for a sequence of `seq_len` positions (only dynamic NTK depends on it)."""
        if self.scaling != "dynamic_ntk" or seq_len <= self.original_max_seq_len:
            return self.inv_freq
        # Rescale the base so the lowest frequency still spans the longer context (bloc97's NTK-aware RoPE).
        ratio = self.factor * seq_len / self.original_max_seq_len - (self.factor - 1)
        theta = self.theta * ratio ** (self.dim / (self.dim - 2))
        return _base_inv_freq(self.dim, theta).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Only dynamic NTK needs the length; reading it is a device sync (and a torch.compile graph break).
        inv_freq = self.inv_freq_for(int(positions.max()) + 1) if self.scaling == "dynamic_ntk" else self.inv_freq
        angles = positions.float()[..., None] * inv_freq.float()  # (T, R/2)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}, scaling={self.scaling}, factor={self.factor}"


def check_positions(positions: torch.Tensor, seq_len: int) -> None:
    """Positions are (T,), shared by every row of the batch. A (B, T) tensor would not fail but
    broadcast its cos/sin (B, T, R/2) against (B, H, T, R/2), lining batch rows up with heads."""
    if positions.ndim != 1 or positions.shape[0] != seq_len:
        raise ValueError(
            f"positions has shape {tuple(positions.shape)}, expected ({seq_len},): one position per step, "
            "shared by every row of the batch; per-row positions are not supported (pass positions[0] if "
            "the rows agree)"
        )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout = "half") -> torch.Tensor:
    """Rotate (..., T, R) by angles whose cos/sin are (T, R/2); output in half layout."""
    half = x.shape[-1] // 2
    if layout == "half":
        x1, x2 = x[..., :half], x[..., half:]
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
