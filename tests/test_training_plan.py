"""The plan (training/plan.py): bad input refused before training in one line with exit status 2, and
what --resume may and may not change."""

import json
import re

import pytest

from training import checkpoints, plan, trainer
from training.data import DataError
from training.errors import TrainingError
from training.optim import lr_factor
from zoo import presets
from zoo.checkpoint import CHECKPOINTS, COMPLETE, LATEST
from zoo.overrides import with_changes
from zoo.presets import resolve

from _training import ROOT, train, write_text
from _training import cache_dir  # noqa: F401  (fixtures)


@pytest.mark.parametrize("case", ["preset", *(pytest.param(case, marks=pytest.mark.slow) for case in (
    "path", "empty", "seq_len", "fp16", "resume", "ds_config", "ds_precision", "ds_not_object", "ds_bf16_bool",
    "ds_zero_int", "ds_bad_value", "ds_spec_path", "stop_after_zero", "stop_after_past", "hellaswag_too_long"))])
def test_bad_input_is_one_line(cache_dir, tmp_path, case):
    out = tmp_path / "run"
    args, words = {
        "preset": (["--preset", "nope"], ["unknown preset 'nope'"]),
        "path": (["--set", "data.source=/no/such/file.txt"], ["/no/such/file.txt"]),
        "empty": (["--set", f"data.source={write_text(tmp_path / 'empty.txt', '')}"], ["empty"]),
        "seq_len": (["--set", "data.seq_len=4096"], ["data.seq_len (4096)", "max_seq_len"]),
        "fp16": (["--set", "train.precision=fp16"], ["fp16", "CPU"]),
        "resume": (["--resume"], ["--resume", "no complete checkpoint"]),
        "ds_config": (["--ds-config", str(write_text(tmp_path / "c.json", '{"gradient_clipping": 5.0}'))],
                      ["gradient_clipping=5.0", "train.grad_clip=1.0"]),
        "ds_precision": (["--set", "train.precision=fp32", "--ds-config",
                          str(write_text(tmp_path / "p.json", '{"bf16": {"enabled": true}}'))],
                         ["enabled=True", "train.precision='fp32', so bf16.enabled=False"]),
        "ds_not_object": (["--ds-config", str(write_text(tmp_path / "l.json", "[1, 2]"))], ["l.json", "JSON list", "object"]),
        "ds_bf16_bool": (["--ds-config", str(write_text(tmp_path / "b.json", '{"bf16": true}'))],
                         ["b.json", '"bf16": true', "must be an object"]),
        "ds_zero_int": (["--ds-config", str(write_text(tmp_path / "z.json", '{"zero_optimization": 2}'))],
                        ["z.json", '"zero_optimization": 2', "must be an object"]),
        "ds_bad_value": (["--set", "train.steps=1", "--ds-config",
                          str(write_text(tmp_path / "v.json", '{"zero_optimization": {"reduce_bucket_size": "lots"}}'))],
                         ["v.json", "zero_optimization.reduce_bucket_size='lots'", "valid integer"]),
        "ds_spec_path": (["--set", "deepspeed.config=/nope.json"], ["deepspeed.config=/nope.json does not exist"]),
        "stop_after_zero": (["--stop-after", "0"], ["--stop-after 0", "train.steps=2"]),
        "stop_after_past": (["--stop-after", "3"], ["--stop-after 3", "train.steps=2"]),
        # Found before step 1, not at the first evaluation, which would stop the run before that step's checkpoint.
        "hellaswag_too_long": (["--set", "data.seq_len=64", "--set", "eval.hellaswag_limit=50", "--set",
                                f"eval.hellaswag_path={ROOT.parent / 'shared' / 'data' / 'hellaswag_val.jsonl'}"],
                               ["eval.hellaswag_limit=50", "longer than 64 tokens", "raise data.seq_len and model.max_seq_len to >="]),
    }[case]
    proc = train(cache_dir, out, *args)
    assert proc.returncode == 2, proc.stderr
    assert "step 1/" not in proc.stdout and not (out / "checkpoints").exists(), proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len([l for l in lines if "error" in l]) == 1, proc.stderr
    for word in words:
        assert word.lower() in proc.stderr.lower(), proc.stderr


def test_resume_with_more_steps_says_how_the_lr_moves(tmp_path, capsys):
    run = tmp_path / "run"
    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"train.steps": 100, "train.warmup_steps": 10})
    (run / "checkpoints" / "step_0000100").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_0000100")
    (run / "spec.json").write_text(spec.model_dump_json())
    checkpoints.write_split_version(run)  # as the trainer writes it: this zoo's split
    extended, _, start = plan.resolve_run(trainer.parse_args(["--out", str(run), "--resume",
                                                                 "--set", "train.steps=300"]))
    assert start == 100 and extended.train.steps == 300
    before, after = lr_factor(99, spec), lr_factor(100, extended)
    assert after > 5 * before  # the cosine restarts high: worth a line
    assert f"factor goes from {before:.3f} (step 100) to {after:.3f} (step 101)" in capsys.readouterr().out


