"""gpu_check's grouped section: `dropless_dispatch`'s torch._grouped_mm path (CUDA bf16) against the
per-expert loop (bf16) and an fp32 loop reference, forward and backward, and both timed.

Shapes: T = tokens, D = d_model, E = experts, K = experts per token, Fh = expert hidden width."""

from __future__ import annotations

import traceback

from benchmarks import gpu_check_common as common
from benchmarks.gpu_check_common import BF16_TOL, cuda_time_ms, note, rel_err, say


def routing(T, E, K, device, active_experts=None, seed=0):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(T, E, device=device, generator=gen)
    if active_experts is not None:
        logits[:, active_experts:] = -1e9  # leave experts with no tokens at all
    weights, experts = logits.softmax(-1).topk(K, dim=-1)
    return weights, experts


# Each timed path and the dropless_dispatch impl it runs, named exactly: "auto" would fall back to
# the loop where the widths miss grouped_mm's alignment (and on CPU pick padded_bmm), timing the
# loop under grouped's name. torch._grouped_mm has a CPU kernel too, so --cpu-smoke runs the same path.
PATHS = {"grouped": "grouped_mm", "loop": "loop"}


def dispatch_call(moe_mod, impl: str, x, w, ex, gu, dn, gy):
    """Forward + backward of dropless_dispatch with `impl` (grouped_mm, loop, padded_bmm)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, gu, dn)]
    y, counts = moe_mod.dropless_dispatch(leaves[0], leaves[1], ex, leaves[2], leaves[3], impl=impl)
    if gy is not None:
        y.backward(gy)
    return y.detach(), [t.grad for t in leaves] if gy is not None else None, counts


def time_dispatch(moe_mod, impl: str, x, w, ex, gu, dn, gy, backward):
    import torch

    leaves = [t.detach().clone().requires_grad_(backward) for t in (x, w, gu, dn)]

    def step():
        y, _ = moe_mod.dropless_dispatch(leaves[0], leaves[1], ex, leaves[2], leaves[3], impl=impl)
        if backward:
            torch.autograd.backward(y, gy)

    return cuda_time_ms(step, warmup=3, reps=10)


def section_grouped(args) -> None:
    import torch

    import zoo.blocks.moe as moe_mod

    if not hasattr(torch, "_grouped_mm"):
        note("grouped: torch has no _grouped_mm: dropless_dispatch always takes the per-expert loop")
        return
    cases = [  # label, T tokens, D, E, K, F, experts that receive tokens (None: all)
        ("W2-like", 8192, 384, 64, 6, 128, None),
        ("W2-like, 24 of 64 experts empty", 2048, 384, 64, 6, 128, 40),
        ("big", 16384, 1024, 64, 6, 512, None),
    ]
    names = ("y", "dx", "dweights", "dgate_up", "ddown")
    if common.DEV != "cuda":
        cases = [(label, 256, 64, 8, 2, 32, 6 if active else None) for label, *_, active in cases[:2]]
    for label, T, D, E, K, Fh, active in cases:
        try:
            torch.manual_seed(0)
            dev = common.DEV
            w, ex = routing(T, E, K, dev, active)
            x = torch.randn(T, D, device=dev)
            gu = torch.randn(E, 2 * Fh, D, device=dev) * D**-0.5
            dn = torch.randn(E, D, Fh, device=dev) * Fh**-0.5
            gy = torch.randn(T, D, device=dev)
            ref_y, ref_g, counts = dispatch_call(moe_mod, "loop", x, w, ex, gu, dn, gy)  # the fp32 reference
            bf = [t.to(torch.bfloat16) for t in (x, w, gu, dn, gy)]
            errs = {}
            for path, impl in PATHS.items():
                y, grads, _ = dispatch_call(moe_mod, impl, bf[0], bf[1], ex, bf[2], bf[3], bf[4])
                errs[path] = [rel_err(y, ref_y)] + [rel_err(a, b) for a, b in zip(grads, ref_g)]
                errs[path] = dict(zip(("y", "dx", "dweights", "dgate_up", "ddown"), errs[path]))
            # grouped vs loop directly (both bf16)
            yg, gg, _ = dispatch_call(moe_mod, PATHS["grouped"], bf[0], bf[1], ex, bf[2], bf[3], bf[4])
            yl, gl, _ = dispatch_call(moe_mod, PATHS["loop"], bf[0], bf[1], ex, bf[2], bf[3], bf[4])
            direct = dict(zip(names, [rel_err(yg, yl)] + [rel_err(a, b) for a, b in zip(gg, gl)]))
            worst_g = max(errs["grouped"].values())
            worst_l = max(errs["loop"].values())
            ok = worst_g < BF16_TOL and max(direct.values()) < BF16_TOL
            empty = int((counts == 0).sum())
            note(f"grouped [{label}] T={T} D={D} E={E} K={K} F={Fh} ({empty} empty experts): "
                 f"{'EQUAL' if ok else 'MISMATCH'} within bf16 tol {BF16_TOL:g}: worst rel err vs fp32 grouped "
                 f"{worst_g:.1e}, loop {worst_l:.1e}; grouped vs loop {max(direct.values()):.1e}")
            say("      grouped vs fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in errs["grouped"].items()))
            say("      loop    vs fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in errs["loop"].items()))
            say("      grouped vs loop: " + ", ".join(f"{k} {v:.1e}" for k, v in direct.items()))
            A = T * K
            flops_fwd = 6 * A * D * Fh
            t = {}
            for path, impl in PATHS.items():
                t[path] = (time_dispatch(moe_mod, impl, *bf[:2], ex, *bf[2:4], bf[4], False),
                           time_dispatch(moe_mod, impl, *bf[:2], ex, *bf[2:4], bf[4], True))
            note(f"grouped [{label}] timings bf16: grouped fwd {t['grouped'][0]:.2f} ms, fwd+bwd {t['grouped'][1]:.2f} ms "
                 f"({flops_fwd * 3 / (t['grouped'][1] * 1e-3) / 1e12:.0f} TFLOP/s expert matmuls); loop fwd "
                 f"{t['loop'][0]:.2f} ms, fwd+bwd {t['loop'][1]:.2f} ms; speed-up fwd+bwd {t['loop'][1] / t['grouped'][1]:.1f}x")
            if common.DEV == "cuda":
                torch.cuda.empty_cache()
        except Exception as err:
            note(f"grouped [{label}]: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
            traceback.print_exc(limit=3)
