"""The trainer's per-phase timing (training/timing.py), the CUDA event path included, without a GPU."""

import time

import pytest
import torch

from training.timing import PhaseTimer, shares


class FakeEvent:
    """torch.cuda.Event's timing interface on the host clock; counts the waits the timer makes."""

    waits = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = time.perf_counter()

    def synchronize(self):
        FakeEvent.waits += 1

    def elapsed_time(self, end):
        return (end.at - self.at) * 1000  # milliseconds, as CUDA reports


@pytest.mark.parametrize("event", [None, FakeEvent])
def test_phases_nest_and_the_optimizer_leaves_zero(event):
    FakeEvent.waits = 0
    timer = PhaseTimer(event)
    with timer.phase("forward"):
        time.sleep(0.02)
    with timer.phase("optimizer"):
        with timer.phase("newton_schulz"):
            time.sleep(0.03)
        time.sleep(0.01)
    if event is not None:
        assert FakeEvent.waits == 0  # nothing waits on the device until the log reads the events
    window = timer.take()
    assert FakeEvent.waits == (1 if event else 0)
    assert set(window) == {"forward", "newton_schulz", "zero"}
    assert window["forward"] == pytest.approx(0.02, abs=0.01)
    assert window["newton_schulz"] == pytest.approx(0.03, abs=0.01)
    assert window["zero"] == pytest.approx(0.01, abs=0.008)
    assert timer.take() == {}  # the window restarts; the run's totals keep what was taken
    assert timer.totals["forward"] == window["forward"]


def test_optimizer_steps_are_timed_through_torch_hooks():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    timer = PhaseTimer()
    timer.watch_optimizer(optimizer)
    param.grad = torch.ones(3)
    optimizer.step()
    optimizer.step()
    assert set(timer.take()) == {"adamw"} and param.detach().tolist() == pytest.approx([0.8] * 3)


def test_shares_name_what_no_phase_covers():
    line = shares({"forward": 3.0, "backward": 5.0, "newton_schulz": 1.0}, wall=10.0)
    assert line == "forward 30%, backward 50%, newton_schulz 10%, other 10%"
