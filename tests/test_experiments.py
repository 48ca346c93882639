"""Experiments: the declarations rebuild through `--set` and the aggregation is right on known numbers
(tests/test_experiments_runs.py trains them)."""

import math

import pytest

from experiments import EXPERIMENTS
from experiments.__main__ import main
from experiments.base import CPU, spec_sets
from experiments.results import (
    RunResult,
    aggregate,
    markdown_table,
    paired_delta,
    paired_interval,
    pivot_table,
    stat,
    tokens_to_reach,
    verdict,
)
from zoo import presets
from zoo.describe import describe
from zoo.overrides import apply_sets
from zoo.specs import MLPSpec, MoESpec


# ------------------------------------------------------------------------------------------ declarations


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_run_is_its_preset_plus_set_arguments(name):
    experiment = EXPERIMENTS[name]
    for variant in experiment.variants:
        for smoke in (False, True):
            seed = experiment.seeds_for(smoke)[-1]
            preset, sets = experiment.command_args(variant, seed, smoke=smoke)  # asserts the round trip
            spec = apply_sets(presets.get(preset), sets)
            assert spec.train.seed == seed and spec.data.seq_len == spec.model.max_seq_len


def test_spec_sets_replaces_a_slot_whose_kind_changes():
    start, target = presets.get("exp1_baseline"), presets.get("exp1_attention_mlp")
    sets = spec_sets(start, target)
    assert any(s.startswith("model.attention={") for s in sets)
    assert apply_sets(start, sets) == target


def test_exp1_variants_differ_only_by_their_preset_diff():
    exp1 = EXPERIMENTS["exp1"]
    assert set(exp1.variants) == {"baseline", "mlp", "attention_mlp", "moe", "attention_moe"}
    for variant in exp1.variants:
        assert exp1.variant_spec(variant) == presets.get(f"exp1_{variant}")
        spec = exp1.spec(variant, 0)
        assert (spec.model.d_model, spec.model.n_layers, spec.model.vocab_size) == (CPU.d_model, CPU.n_layers,
                                                                                     CPU.vocab_size)


def _active_ffn_width(ffn) -> int:
    if isinstance(ffn, MLPSpec):
        return ffn.d_hidden
    assert isinstance(ffn, MoESpec)
    return (ffn.top_k + ffn.n_shared_experts) * ffn.d_expert


@pytest.mark.parametrize("name", ["exp1", "exp3", "exp4"])
def test_active_ffn_width_stays_comparable_at_cpu_scale(name):
    """The scale keeps the architectures' ratios: every layer's active FFN width is within 2% of 1024."""
    experiment = EXPERIMENTS[name]
    for variant in experiment.variants:
        for layer in experiment.spec(variant, 0).model.layer_specs():
            assert abs(_active_ffn_width(layer.ffn) - 1024) <= 0.02 * 1024, (variant, layer.ffn)


def test_exp4_variants_have_equal_active_parameters():
    exp4 = EXPERIMENTS["exp4"]
    counts = {v: describe(exp4.spec(v, 0))["active_params"] for v in exp4.variants}
    assert max(counts.values()) - min(counts.values()) == 0, counts


def test_exp2_sweeps_each_optimizers_own_lr_around_its_default():
    """Muon rows sweep train.muon_lr, AdamW rows (every parameter on AdamW) train.adam_lr; each grid holds
    its optimizer's default with a point on either side, so a minimum inside the grid can show."""
    exp2, defaults = EXPERIMENTS["exp2"], presets.get("exp1_attention_mlp").train
    grids = {"muon": [], "adamw": []}
    for variant in exp2.variants:
        spec = exp2.spec(variant, 0)
        grids[spec.train.optimizer].append(exp2.sweep_value(variant))
        other = "adam_lr" if spec.train.optimizer == "muon" else "muon_lr"
        assert getattr(spec.train, other) == getattr(defaults, other), (variant, "only its own LR moves")
    for optimizer, default in (("muon", defaults.muon_lr), ("adamw", defaults.adam_lr)):
        lrs = sorted(grids[optimizer])
        assert len(lrs) >= 3 and lrs[0] < default < lrs[-1] and default in lrs, (optimizer, lrs)


