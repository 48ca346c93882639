"""RoPE: each scaling's frequencies and attention factors against the closed-form formulas,
recomputed here independently (YaRN: Peng et al. 2023, eqs. 17-23; dynamic NTK: bloc97)."""

import math

import pytest
import torch

from zoo.blocks.rope import RotaryEmbedding, apply_rope

DIM, THETA = 16, 10000.0


def closed_form_base(dim=DIM, theta=THETA):
    return torch.tensor([1.0 / theta ** (2 * i / dim) for i in range(dim // 2)])


def test_none():
    rope = RotaryEmbedding(dim=DIM, theta=THETA)
    torch.testing.assert_close(rope.inv_freq, closed_form_base())
    assert rope.attention_factor == 1.0 and rope.softmax_scale_factor == 1.0
    cos, sin = rope(torch.arange(5))
    angles = torch.arange(5.0)[:, None] * closed_form_base()[None]
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())


def test_linear():
    rope = RotaryEmbedding(dim=DIM, theta=THETA, scaling="linear", factor=4.0)
    torch.testing.assert_close(rope.inv_freq, closed_form_base() / 4.0)
    assert rope.attention_factor == 1.0


def test_dynamic_ntk():
    rope = RotaryEmbedding(dim=DIM, theta=THETA, scaling="dynamic_ntk", factor=2.0, original_max_seq_len=32)
    torch.testing.assert_close(rope.inv_freq_for(32), closed_form_base())  # within the original context
    seq = 100
    theta = THETA * ((2.0 * seq / 32) - (2.0 - 1)) ** (DIM / (DIM - 2))
    torch.testing.assert_close(rope.inv_freq_for(seq), closed_form_base(theta=theta))
    cos, _ = rope(torch.arange(seq))
    torch.testing.assert_close(cos[7], (7 * closed_form_base(theta=theta)).cos())


@pytest.mark.parametrize("mscale,mscale_all_dim", [(1.0, 0.0), (1.0, 1.0), (0.707, 1.0)])
def test_yarn(mscale, mscale_all_dim):
    factor, orig, beta_fast, beta_slow = 8.0, 64, 32.0, 1.0
    rope = RotaryEmbedding(dim=DIM, theta=THETA, scaling="yarn", factor=factor, original_max_seq_len=orig,
                           beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale, mscale_all_dim=mscale_all_dim)
    base = closed_form_base()
    # Dims whose wavelength fits fewer than beta_slow times in the original context are interpolated,
    # more than beta_fast times extrapolated, with a linear ramp between (dimension index d = 2i).
    def dim_for(rotations):
        return DIM * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(THETA))

    low, high = max(math.floor(dim_for(beta_fast)), 0), min(math.ceil(dim_for(beta_slow)), DIM - 1)
    expected = []
    for i in range(DIM // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        expected.append(base[i].item() / factor * ramp + base[i].item() * (1 - ramp))
    torch.testing.assert_close(rope.inv_freq, torch.tensor(expected))
    assert rope.inv_freq[0] == pytest.approx(base[0])  # the fastest dim is untouched
    assert rope.inv_freq[-1] == pytest.approx(base[-1] / factor)  # the slowest fully interpolated

    def m(scale, ms):
        return 0.1 * ms * math.log(scale) + 1.0

    attn = m(factor, mscale) / m(factor, mscale_all_dim) if mscale and mscale_all_dim else m(factor, 1.0)
    assert rope.attention_factor == pytest.approx(attn)
    assert rope.softmax_scale_factor == pytest.approx(m(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0)
    cos, sin = rope(torch.arange(3))
    torch.testing.assert_close(cos[2], (2 * rope.inv_freq).cos() * attn)


def test_rotation_preserves_norm_and_relative_position():
    rope = RotaryEmbedding(dim=DIM)
    q, k = torch.randn(DIM), torch.randn(DIM)
    cos, sin = rope(torch.arange(20))
    rq, rk = apply_rope(q.expand(20, DIM), cos, sin), apply_rope(k.expand(20, DIM), cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(20))
    # q at position m, k at position n: the score depends on m - n only.
    torch.testing.assert_close(rq[5] @ rk[2], rq[13] @ rk[10], atol=1e-5, rtol=1e-5)


def test_frequencies_stay_fp32_when_the_model_is_cast_to_bf16():
    rope = RotaryEmbedding(dim=DIM)
    reference = rope.inv_freq.clone()
    rope = rope.to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, reference)
    # bf16 frequencies would misplace position 4096 by more than half a radian.
    assert (4096 * reference - 4096 * reference.bfloat16().float()).abs().max() > 0.5


def test_degenerate_theta_and_ntk_dims_are_refused_at_construction():
    with pytest.raises(ValueError, match="theta must be > 1"):
        RotaryEmbedding(dim=DIM, theta=1.0, scaling="yarn", factor=4.0, original_max_seq_len=16)
    with pytest.raises(ValueError, match="dynamic NTK RoPE needs dim >= 4"):
        RotaryEmbedding(dim=2, scaling="dynamic_ntk", factor=2.0, original_max_seq_len=16)
    RotaryEmbedding(dim=4, scaling="dynamic_ntk", factor=2.0, original_max_seq_len=16)(torch.arange(32))
