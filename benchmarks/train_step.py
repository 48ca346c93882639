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

Like the trainer, the benchmark keeps freed CPU memory for reuse (`training/allocator.py`); that is
process-wide, so both sides get it. Each probe runs in a child process of its own, so that one
which runs out of memory (transformers' batched_mm gathers a weight matrix per token) is reported
and skipped, and so that peak memory is measurable. Peak step memory is what one more train step,
after the warm-up and the timed ones, needs beyond what persists between steps: activations,
gradients and temporaries, not the weights, nor AdamW's state (created in the warm-up step), nor
compiled code. On CUDA: the allocator's peak during that step less what it held before it. On CPU:
freed memory is handed back to the OS first (`benchmarks.common.release_freed_memory`), then the
resident high-water mark (VmHWM, reset just before the step) less the resident set before it; n/a
where Linux's /proc/self/clear_refs is missing (getrusage's peak includes the parent's).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    alternate, current_rss_bytes, median, peak_rss_bytes, release_freed_memory, reset_peak_rss, spread, synchronize,
    timed,
)
from training.allocator import retain_freed_memory
from training.mfu import (
    MFU_ABOVE_PEAK_NOTE, TRAIN_FLOPS_PER_FORWARD_FLOP, BusyPeakWarning, datasheet_peak_flops, format_mfu,
    measured_peak_flops, native_bf16,
)
from zoo import presets
from zoo.builders import build
from zoo.describe import describe
from zoo.overrides import SpecError, apply_sets
from zoo.specs import RunSpec

REPO = Path(__file__).resolve().parents[1]
HF_EXPERTS = ("eager", "batched_mm", "grouped_mm")
HF_ATTENTION = ("eager", "sdpa")
PRECISIONS = ("fp32", "bf16")
LOSS_TOLERANCE = 1e-3  # fp32 loss of the same batch, zoo vs transformers
# Largest |difference| of their fp32 logits. Measured: 0 (W1 in full, batch 1) to 1.2e-6 (W2 at two layers;
# W1 at toy size 6.6e-7), summation order alone; 1e-3 leaves ~1000x for larger models. A 1% change of
# routed_scaling_factor moves the toy logits by 2e-2 but its loss by 2.8e-4, which LOSS_TOLERANCE lets through.
LOGITS_TOLERANCE = 1e-3
COMPILED_WARMUP_STEPS = 4  # a compiled model's steps 2-4 still ran ~1.7x slower than later ones here
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Candidate:
    side: str  # "zoo" or "transformers"
    precision: str  # "fp32" or "bf16" (autocast)
    experts: str = ""  # transformers' experts_implementation
    attention: str = ""  # transformers' attn_implementation
    compile: bool = False  # torch.compile the model

    @property
    def label(self) -> str:
        compiled = " compiled" if self.compile else ""
        if self.side == "zoo":
            return f"zoo {self.precision}{compiled}"
        return f"transformers {self.precision} experts={self.experts} attn={self.attention}{compiled}"


class Contender:
    """A model, its optimizer and one batch: `step()` runs one train step and returns the loss."""

    def __init__(self, candidate: Candidate, spec: RunSpec, device: torch.device, seed: int = 0):
        self.candidate = candidate
        torch.manual_seed(seed)
        zoo_model = build(spec).to(device)
        if candidate.side == "zoo":
            self.model = torch.compile(zoo_model) if candidate.compile else zoo_model
        else:
            from zoo.interop.hf import to_hf_model

            self.model = to_hf_model(zoo_model, spec, attn_implementation=candidate.attention,
                                     experts_implementation=candidate.experts)
            if candidate.compile:
                self.model = torch.compile(self.model)
            del zoo_model
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, **_fused_or_foreach(device))
        generator = torch.Generator().manual_seed(seed)
        shape = (spec.train.micro_batch_size, spec.data.seq_len)
        self.ids = torch.randint(0, spec.model.vocab_size, shape, generator=generator).to(device)
        self.device = device
        self.loss_only = {"return_logits": False} if candidate.side == "zoo" else {}  # transformers has no such option
        self.autocast = DTYPES[candidate.precision] if candidate.precision != "fp32" else None

    def step(self) -> float:
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            loss = self.model(self.ids, labels=self.ids, **self.loss_only).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def fp32_forward(self) -> tuple[float, torch.Tensor]:
        """Cross-entropy of the batch in fp32, without an auxiliary loss, and the logits (B, T, V)."""
        out = self.model(self.ids, labels=self.ids)
        loss = getattr(out, "ce_loss", None) if getattr(out, "ce_loss", None) is not None else out.loss
        return float(loss), out.logits.float()