def test_exp3_holds_active_and_total_width_and_sparsity_and_varies_granularity():
    exp3 = EXPERIMENTS["exp3"]
    ffns = {v: exp3.spec(v, 0).model.ffn for v in exp3.variants}
    assert {f.top_k / f.n_experts for f in ffns.values()} == {0.25}
    series = [v for v, f in ffns.items() if f.top_k > 1]
    assert len({(ffns[v].n_experts, ffns[v].top_k) for v in series}) == len(series) >= 3
    counts = {v: describe(exp3.spec(v, 0)) for v in exp3.variants}
    for key in ("active_params", "total_params"):  # within 1%: the widths round to whole units
        values = [counts[v][key] for v in series]
        assert max(values) <= 1.01 * min(values), (key, values)
    actives = [c["active_params"] for c in counts.values()]
    assert max(actives) <= 1.01 * min(actives)  # top-1 too
    # Top-1 must not renormalise its single weight: the router would get no gradient from the loss.
    assert all(not f.router.norm_topk_prob for f in ffns.values() if f.top_k == 1)


def test_every_run_trains_at_least_3m_tokens_with_at_least_3_seeds():
    for experiment in EXPERIMENTS.values():
        assert experiment.budget.tokens(experiment.scale.seq_len) >= 3_000_000
        assert len(experiment.seeds) >= 3 and experiment.budget.source.endswith("linux_docs.parquet")
        assert experiment.hypotheses, experiment.name


def test_show_prints_every_variant_as_a_diff(capsys):
    assert main(["all", "--show"]) == 0
    text = capsys.readouterr().out
    for experiment in EXPERIMENTS.values():
        assert f"base preset: {experiment.base}" in text
        for variant in experiment.variants:
            assert f"\n{variant}  (" in text
    assert "model.ffn.n_experts: 8 -> 16" in text  # exp3's diff from exp1_attention_moe


# ------------------------------------------------------------------------------------------ aggregation


def _result(variant, seed, loss, **values):
    evals = [{"step": 1, "tokens": 100, "flops": 1e9, "train_s": 1.0, "val_loss": loss + 1},
             {"step": 2, "tokens": 200, "flops": 2e9, "train_s": 2.0, "val_loss": loss}]
    return RunResult(variant, seed, {"val_loss": loss, **values}, evals)


