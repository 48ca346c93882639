"""MoE-layer microbenchmark: the expert dispatchers side by side, and a dense SwiGLU of equal FLOPs.

    python -m benchmarks.moe_layer                       # W1's and W2's expert layers, fp32 (and bf16 on a CPU with bf16)
    python -m benchmarks.moe_layer --workload w2 --dtypes bf16 --reps 20

One call is forward + backward of the routed experts alone (the router and the shared expert are
the same for every dispatcher, so they are left out) on T = 8 x 256 tokens of d_model 384, with one
fixed routing for every contender:

  zoo grouped_mm        `dropless_dispatch(impl="grouped_mm")`: two torch._grouped_mm calls
  zoo padded_bmm        `dropless_dispatch(impl="padded_bmm")`: experts sorted by count, padded per bucket, bmm
  zoo loop              `dropless_dispatch(impl="loop")`: one matmul pair per expert
  transformers <impl>   DeepseekV3Experts with experts_implementation eager / grouped_mm (batched_mm
                        with --hf-experts eager,grouped_mm,batched_mm: it copies an expert's weights
                        per token and took 7.6 s a call for W1 in bf16 here, 250x the dense layer)
  dense SwiGLU          one SwiGLU of hidden K x F: the routed experts' FLOPs without any dispatch

`--skew S` gives the experts unequal loads (per-expert score offsets of standard deviation S). The
routing is the same for every call, so per-expert matmul shapes repeat and oneDNN's kernels stay
cached; in a train step the loads change every step, which this benchmark does not show (see
benchmarks/results/moe_layer.txt).

Each contender's output and input gradient are checked against an fp32 reference (zoo loop in
fp32); a contender that fails (e.g. out of memory) is reported and skipped. Contenders alternate
call by call; medians are reported with achieved GFLOP/s (3 x the forward matmul FLOPs, 2*A*3*D*F).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.common import alternate, median, spread
from training.allocator import retain_freed_memory
from training.mfu import cpu_has_native_bf16
from zoo.blocks.moe import dropless_dispatch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Workload:
    name: str
    n_experts: int
    top_k: int
    d_expert: int
    d_model: int = 384
    tokens: int = 8 * 256


WORKLOADS = {"w1": Workload("W1", n_experts=8, top_k=2, d_expert=384),
             "w2": Workload("W2", n_experts=64, top_k=6, d_expert=128)}


def routing(w: Workload, seed: int = 0, skew: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of random scores: every expert gets about T*K/E tokens, as a balanced router gives;
    `skew` > 0 adds a per-expert offset of that standard deviation to the scores, for the unequal
    loads of an untrained or unbalanced router."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(w.tokens, w.n_experts, generator=g) + skew * torch.randn(w.n_experts, generator=g)
    weights, experts = scores.softmax(-1).topk(w.top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), experts


def hf_experts(w: Workload, impl: str, gate_up: torch.Tensor, down: torch.Tensor):
    from transformers import AutoConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    config = AutoConfig.for_model("deepseek_v3", hidden_size=w.d_model, moe_intermediate_size=w.d_expert,
                                  n_routed_experts=w.n_experts, num_experts_per_tok=w.top_k)
    config._experts_implementation = impl
    module = DeepseekV3Experts(config)
    with torch.no_grad():
        module.gate_up_proj.copy_(gate_up)
        module.down_proj.copy_(down)
    return module.to(gate_up.dtype)


def contenders(w: Workload, dtype: torch.dtype, hf_impls: list[str], skew: float = 0.0):
    """name -> (forward function of x, parameters to zero the grads of)."""
    g = torch.Generator().manual_seed(1)
    std = 0.02
    gate_up = (torch.randn(w.n_experts, 2 * w.d_expert, w.d_model, generator=g) * std).to(dtype).requires_grad_()
    down = (torch.randn(w.n_experts, w.d_model, w.d_expert, generator=g) * std).to(dtype).requires_grad_()
    weights, experts = routing(w, skew=skew)
    weights = weights.to(dtype)
    out = {
        "zoo grouped_mm": (lambda x: dropless_dispatch(x, weights, experts, gate_up, down, impl="grouped_mm")[0],
                           [gate_up, down]),
        "zoo padded_bmm": (lambda x: dropless_dispatch(x, weights, experts, gate_up, down, impl="padded_bmm")[0],
                           [gate_up, down]),
        "zoo loop": (lambda x: dropless_dispatch(x, weights, experts, gate_up, down, impl="loop")[0],
                     [gate_up, down]),
    }
    for impl in hf_impls:
        module = hf_experts(w, impl, gate_up.detach(), down.detach())
        out[f"transformers {impl}"] = (lambda x, m=module: m(x, experts, weights), list(module.parameters()))
    hidden = w.top_k * w.d_expert
    dense_gate_up = (torch.randn(2 * hidden, w.d_model, generator=g) * std).to(dtype).requires_grad_()
    dense_down = (torch.randn(w.d_model, hidden, generator=g) * std).to(dtype).requires_grad_()

    def dense(x):
        gate, up = F.linear(x, dense_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, dense_down)

    out["dense SwiGLU (K x F hidden)"] = (dense, [dense_gate_up, dense_down])
    return out, (weights, experts, gate_up, down)


def fwd_bwd(fn, params, x, grad):
    def call():
        for p in params:
            p.grad = None
        x.grad = None
        y = fn(x)
        y.backward(grad)
        return y
    return call


def run(w: Workload, dtype_name: str, args) -> list[dict]:
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(w.tokens, w.d_model, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(w.tokens, w.d_model, generator=g).to(dtype)
    pool, (weights, experts, gate_up, down) = contenders(w, dtype, args.hf_experts, args.skew)

    # fp32 reference: the loop dispatcher on fp32 copies of the same tensors
    x32 = x.detach().float().requires_grad_()
    y32 = dropless_dispatch(x32, weights.float(), experts, gate_up.detach().float(), down.detach().float(),
                            impl="loop")[0]
    y32.backward(grad.float())
    checks, calls = {}, {}
    for name, (fn, params) in pool.items():
        try:
            call = fwd_bwd(fn, params, x, grad)
            y = call()
            if name.startswith("dense"):
                checks[name] = "n/a (a different layer)"
            else:
                rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
                checks[name] = f"out {rel(y.detach(), y32.detach()):.1e}, dx {rel(x.grad, x32.grad):.1e}"
            calls[name] = call
        except Exception as err:  # e.g. batched_mm's per-token weight copies run out of memory
            checks[name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
    times = alternate(calls, torch.device("cpu"), warmup=args.warmup, reps=args.reps)
    flops = 3 * 2 * w.tokens * w.top_k * 3 * w.d_model * w.d_expert
    rows = []
    for name in pool:
        row = {"workload": w.name, "dtype": dtype_name, "name": name, "check": checks[name]}
        if name in times:
            ms = median(times[name]) * 1e3
            row.update(ms=ms, spread=spread(times[name]), gflops=flops / ms / 1e6)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--dtypes", type=lambda s: s.split(","),
                        help="bf16,fp32 (default: bf16 only where the CPU has native bf16; training/precision.py)")
    parser.add_argument("--hf-experts", default="eager,grouped_mm", type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--skew", type=float, default=0.0,
                        help="std of per-expert score offsets: unequal expert loads (default: balanced)")
    args = parser.parse_args(argv)
    if not math.isfinite(args.skew) or args.skew < 0:
        parser.error(f"--skew: the standard deviation of the expert score offsets must be >= 0, got {args.skew}")
    retain_freed_memory()  # as the trainer does (training/allocator.py)
    if args.dtypes is None:
        args.dtypes = ["bf16", "fp32"] if cpu_has_native_bf16() else ["fp32"]
        if "bf16" not in args.dtypes:
            print("bf16 left out: this CPU has no native bf16 matmul (training/mfu.py); --dtypes bf16,fp32 "
                  "forces it", file=sys.stderr)
    for name in args.dtypes:
        if name not in DTYPES:
            parser.error(f"--dtypes: {name!r} is not one of {', '.join(DTYPES)}")
    workloads = list(WORKLOADS.values()) if args.workload == "all" else [WORKLOADS[args.workload]]
    print(f"forward + backward of the routed experts, T = 2048 tokens, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; check: relative L2 error against an fp32 reference")
    for w in workloads:
        for dtype_name in args.dtypes:
            rows = run(w, dtype_name, args)
            dense = next((r["ms"] for r in rows if r["name"].startswith("dense") and "ms" in r), None)
            counts = torch.bincount(routing(w, skew=args.skew)[1].flatten(), minlength=w.n_experts).float()
            print(f"\n{w.name} ({w.n_experts} experts top-{w.top_k}, F {w.d_expert}), {dtype_name}, "
                  f"largest expert load {counts.max() / counts.mean():.2f}x the mean:")
            print(f"  {'':<30}{'ms':>8}{'':>6}{'GFLOP/s':>9}{'x dense':>9}   check")
            for r in rows:
                if "ms" in r:
                    print(f"  {r['name']:<30}{r['ms']:>8.2f}{r['spread']:>6}{r['gflops']:>9.0f}"
                          f"{r['ms'] / dense if dense else float('nan'):>9.2f}   {r['check']}")
                else:
                    print(f"  {r['name']:<30}{'':>32}   {r['check']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
