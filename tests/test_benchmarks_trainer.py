"""benchmarks/trainer_overhead.py: the trainer's step beside the bare step, on a toy model."""

import json
import os
import subprocess
import sys

import pytest

from training.muon import newton_schulz_flops
from training.optim import optimizer_groups
from zoo import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(tmp_path, *flags) -> dict:
    out = tmp_path / ("per_matrix" if flags else "batched")
    env = {**os.environ, "ZOO_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.trainer_overhead", "--preset", "deepseek_glm4", "--tiny",
                           "--warmup", "1", "--reps", "2", "--set", "train.grad_accum=2", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".txt").read_text().startswith("deepseek_glm4 (train.grad_accum=2")
    return report


@pytest.mark.slow
def test_trainer_overhead_reports_the_split_and_newton_schulz_flops(tmp_path):
    import zoo
    from zoo.overrides import with_changes

    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"train.grad_accum": 2})
    model = zoo.build(spec)
    muon = next(g for g in optimizer_groups(model, spec) if g["name"] == "muon")
    expected_flops = sum(newton_schulz_flops(tuple(p.shape), muon["ns_method"]) for p in muon["params"])
    batched, per_matrix = _bench(tmp_path), _bench(tmp_path, "--per-matrix")
    for report in (batched, per_matrix):
        assert report["tokens_per_step"] == spec.train.micro_batch_size * 2 * spec.data.seq_len
        assert len(report["step_seconds"]["trainer"]) == len(report["step_seconds"]["bare"]) == 2
        assert report["ratio"] == pytest.approx(report["tokens_per_s"]["trainer"] / report["tokens_per_s"]["bare"])
        phases = report["phase_seconds"]
        assert {"data", "forward", "backward", "newton_schulz", "adamw", "zero"} <= set(phases)
        # The phases are per step and fit inside the slowest timed trainer step.
        assert 0 < sum(phases.values()) <= max(report["step_seconds"]["trainer"])
        # One orthogonalisation of every Muon matrix a step, whichever way it runs.
        assert report["newton_schulz_flops"] == pytest.approx(expected_flops)
        memory = report["memory_bytes"]
        assert memory["peak"] == memory["weights"] + memory["gradients"] + memory["optimizer_states"] + memory["rest"]
        assert memory["weights"] > 0 and memory["optimizer_states"] > 0
    assert per_matrix["per_matrix"] and not batched["per_matrix"]
