"""Batched Newton-Schulz (training/muon.py) against DeepSpeed's per-matrix `muon_update`."""

import pytest
import torch

from training import muon
from training.muon import DeferredMuon, deferred_muon, newton_schulz_flops, orthogonalise

SHAPES = [((48, 24), False), ((24, 48), False), ((3, 40, 16), True), ((16, 40), False), ((40, 16), False)]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g), expert) for shape, expert in SHAPES]


@pytest.mark.parametrize("method", ["standard", "gram"])
def test_deferred_updates_match_deepspeeds_muon_update(method):
    from deepspeed.runtime.zero.muon.original_muon import muon_update

    torch._dynamo.config.disable = True  # DeepSpeed compiles muon_update; eager is what the trainer runs
    expected, expected_momenta = [], []
    for grad, momentum, expert in _inputs():
        expected.append(muon_update(grad, momentum, beta=0.95, ns_method=method, is_expert_group=expert))
        expected_momenta.append(momentum)
    deferred, outputs, momenta = DeferredMuon(), [], []
    for grad, momentum, expert in _inputs():
        outputs.append(deferred.update(grad, momentum, 0.95, ns_method=method, is_expert_group=expert))
        momenta.append(momentum)
    deferred.run()
    for got, want, got_m, want_m, (shape, _) in zip(outputs, expected, momenta, expected_momenta, SHAPES):
        assert got.shape == want.shape == shape
        torch.testing.assert_close(got_m, want_m, rtol=0, atol=0)  # the momentum step is the same arithmetic
        assert got.abs().max() > 0.1
        if method == "gram":  # fp32 on a CPU: the same arithmetic, batched
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if method == "standard":  # bf16: both against the iteration in fp64, ours (one rounding per fused
        for got, want, (grad, momentum, _) in zip(outputs, expected, _inputs()):  # baddbmm) no further off
            reference = _standard_in_fp64(grad.lerp(momentum.lerp(grad, 0.05), 0.95))
            ours, theirs = (_relative_error(x, reference) for x in (got, want))
            assert ours < 0.025 and ours <= theirs * 1.1, (ours, theirs)


def _standard_in_fp64(update: torch.Tensor) -> torch.Tensor:
    a, b, c = muon.NS_COEFFICIENTS
    x = update.double()
    x = x if x.size(-2) <= x.size(-1) else x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(muon.NS_STEPS):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    rows, cols = update.shape[-2:]
    return x * (rows / cols) ** 0.5 if rows > cols else x


def _relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    x = x.double() if x.shape == reference.shape else x.double().mT
    return ((x - reference).norm() / reference.norm()).item()


def test_matrices_of_one_shape_either_way_round_share_one_batch(monkeypatch):
    calls = []
    real = muon.newton_schulz
    monkeypatch.setattr(muon, "newton_schulz", lambda stack, method: calls.append(tuple(stack.shape)) or
                        real(stack, method))
    updates = [torch.randn(48, 24), torch.randn(24, 48), torch.randn(3, 24, 48), torch.randn(16, 40)]
    out = orthogonalise(updates, "standard")
    assert sorted(calls) == [(1, 16, 40), (5, 24, 48)]  # the (48, 24) one turned wide, the experts one each
    # A tall matrix comes back tall, scaled by sqrt(rows / cols) as DeepSpeed scales it; a wide one unscaled.
    assert [tuple(o.shape) for o in out] == [(48, 24), (24, 48), (3, 24, 48), (16, 40)]
    singular = [torch.linalg.svdvals(o.float()).mean().item() for o in out[:2]]
    assert singular[0] / singular[1] == pytest.approx(2 ** 0.5, rel=0.15)


def test_deferred_muon_patches_deepspeed_only_inside_the_block():
    from deepspeed.runtime.zero.muon import original_muon

    before = original_muon.muon_update
    with deferred_muon() as deferred:
        assert original_muon.muon_update == deferred.update
    assert original_muon.muon_update is before


def test_deferred_muon_refuses_what_it_does_not_batch():
    with pytest.raises(ValueError, match="batched Newton-Schulz"):
        DeferredMuon().update(torch.randn(8, 4), torch.zeros(8, 4), num_heads=2)


def test_newton_schulz_flops():
    n, m = 24, 48  # five iterations of X X^T (n n m), A A (n n n) and B X (n n m), two FLOPs per multiply-add
    assert newton_schulz_flops((48, 24), "standard") == 5 * (2 * n * n * m + 2 * n ** 3 + 2 * n * n * m)
    assert newton_schulz_flops((3, 24, 48), "standard") == 3 * newton_schulz_flops((24, 48), "standard")
    assert newton_schulz_flops((24, 48), "gram") < newton_schulz_flops((24, 48), "standard")
    assert newton_schulz_flops((24, 24), "gram") == newton_schulz_flops((24, 24), "standard")