def test_stat_is_mean_and_sample_std():
    s = stat([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    assert math.isnan(stat([5.0]).std) and stat([5.0]).format("{:.1f}") == "5.0"
    assert s.format("{:.2f}") == "2.00 ± 1.00"
    assert stat([]).n == 0


def test_aggregate_paired_delta_and_table_on_known_numbers():
    results = [_result("base", 0, 3.0), _result("base", 1, 3.2), _result("base", 2, 3.4),
               _result("wide", 0, 2.9), _result("wide", 1, 3.0), _result("wide", 2, 3.3)]
    means = aggregate(results, "val_loss")
    assert list(means) == ["base", "wide"]
    assert means["base"].mean == pytest.approx(3.2) and means["base"].std == pytest.approx(0.2)
    delta = paired_delta(results, "val_loss", "base")
    assert delta["wide"].mean == pytest.approx(-0.1333333) and delta["wide"].std == pytest.approx(0.0577350)
    table = markdown_table(results, ("val_loss", "val_ppl"), reference="base")
    lines = table.splitlines()
    assert lines[0] == "| variant | seeds | val loss | Δ val loss vs base (paired) |"  # no run has val_ppl
    assert lines[2] == "| base | 3 | 3.2000 ± 0.2000 | (reference) |"
    assert lines[3] == "| wide | 3 | 3.0667 ± 0.2082 | -0.1333 ± 0.0577 |"


def test_paired_interval_is_students_t_and_the_verdict_reads_it():
    # Paired differences -0.1, -0.2, -0.3: mean -0.2, sd 0.1, t(0.975, 2) = 4.3027, half-width 0.24841.
    results = [_result("ref", s, 3.0) for s in range(3)] + [_result("new", s, 3.0 - d)
                                                            for s, d in enumerate((0.1, 0.2, 0.3))]
    interval = paired_interval(results, "val_loss", "new", "ref")
    assert interval.n == 3 and interval.mean == pytest.approx(-0.2)
    assert (interval.low, interval.high) == (pytest.approx(-0.44841, abs=1e-5), pytest.approx(0.04841, abs=1e-5))
    assert verdict(interval, lower=True) == "inconclusive"
    assert interval.p == pytest.approx(0.0742, abs=1e-4)  # t = -0.2 / (0.1 / sqrt 3) = -3.464, 2 df
    tight = paired_interval([*results[:3], *(_result("new", s, 3.0 - d) for s, d in enumerate((0.19, 0.2, 0.21)))],
                            "val_loss", "new", "ref")
    assert tight.high < 0
    assert verdict(tight, lower=True) == "supported" and verdict(tight, lower=False) == "refuted"
    one = paired_interval([results[0], results[3]], "val_loss", "new", "ref")
    assert one.n == 1 and verdict(one, lower=True) == "inconclusive" and "no interval" in one.format()


def test_tokens_to_reach_interpolates_between_evaluations():
    evals = [{"tokens": 100, "val_loss": 5.0}, {"tokens": 200, "val_loss": 4.0}, {"tokens": 300, "val_loss": 3.5}]
    assert tokens_to_reach(evals, 4.5) == pytest.approx(150)
    assert tokens_to_reach(evals, 3.75) == pytest.approx(250)
    assert tokens_to_reach(evals, 6.0) == 100  # reached at the first evaluation
    assert math.isnan(tokens_to_reach(evals, 3.0))  # never reached


def test_each_seed_is_timed_to_the_reference_on_the_same_seed():
    """Seeds differ in validation documents and tokenizer: a target shared by all seeds would be reached or
    not by the seed's luck. The reference reaches its own target by its last evaluation."""
    from experiments.results import targets

    exp1 = EXPERIMENTS["exp1"]
    results = [_result("mlp", 0, 3.0), _result("mlp", 1, 3.5), _result("moe", 0, 2.9), _result("moe", 1, 3.6)]
    goal = targets(exp1, results)
    assert goal == {0: 3.0, 1: 3.5}
    assert [tokens_to_reach(r.evals, goal[r.seed]) for r in results][:2] == [200, 200]
    assert tokens_to_reach(results[2].evals, goal[0]) < 200 and math.isnan(tokens_to_reach(results[3].evals, goal[1]))


def test_a_hypothesis_pattern_stands_for_its_best_variant():
    from experiments.report import judge

    exp2 = EXPERIMENTS["exp2"]
    [h] = exp2.hypotheses
    losses = {"muon_lr0.005": 3.3, "muon_lr0.01": 3.1, "muon_lr0.02": 3.2, "muon_lr0.04": 3.5,
              "adamw_lr0.001": 3.6, "adamw_lr0.003": 3.4, "adamw_lr0.01": 3.45}
    results = [_result(v, s, loss + 0.01 * s) for v, loss in losses.items() for s in range(3)]
    variant, reference, interval, word = judge(exp2, results, h)
    assert (variant, reference) == ("muon_lr0.01", "adamw_lr0.003")
    assert interval.mean == pytest.approx(-0.3) and word == "supported"


def test_pivot_table_takes_the_best_over_the_other_fields():
    results = [_result(f"e{e}_k{k}_lr{lr}", 0, loss, **{"e": e, "k": k})
               for e, k, lr, loss in [(4, 1, 1, 3.5), (4, 1, 2, 3.4), (8, 1, 1, 3.3), (8, 1, 2, 3.6)]]
    assert pivot_table(results, "e", "k").splitlines()[2:] == ["| 4 | 3.400 |", "| 8 | 3.300 |"]


def test_pivot_table_averages_seeds_before_taking_the_best():
    """The best mean over seeds, not the luckiest seed: e4's lr1 has the lowest single run (3.0) but the
    higher mean (3.4 against lr2's 3.3). The minimum over seeds and sweep alike showed 3.000."""
    results = [_result(f"e{e}_k1_lr{lr}", seed, loss, e=e, k=1)
               for e, lr, seed, loss in [(4, 1, 0, 3.0), (4, 1, 1, 3.8), (4, 2, 0, 3.25), (4, 2, 1, 3.35),
                                         (8, 1, 0, 3.1), (8, 1, 1, 3.3)]]
    assert pivot_table(results, "e", "k").splitlines()[2:] == ["| 4 | 3.300 |", "| 8 | 3.200 |"]


def test_the_pivot_heading_says_it_is_the_best_mean():
    from dataclasses import replace

    from experiments.report import table_markdown

    exp3 = replace(EXPERIMENTS["exp3"], groups=("model.ffn.n_experts", "model.ffn.top_k"))
    rows, cols = exp3.groups
    results = [_result(v, 0, 3.0, **{rows: exp3.sweep_value(v, rows), cols: exp3.sweep_value(v, cols)})
               for v in exp3.variants]
    assert (f"Best over {exp3.sweep} of the final validation loss (each variant's mean over seeds) "
            f"per {rows} x {cols}:") in table_markdown(exp3, results)


def test_the_table_says_which_precision_the_runs_trained_in():
    """Runs asking train.precision=auto take the precision of the machine that trained them."""
    from dataclasses import replace

    from experiments.report import table_markdown

    exp4 = EXPERIMENTS["exp4"]
    same = [replace(_result(v, 0, 3.0), precision="bf16") for v in exp4.variants]
    assert "3,010,560 training tokens per run in bf16; seeds" in table_markdown(exp4, same)
    mixed = [*same[:-1], replace(same[-1], precision="fp32")]
    assert "per run in mixed precisions (bf16: 4 runs, fp32: 1 run); seeds" in table_markdown(exp4, mixed)