def default_precisions(device: torch.device) -> list[str]:
    """fp32, and bf16 autocast where the device computes bf16 natively (on a CPU without bf16
    instructions a bf16 probe would take hundreds of times longer and could not win)."""
    return ["fp32", "bf16"] if native_bf16(device) else ["fp32"]


def _fused_or_foreach(device: torch.device) -> dict:
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


def candidates(args) -> tuple[list[Candidate], list[Candidate]]:
    zoo = [Candidate("zoo", p, compile=c) for p in args.precisions for c in ((False, True) if args.compile else (False,))]
    hf = [Candidate("transformers", p, experts=e, attention=a)
          for p, e, a in itertools.product(args.precisions, args.hf_experts, args.hf_attention)]
    if args.compile:  # compiling every transformers combination would take minutes each: its likeliest best
        hf += [Candidate("transformers", p, experts="grouped_mm", attention="sdpa", compile=True) for p in args.precisions]
    return zoo, (hf if args.hf else [])


def check_same_workload(spec: RunSpec, device: torch.device) -> tuple[float, float, float]:
    """The zoo's and transformers' fp32 losses of one batch, and the largest |difference| of their
    logits; stops the benchmark where either differs by more than its tolerance."""
    zoo = Contender(Candidate("zoo", "fp32"), spec, device)
    hf = Contender(Candidate("transformers", "fp32", experts="eager", attention="sdpa"), spec, device)
    (zoo_loss, zoo_logits), (hf_loss, hf_logits) = zoo.fp32_forward(), hf.fp32_forward()
    logits_diff = (zoo_logits - hf_logits).abs().max().item()
    if abs(zoo_loss - hf_loss) > LOSS_TOLERANCE or not logits_diff <= LOGITS_TOLERANCE:  # NaN fails too
        raise SystemExit(f"error: the zoo's fp32 loss {zoo_loss:.6f} and transformers' {hf_loss:.6f} (tolerance "
                         f"{LOSS_TOLERANCE}), their logits differ by up to {logits_diff:.2e} (tolerance "
                         f"{LOGITS_TOLERANCE}): the two models do not run the same workload")
    return zoo_loss, hf_loss, logits_diff


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
            shown = f"{row['seconds'] * 1e3:8.1f} ms  peak step memory {_mib(row['step_bytes']):>6} MiB"
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


def step_memory_bytes(contender: Contender) -> int | None:
    """Peak memory of one train step beyond what persists between steps (see the module's doc);
    None on a CPU without /proc/self/clear_refs. Runs the step after the timed ones: returning freed
    memory to the OS first would make a timed step page it in again."""
    device = contender.device
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        contender.step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    release_freed_memory()
    before = current_rss_bytes()
    if not reset_peak_rss():
        return None
    contender.step()
    return peak_rss_bytes() - before


def _mib(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 2**20:.0f}"


def _available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def profile(contender: Contender, path: Path, rows: int = 30) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if contender.device.type == "cuda" else [])
    contender.step()
    synchronize(contender.device)
    start = time.perf_counter()
    with torch_profile(activities=activities, record_shapes=False) as prof:
        for _ in range(2):
            contender.step()
        synchronize(contender.device)
    wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    header = f"{contender.candidate.label}: 2 train steps, {wall_ms:.1f} ms wall under the profiler"
    if contender.device.type == "cuda":
        from torch.autograd import DeviceType

        on_device = [e for e in events if e.device_type == DeviceType.CUDA]  # kernels and copies (as table's total)
        busy_ms = sum(e.self_device_time_total for e in on_device) / 1e3
        header += (f"; kernels and copies {busy_ms:.1f} ms of it ({busy_ms / wall_ms:.0%} busy, "
                   f"{sum(e.count for e in on_device)} launches)")
    table = events.table(sort_by="self_cuda_time_total" if contender.device.type == "cuda" else "self_cpu_time_total",
                         row_limit=rows)
    path.write_text(f"{header}\n{table}\n")
    return f"{header}\n{table}"


