"""Where a run's time goes: seconds per phase, cheap enough to stay on.

On a CPU a phase is the wall time between two `time.perf_counter()` reads. On a GPU it is the time
between two CUDA events recorded on the stream, read only when the trainer logs (it synchronises
there anyway), so timing adds no host sync to a step.

Phases: `data` (the next batch to the device), `forward`, `backward` (with ZeRO's gradient reduction,
which DeepSpeed runs in backward hooks), `optimizer` (engine.step(): everything the update costs)
split into `newton_schulz` (Muon's orthogonalisation, ZeRO-1/2), `adamw` (the inner optimizer's
step: AdamW, and Muon's orthogonalised update applied to the weights) and `zero` (the rest: norms,
clipping, flattening, copies and communication), `evaluation`, `checkpoint`, `logging`; `other` is
the step's wall time that no phase covers (the all-reduce of losses and expert loads, the routing
bias update, the non-finite checks).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch

OPTIMIZER_PARTS = ("newton_schulz", "adamw")  # timed inside `optimizer`; `zero` is what they leave
ORDER = ("data", "forward", "backward", "newton_schulz", "adamw", "zero", "evaluation", "checkpoint", "logging",
         "other")


def no_phase(name: str):
    """A stand-in for `PhaseTimer.phase` where nothing is timed."""
    return nullcontext()


class PhaseTimer:
    """Seconds per phase since the last `take()`, and over the whole run (`totals`).

    `event`: the CUDA event class on a GPU (None on a CPU); tests pass a stand-in with the same
    record/synchronize/elapsed_time methods to check the event path without a GPU."""

    def __init__(self, event=None):
        self.event = event
        self.pending: list[tuple[str, object, object]] = []  # (phase, start event, end event), unread
        self.window: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)
        self.open: dict[str, object] = {}

    @classmethod
    def for_device(cls, device: torch.device) -> PhaseTimer:
        return cls(torch.cuda.Event if device.type == "cuda" else None)

    def _mark(self):
        if self.event is None:
            return time.perf_counter()
        event = self.event(enable_timing=True)
        event.record()
        return event

    def start(self, name: str) -> None:
        self.open[name] = self._mark()

    def stop(self, name: str) -> None:
        start, end = self.open.pop(name), self._mark()
        if self.event is None:
            self.window[name] += end - start
        else:
            self.pending.append((name, start, end))

    @contextmanager
    def phase(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def watch_optimizer(self, optimizer: torch.optim.Optimizer, name: str = "adamw") -> None:
        """Time every `optimizer.step()` as phase `name` (torch's step hooks)."""
        optimizer.register_step_pre_hook(lambda *_: self.start(name))
        optimizer.register_step_post_hook(lambda *_: self.stop(name))

    def take(self) -> dict[str, float]:
        """The seconds each phase took since the last call (reading the CUDA events: one wait for the
        last of them), with `zero` split out of `optimizer`; added to `totals`."""
        if self.pending:
            self.pending[-1][2].synchronize()
            for name, start, end in self.pending:
                self.window[name] += start.elapsed_time(end) / 1000
            self.pending = []
        window, self.window = dict(self.window), defaultdict(float)
        if "optimizer" in window:
            window["zero"] = max(0.0, window.pop("optimizer") - sum(window.get(p, 0.0) for p in OPTIMIZER_PARTS))
        for name, seconds in window.items():
            self.totals[name] += seconds
        return window


def shares(totals: dict[str, float], wall: float) -> str:
    """'forward 31%, backward 35%, ...' of `wall`, with `other` the wall time no phase covers."""
    parts = {name: totals[name] for name in ORDER if totals.get(name)}
    parts["other"] = max(0.0, wall - sum(parts.values()))
    return ", ".join(f"{name} {100 * seconds / wall:.0f}%" for name, seconds in parts.items() if wall > 0)
