"""The trainer's optimizer step beside the bare train step: what the trainer costs around the model.

    python -m benchmarks.trainer_overhead --preset deepseek_glm4
    python -m benchmarks.trainer_overhead --preset perf_w1 --set train.grad_accum=2 --reps 6

Both sides run in one process on the same preset, precision and batch (train.micro_batch_size x
train.grad_accum sequences of data.seq_len tokens per optimizer step), alternating step by step
after a warm-up, and the medians are reported:

- trainer: one optimizer step of the real trainer (`training.trainer`: its data, DeepSpeed engine,
  Muon or AdamW, ZeRO, routing-bias update and all-reduce), on the built-in corpus, in a throw-away
  run folder, without evaluation, checkpoints or logging;
- bare: the same model built again, train.grad_accum forward+backward passes on random tokens under
  autocast to the trainer's precision, then one fused torch AdamW step (benchmarks/train_step.py's
  step).

`--per-matrix` runs Newton-Schulz as DeepSpeed does, one matrix at a time, for the comparison.
Reported: tokens/s of each and their ratio, the trainer's per-phase split (training/timing.py) over
the timed steps, Newton-Schulz's own FLOP/s and its fraction of the measured matmul peak (the
optimizer's FLOPs, apart from the model's: MFU stays the model's), and the trainer's peak memory
split (training/memory.py). `--out` writes the report as text and JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.common import alternate
from training import trainer
from training.allocator import retain_freed_memory
from training.memory import format_split, memory_split
from training.muon import newton_schulz_flops
from training.mfu import TRAIN_FLOPS_PER_FORWARD_FLOP, peak_flops
from training.plan import make_plan
from training.precision import DTYPES
from training.timing import ORDER
from zoo.describe import describe


def bare_step(spec, device: torch.device):
    """train.grad_accum forward+backward passes and one fused AdamW step on the trainer's batch."""
    import zoo

    torch.manual_seed(spec.train.seed)
    model = zoo.build(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
    ids = torch.randint(0, spec.model.vocab_size, (spec.train.micro_batch_size, spec.data.seq_len), device=device)
    dtype = DTYPES[spec.train.precision]

    def step():
        for _ in range(spec.train.grad_accum):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(ids, labels=ids, return_logits=False).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@contextmanager
def per_matrix_newton_schulz(optimizer):
    """In place of training.muon.deferred_muon: DeepSpeed's own per-matrix `muon_update` inside the
    partition fill, the whole fill timed as newton_schulz (its bookkeeping is a small part of it)."""
    from deepspeed.runtime.zero.muon import original_muon

    class Done:
        flops_total = 0.0

        def run(self):
            pass

        def flops(self):
            return self.flops_total

    done, original = Done(), original_muon.muon_update

    def counted(grad, momentum, *args, ns_method="gram", **kwargs):
        done.flops_total += newton_schulz_flops(tuple(grad.shape), ns_method)
        return original(grad, momentum, *args, ns_method=ns_method, **kwargs)

    original_muon.muon_update = counted
    try:
        with optimizer.phase("newton_schulz"):
            yield done
    finally:
        original_muon.muon_update = original


def trainer_step(args, out: Path):
    """The trainer started on `args` (training/run.py's flags) and a function taking its next step."""
    plan = make_plan(trainer.parse_args(["--preset", args.preset, "--out", str(out), *[f"--set={s}" for s in args.sets],
                                         "--set", f"train.steps={args.warmup + args.reps + 10}",
                                         *(["--tiny"] if args.tiny else [])]))
    run = trainer._start(plan)
    if args.per_matrix:
        from training import zero_clip

        zero_clip.deferred_muon = lambda: per_matrix_newton_schulz(run.engine.optimizer)
    step = iter(range(plan.spec.train.steps))
    return plan, run, lambda: trainer._update(run, next(step))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainer_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="deepseek_glm4")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--out", type=Path, default=None, help="write the report to OUT.txt and OUT.json")
    p.add_argument("--tiny", action="store_true", help="the preset at toy size (smoke tests)")
    p.add_argument("--per-matrix", action="store_true",
                   help="Newton-Schulz one matrix at a time, by DeepSpeed's muon_update (for comparison)")
    args = p.parse_args(argv)
    retain_freed_memory()  # as the trainer does (training/allocator.py)
    with tempfile.TemporaryDirectory() as folder:
        plan, run, train = trainer_step(args, Path(folder) / "run")
        spec, device = plan.spec, plan.ranks.device
        bare = bare_step(spec, device)
        tokens = spec.train.micro_batch_size * spec.train.grad_accum * spec.data.seq_len
        print(f"{args.preset}: {tokens:,} tokens a step ({spec.train.micro_batch_size} x {spec.train.grad_accum} x "
              f"{spec.data.seq_len}), {spec.train.precision}, optimizer {spec.train.optimizer}, "
              f"ZeRO-{spec.deepspeed.zero_stage}; {args.warmup} warm-up steps, then {args.reps} alternating",
              file=sys.stderr, flush=True)
        for _ in range(args.warmup):
            train()
        run.timer.take()
        ns_flops_before = getattr(run.engine.optimizer, "newton_schulz_flops", 0.0)
        times = alternate({"trainer": train, "bare": bare}, device, warmup=0, reps=args.reps,
                          progress=lambda r: print(f"  round {r}/{args.reps}", file=sys.stderr, flush=True))
        phases = {name: seconds / args.reps for name, seconds in run.timer.take().items()}
        ns_flops = (getattr(run.engine.optimizer, "newton_schulz_flops", 0.0) - ns_flops_before) / args.reps
        memory = memory_split(run.engine, device)
    report = _report(args, spec, device, tokens, times, phases, ns_flops, memory)
    print(report["text"])
    if args.out:
        args.out.with_suffix(".txt").write_text(report["text"] + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(report["json"], indent=2) + "\n")
    return 0