def test_resume_across_a_new_split_version_is_refused_before_the_data(tmp_path):
    """The split version is read from the run folder by resolve_run, before the data is prepared: a new
    split trains another tokenizer, and build() would blame that on the corpus. A run folder without
    split.json (started before versions) is version 1."""
    run = tmp_path / "run"
    (run / CHECKPOINTS / "step_0000002").mkdir(parents=True)
    write_text(run / "spec.json", resolve("dense", ["train.steps=3"], tiny=True).model_dump_json())
    write_text(run / CHECKPOINTS / "step_0000002" / COMPLETE, "step_0000002\n")
    write_text(run / CHECKPOINTS / LATEST, "step_0000002")
    args = trainer.parse_args(["--out", str(run), "--resume"])
    with pytest.raises(DataError, match=r"split changed since the run started \(split version 1 -> 2\)"):
        plan.resolve_run(args)
    checkpoints.write_split_version(run)
    assert checkpoints.read_split_version(run) == 2 and plan.resolve_run(args)[2] == 2


@pytest.mark.slow
def test_resume_refuses_what_it_cannot_continue_and_keeps_its_ds_config(cache_dir, tmp_path):
    out = tmp_path / "run"
    custom = write_text(tmp_path / "custom.json", '{"zero_optimization": {"stage": "auto", "reduce_bucket_size": 123456}}')
    common = ["--set", "train.eval_every=100", "--set", "train.precision=fp32"]
    first = train(cache_dir, out, "--set", "train.steps=3", "--stop-after", "2", "--ds-config", str(custom), *common)
    assert first.returncode == 0, first.stderr
    spec_json = (out / "spec.json").read_text()

    def refused(*args, words):
        # In process where the refusal comes from resolve_run (before anything starts): the one-line
        # printing is main's, checked through a subprocess by the last case and test_bad_input_is_one_line.
        with pytest.raises(TrainingError) as caught:
            plan.resolve_run(trainer.parse_args(["--out", str(out), "--resume", *args]))
        for word in words:
            assert word in str(caught.value)

    refused("--stop-after", "2", words=["--stop-after 2", "(step 2)"])  # not a step this run reaches
    refused("--set", "train.steps=1", words=["checkpoint is at step 2", "train.steps=1"])  # behind the checkpoint
    refused("--preset", "dense", words=["drop --preset"])  # the model comes from spec.json
    refused("--tiny", words=["drop --tiny"])
    # The validation set: val/loss after the resume would be scored on other tokens, on the same curve.
    refused("--set", "eval.val_blocks=1", words=["cannot change eval.val_blocks"])
    proc = train(cache_dir, out, "--resume", "--ds-config", str(ROOT / "ds_configs" / "zero1_fp32.json"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "differs" in proc.stderr and "zero_optimization" in proc.stderr
    assert (out / "spec.json").read_text() == spec_json
    # HellaSwag endings longer than the run's 64 tokens: a resumed run cannot raise data.seq_len, so the
    # message offers only a lower eval.hellaswag_limit.
    hellaswag = ROOT.parent / "shared" / "data" / "hellaswag_val.jsonl"
    proc = train(cache_dir, out, "--resume", "--set", "eval.hellaswag_limit=50", "--set", f"eval.hellaswag_path={hellaswag}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "set eval.hellaswag_limit <= 8" in proc.stderr and "data.seq_len" not in proc.stderr, proc.stderr
    # Without --ds-config the run resumes with the one it started with, not the shipped default.
    second = train(cache_dir, out, "--resume")
    assert second.returncode == 0, second.stderr
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["reduce_bucket_size"] == 123456
    events = sorted(out.glob("events.out.tfevents.*"))
    finished = train(cache_dir, out, "--resume")
    assert finished.returncode == 0, finished.stderr
    assert "already finished" in finished.stdout and "nan" not in finished.stdout
    assert sorted(out.glob("events.out.tfevents.*")) == events  # no hparam/val_loss=nan written


@pytest.mark.parametrize("changes,world_size,words", [
    ({"deepspeed.zero_stage": 3}, 1, "zero_stage=3 serves dense presets only"),
    ({"deepspeed.ep_size": 2}, 3, "ep_size=2 must divide the number of ranks (3)"),
    ({"deepspeed.ep_size": 3}, 3, "must divide every MoE layer's n_experts"),
])
def test_layouts_deepspeed_cannot_train_are_refused_before_it_starts(changes, world_size, words):
    spec = with_changes(presets.get("deepseek_glm4", tiny=True), changes)
    with pytest.raises(TrainingError, match=re.escape(words)):
        plan.check_layout(spec, world_size)
    plan.check_layout(with_changes(presets.get("dense", tiny=True), {"deepspeed.zero_stage": 3}), 1)


def test_a_top1_renormalised_moe_trains_with_a_one_line_warning(tmp_path, capsys):
    """Valid (an imported model may route so) but the router gets no gradient: the plan says so and goes on."""
    import torch

    from training.distributed import Dist

    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"model.ffn.top_k": 1})
    settled = plan._settle(spec, tmp_path, Dist(0, 0, 1, torch.device("cpu")), resume=False)
    assert settled.model == spec.model
    [line] = [line for line in capsys.readouterr().err.splitlines() if "top_k (1)" in line]
    assert line.startswith("training: warning: model layers [1, 2]: top_k (1) with router.norm_topk_prob (True)")