def dtype_peaks(precisions, device: torch.device) -> dict[str, dict]:
    """Each precision's matmul peaks, each measured or looked up once: "measured" (MFU's; None where
    there is none: bf16 on a CPU without bf16 instructions), "datasheet" (None off the table) and
    "busy" (measured while other processes used the CPU: too low, so that MFU reads high; said on
    stderr in one line)."""
    peaks = {}
    for name in precisions:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BusyPeakWarning)
            measured = measured_peak_flops(DTYPES[name], device)
        busy = [w for w in caught if issubclass(w.category, BusyPeakWarning)]
        for warning in busy:
            print(f"warning: {warning.message}", file=sys.stderr)
        peaks[name] = {"measured": None if math.isnan(measured) else measured,
                       "datasheet": datasheet_peak_flops(DTYPES[name], device), "busy": bool(busy)}
    return peaks


def report_line(label: str, seconds: list[float], tokens: int, flops_per_token: float, peaks: dict) -> dict:
    """One row of results; `peaks`: one precision's entry of `dtype_peaks`."""
    step = median(seconds)
    tps = tokens / step
    achieved = tps * flops_per_token * TRAIN_FLOPS_PER_FORWARD_FLOP
    row = {"label": label, "step_ms": step * 1e3, "spread": spread(seconds), "tokens_per_s": tps,
           "achieved_flops": achieved, "peak_flops": peaks["measured"],
           "mfu": achieved / peaks["measured"] if peaks["measured"] else None}
    if peaks["datasheet"]:
        row.update(datasheet_peak_flops=peaks["datasheet"], mfu_datasheet=achieved / peaks["datasheet"])
    row["mfu_above_peak"] = any(row.get(key) is not None and row[key] > 1 for key in ("mfu", "mfu_datasheet"))
    return row


def _flops(rate: float) -> str:
    return f"{rate / 1e12:,.0f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:,.0f} GFLOP/s"


def results_table(rows: dict[str, dict], peaks: dict[str, dict], device: torch.device) -> list[str]:
    """The printed results: a row per side, then what each MFU is against."""
    lines = [f"{'':<52}{'step ms':>9}{'':>6}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>8}{'mem MiB':>9}"]
    for row in rows.values():
        lines.append(f"{row['label']:<52}{row['step_ms']:>9.1f}{row['spread']:>6}{row['tokens_per_s']:>10,.0f}"
                     f"{row['achieved_flops'] / 1e9:>9.1f}{format_mfu(row['mfu']):>8}"
                     f"{_mib(row.get('peak_step_memory_bytes')):>9}")
    shown = []
    for name, peak in peaks.items():
        if peak["measured"]:
            shown.append(f"{name} {_flops(peak['measured'])}")
        elif device.type == "cpu" and name == "bf16":
            shown.append("bf16 n/a (this CPU has no bf16 instructions: bf16 is emulated and has no meaningful peak)")
        else:
            shown.append(f"{name} n/a")
    lines.append(f"MFU: against the matmul peak measured on this {device.type} for the row's dtype (square matmuls, "
                 "best of several, training/mfu.py): " + ", ".join(shown))
    datasheet = {name: peak["datasheet"] for name, peak in peaks.items() if peak["datasheet"]}
    if datasheet:
        lines.append("MFU against the datasheet's peak instead ("
                     + ", ".join(f"{name} {_flops(value)}" for name, value in datasheet.items()) + "): "
                     + ", ".join(f"{row['label']} {format_mfu(row.get('mfu_datasheet'))}" for row in rows.values()))
    if any(row["mfu_above_peak"] for row in rows.values()):
        lines.append(MFU_ABOVE_PEAK_NOTE)
    return lines


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