def _report(args, spec, device, tokens, times, phases, ns_flops, memory) -> dict:
    medians = {name: statistics.median(values) for name, values in times.items()}
    tps = {name: tokens / seconds for name, seconds in medians.items()}
    peak = peak_flops(DTYPES[spec.train.precision], device)
    model_flops = describe(spec, seq_len=spec.data.seq_len)["flops_per_token"] * TRAIN_FLOPS_PER_FORWARD_FLOP
    ns_seconds = phases.get("newton_schulz", 0.0)
    ns_rate = ns_flops / ns_seconds if ns_seconds else float("nan")
    step = sum(times["trainer"]) / len(times["trainer"])  # the phases are sums: shares of the mean step
    lines = [
        f"{args.preset} ({' '.join(args.sets) or 'preset defaults'}"
        f"{', per-matrix Newton-Schulz' if args.per_matrix else ''}): {tokens:,} tokens a step, "
        f"{spec.train.precision}, {spec.train.optimizer}, ZeRO-{spec.deepspeed.zero_stage}, {device}",
        f"  trainer {tps['trainer']:8,.0f} tokens/s  ({medians['trainer']:.3f} s a step, median of {args.reps})",
        f"  bare    {tps['bare']:8,.0f} tokens/s  ({medians['bare']:.3f} s)",
        f"  trainer / bare = {tps['trainer'] / tps['bare']:.2f}; model MFU: trainer "
        f"{tps['trainer'] * model_flops / peak:.1%}, bare {tps['bare'] * model_flops / peak:.1%} of {peak / 1e9:,.0f} "
        f"GFLOP/s",
        "  trainer step, per phase (mean s, share of the mean step): " + ", ".join(
            f"{name} {phases[name]:.3f} ({phases[name] / step:.0%})" for name in ORDER if name in phases),
        f"  Newton-Schulz: {ns_flops / 1e9:,.1f} GFLOP a step ({ns_flops / (model_flops * tokens):.2f}x the model's "
        f"{model_flops * tokens / 1e9:,.1f}), {ns_rate / 1e9:,.0f} GFLOP/s = {ns_rate / peak:.0%} of the matmul peak",
        f"  trainer {format_split(memory)}",
    ]
    data = {"preset": args.preset, "sets": args.sets, "per_matrix": args.per_matrix, "device": str(device), "precision": spec.train.precision,
            "optimizer": spec.train.optimizer, "zero_stage": spec.deepspeed.zero_stage, "tokens_per_step": tokens,
            "step_seconds": times, "tokens_per_s": tps, "ratio": tps["trainer"] / tps["bare"],
            "phase_seconds": phases, "newton_schulz_flops": ns_flops, "newton_schulz_flops_per_s": ns_rate,
            "model_flops_per_step": model_flops * tokens, "peak_flops": peak, "memory_bytes": memory}
    return {"text": "\n".join(lines), "json": data}


if __name__ == "__main__":
    sys.exit(main())
