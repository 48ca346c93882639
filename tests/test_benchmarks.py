"""The benchmarks run end to end at toy size and report what they claim to measure."""

import argparse
import json

import pytest

from benchmarks import moe_layer, train_step

TOY = ["model.n_layers=1", "model.vocab_size=256", "data.seq_len=32", "train.micro_batch_size=2"]


@pytest.mark.slow
def test_train_step_benchmark_compares_the_same_workload(tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = ["--preset", "perf_w1", *[f"--set={s}" for s in TOY], "--hf-experts", "eager", "--hf-attention", "sdpa",
            "--precisions", "fp32,bf16", "--probe-steps", "1", "--warmup", "1", "--reps", "2", "--json", str(out)]
    assert train_step.main(argv) == 0
    result = json.loads(out.read_text())
    losses = result["fp32_loss"]
    assert abs(losses["zoo"] - losses["transformers"]) < train_step.LOSS_TOLERANCE
    assert len(result["probes"]) == 4 and all(p.get("seconds", 0) > 0 for p in result["probes"])
    for side in ("zoo", "transformers"):
        row = result["results"][side]
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_step_memory_bytes"] >= 0
        assert row["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / (row["step_ms"] / 1e3))
    assert result["speedup"] == pytest.approx(result["results"]["transformers"]["step_ms"]
                                              / result["results"]["zoo"]["step_ms"])
    assert "zoo / transformers speed" in capsys.readouterr().out


@pytest.mark.parametrize("native", [True, False])
def test_train_step_probes_bf16_only_where_the_device_has_it(monkeypatch, native):
    import torch

    monkeypatch.setattr(train_step, "native_bf16", lambda device: native)
    assert train_step.default_precisions(torch.device("cpu")) == (["fp32", "bf16"] if native else ["fp32"])


@pytest.mark.parametrize("argv,words", [
    (["--preset", "perf_w1", "--set", "model.nosuch=1"], "nosuch"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "perf_w1", "--json", "/nonexistent/dir/r.json"], "does not exist"),
    (["--preset", "baseline", "--set", "model.n_layers=1"], "--no-hf"),  # a softmax router: no HF format
])
def test_train_step_benchmark_bad_input_is_one_line_exit_2(argv, words, capsys):
    assert train_step.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("skew", [0.0, 0.4], ids=["balanced", "unequal-loads"])
def test_moe_layer_dispatchers_agree_with_the_fp32_reference(skew):
    args = argparse.Namespace(hf_experts=["eager", "grouped_mm"], warmup=0, reps=1, skew=skew)
    rows = moe_layer.run(moe_layer.WORKLOADS["w1"], "bf16", args)
    names = [r["name"] for r in rows]
    assert names[:3] == ["zoo grouped_mm", "zoo padded_bmm", "zoo loop"] and names[-1].startswith("dense")
    for row in rows[:-1]:
        assert row["ms"] > 0, row
        out_err, dx_err = (float(part.split()[1]) for part in row["check"].split(", "))
        assert out_err < 2e-2 and dx_err < 2e-2, row


def test_moe_layer_skew_makes_expert_loads_unequal():
    import torch

    def imbalance(skew):
        w = moe_layer.WORKLOADS["w2"]
        counts = torch.bincount(moe_layer.routing(w, skew=skew)[1].flatten(), minlength=w.n_experts).float()
        return (counts.max() / counts.mean()).item()

    assert imbalance(0.0) < 1.5 < 3.0 < imbalance(0.4)
