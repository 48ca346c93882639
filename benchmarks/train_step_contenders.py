"""The train-step benchmark's contenders: a model (the zoo's, or transformers' with the zoo's weights),
its optimizer and one batch, and what is measured of one: its loss against the other side's, its peak
step memory, an operator profile.

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

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import current_rss_bytes, peak_rss_bytes, release_freed_memory, reset_peak_rss, synchronize
from training.mfu import native_bf16
from zoo.builders import build
from zoo.specs import RunSpec

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
