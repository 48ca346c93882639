"""Train-step benchmark: the zoo against transformers' DeepseekV3ForCausalLM on the same workload.

    python -m benchmarks.train_step --preset perf_w1            # W1 (perf_w2: W2), zoo vs transformers
    python -m benchmarks.train_step --preset deepseek_glm4 --set train.micro_batch_size=4 --no-hf
    python -m benchmarks.train_step --preset perf_w1 --profile prof.txt   # + an operator profile

One train step is forward, backward and an optimizer step on one batch of micro_batch_size x
data.seq_len random tokens. Both sides use torch's AdamW (fused where the device has it), so the
comparison is of the models, not of Muon against Adam. "bf16" is autocast to bfloat16 over fp32
weights (the weights, gradients and optimizer state stay fp32).

1. transformers gets the zoo model's weights (`zoo.interop.hf.to_hf_model`); both compute the
   logits and loss of one batch in fp32 and must agree (LOGITS_TOLERANCE, LOSS_TOLERANCE), or the
   benchmark stops: the two run the same workload.
2. Probe: every candidate runs `--probe-steps` steps after a warm-up (1 step, 4 when compiled);
   transformers' candidates are each experts_implementation x attn_implementation x {fp32, bf16
   autocast}, the zoo's are {fp32, bf16};
   --compile adds torch.compile for the zoo and for transformers' grouped_mm + SDPA. Each side's
   fastest is kept.
3. The two winners alternate, step by step, for `--reps` rounds after `--warmup` steps each (the
   default 2 is raised to 4 for a compiled winner);
   medians are reported: tokens/s, model FLOPs per token (forward x 3, from `zoo describe`),
   achieved FLOP/s, MFU against the matmul peak of the winner's dtype measured on this device
   (`training.mfu.measured_peak_flops`; on CUDA also `mfu_datasheet`, against the datasheet's peak),
   peak step memory, and the speed ratio zoo / transformers. bf16 on a CPU without bf16
   instructions has no MFU (n/a); an MFU above 100% is marked "!" (its peak is wrong).

Peak step memory, and why each probe is a child process: benchmarks/train_step_contenders.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.common import alternate, timed
from benchmarks.train_step_contenders import (
    COMPILED_WARMUP_STEPS, Candidate, Contender, candidates, check_same_workload, default_precisions, profile,
    step_memory_bytes,
)
from benchmarks.train_step_report import dtype_peaks, mib, report_line, results_table
from training.allocator import retain_freed_memory
from training.mfu import TRAIN_FLOPS_PER_FORWARD_FLOP, native_bf16
from zoo import presets
from zoo.describe import describe
from zoo.overrides import SpecError, apply_sets
from zoo.specs import RunSpec

REPO = Path(__file__).resolve().parents[1]
HF_EXPERTS = ("eager", "batched_mm", "grouped_mm")
HF_ATTENTION = ("eager", "sdpa")
PRECISIONS = ("fp32", "bf16")


def probe(pool: list[Candidate], args, device: torch.device) -> list[dict]:
    """Each candidate in a child process of its own (one that runs out of memory is reported, not
    fatal): its best step time over `--probe-steps` steps after a warm-up step, and its peak memory."""
    results = []
    for candidate in pool:
        command = [sys.executable, "-m", "benchmarks.train_step", "--preset", args.preset, "--device", str(device),
                   "--probe-steps", str(args.probe_steps), "--child", json.dumps(asdict(candidate))]
        command += [f"--set={s}" for s in args.sets]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode == 0:
            row = json.loads(done.stdout.strip().splitlines()[-1])
            shown = f"{row['seconds'] * 1e3:8.1f} ms  peak step memory {mib(row['step_bytes']):>6} MiB"
        else:
            last = (done.stderr.strip().splitlines() or [""])[-1][:160]
            killed = done.returncode < 0 or done.returncode == 137
            row = {"error": "killed (out of memory?)" if killed else last}
            shown = f"failed: {row['error']}"
        results.append({"candidate": candidate, **row})
        print(f"  probe {candidate.label:<48} {shown}", file=sys.stderr, flush=True)
    return results


def fastest(results: list[dict], side: str) -> dict | None:
    ok = [r for r in results if r["candidate"].side == side and "seconds" in r]
    return min(ok, key=lambda r: r["seconds"]) if ok else None


def child(candidate_json: str, spec: RunSpec, device: torch.device, steps: int) -> None:
    """One probe: build, warm up, time `steps` steps, then measure one more step's memory; print the
    best time and that peak step memory (bytes, or null where it cannot be measured)."""
    if device.type == "cpu":  # fail with an error rather than wake the kernel's OOM killer
        available = _available_memory_bytes()
        if available:
            resource.setrlimit(resource.RLIMIT_DATA, (int(0.85 * available), resource.RLIM_INFINITY))
    contender = Contender(Candidate(**json.loads(candidate_json)), spec, device)
    for _ in range(COMPILED_WARMUP_STEPS if contender.candidate.compile else 1):
        contender.step()  # warm-up: allocations, kernel choice, compilation, AdamW's state
    seconds = min(timed(contender.step, device) for _ in range(steps))
    print(json.dumps({"seconds": seconds, "step_bytes": step_memory_bytes(contender)}))


def _available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="perf_w1")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", dest="sets")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", type=lambda s: s.split(","),
                        help="fp32,bf16 (default: bf16 only where the device has native bf16; training/precision.py)")
    parser.add_argument("--compile", action="store_true",
                        help="also probe torch.compile: the zoo, and transformers with grouped_mm experts and SDPA")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="the zoo alone")
    parser.add_argument("--hf-experts", default=",".join(HF_EXPERTS), type=lambda s: s.split(","))
    parser.add_argument("--hf-attention", default=",".join(HF_ATTENTION), type=lambda s: s.split(","))
    parser.add_argument("--probe-steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--profile", type=Path, help="write an operator profile of the zoo's winner here")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    retain_freed_memory()  # as the trainer does; process-wide, so transformers' steps get it too
    try:
        spec = apply_sets(presets.get(args.preset), args.sets)
    except (KeyError, SpecError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    bf16_note = args.precisions is None and not native_bf16(device)
    args.precisions = args.precisions or default_precisions(device)
    for name in args.precisions:
        if name not in PRECISIONS:
            parser.error(f"--precisions: {name!r} is not one of {', '.join(PRECISIONS)}")
    for path in (args.json, args.profile):
        if path is not None and not path.parent.is_dir():
            print(f"error: {path}: directory {path.parent} does not exist", file=sys.stderr)
            return 2
    if args.child:
        child(args.child, spec, device, args.probe_steps)
        return 0

    tokens = spec.train.micro_batch_size * spec.data.seq_len
    flops_per_token = describe(spec, seq_len=spec.data.seq_len)["flops_per_token"]
    print(f"{args.preset}: batch {spec.train.micro_batch_size} x {spec.data.seq_len} tokens, "
          f"{flops_per_token / 1e6:.2f} MFLOP/token forward ({TRAIN_FLOPS_PER_FORWARD_FLOP}x for a train step), "
          f"device {device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    result: dict = {"preset": args.preset, "sets": args.sets, "tokens_per_step": tokens,
                    "forward_flops_per_token": flops_per_token, "device": str(device)}
    if args.hf:
        try:
            zoo_loss, hf_loss, logits_diff = check_same_workload(spec, device)
        except SpecError as err:
            print(f"error: transformers cannot run this spec: {err}; use --no-hf for the zoo alone", file=sys.stderr)
            return 2
        print(f"same workload: fp32 loss of one batch, zoo {zoo_loss:.6f}, transformers {hf_loss:.6f}; "
              f"logits differ by at most {logits_diff:.1e}")
        result["fp32_loss"] = {"zoo": zoo_loss, "transformers": hf_loss}
        result["fp32_logits_max_abs_diff"] = logits_diff

    if bf16_note:
        print(f"bf16 left out: this {device.type} has no native bf16 matmul (training/mfu.py); "
              "--precisions fp32,bf16 forces it", file=sys.stderr)
    zoo_pool, hf_pool = candidates(args)
    print("probing (best of %d steps after a warm-up):" % args.probe_steps, file=sys.stderr)
    probes = probe(zoo_pool + hf_pool, args, device)
    result["probes"] = [{"label": r["candidate"].label, **{k: v for k, v in r.items() if k != "candidate"}}
                        for r in probes]
    best = {side: fastest(probes, side) for side in ("zoo", "transformers")}
    winners = {side: r["candidate"] for side, r in best.items() if r is not None}
    if "zoo" not in winners:
        print("error: no zoo candidate ran; see the probe lines above", file=sys.stderr)
        return 1

    contenders = {side: Contender(c, spec, device) for side, c in winners.items()}
    warmup = max(args.warmup, COMPILED_WARMUP_STEPS if any(c.compile for c in winners.values()) else 0)
    print(f"alternating {' / '.join(c.label for c in winners.values())}: {warmup} warm-up + {args.reps} "
          "timed steps each", file=sys.stderr)
    times = alternate({side: c.step for side, c in contenders.items()}, device, warmup=warmup, reps=args.reps,
                      progress=lambda r: print(f"  round {r}/{args.reps}", file=sys.stderr, flush=True))
    peaks = dtype_peaks(sorted({c.precision for c in winners.values()}, key=PRECISIONS.index), device)
    result["peak_flops"] = peaks
    rows = {}
    for side, candidate in winners.items():
        rows[side] = report_line(candidate.label, times[side], tokens, flops_per_token, peaks[candidate.precision])
        rows[side]["peak_step_memory_bytes"] = best[side]["step_bytes"]
    result["results"] = rows
    print("\n" + "\n".join(results_table(rows, peaks, device)))
    if "transformers" in rows:
        ratio = rows["transformers"]["step_ms"] / rows["zoo"]["step_ms"]
        result["speedup"] = ratio
        print(f"zoo / transformers speed: {ratio:.2f}x (median step times, {args.reps} alternating rounds)")
    if args.profile:
        table = profile(contenders["zoo"], args.profile)
        print(f"\nprofile of {winners['zoo'].label} written to {args.profile}; top operators:\n"
              + "\n".join(table.splitlines()[:16]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    status = main()
    print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    sys.exit(status)
