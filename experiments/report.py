"""An experiment's results folder, generated from its runs' summaries alone, byte for byte the same on any
machine with the same libraries: results.csv, table.md, README.md and PNG plots.

Every result in README.md is formatted from results.csv's rows (the table's means, the verdicts' intervals
and p-values, the run times): nothing in it is typed by hand. The setup (budget, scale, the prose) comes
from the experiment's declaration (experiments/expN.py), the machine from the summaries.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from collections import Counter
from pathlib import Path

from experiments import plots
from experiments.base import Experiment, Hypothesis
from experiments.results import (
    Interval,
    RunResult,
    aggregate,
    curve_stats,
    markdown_table,
    paired_interval,
    pivot_table,
    as_written,
    verdict,
    write_csv,
)

GENERATED = ("results.csv", "table.md", "README.md", "val_loss.png", "val_loss_vs_flops.png",
             "val_loss_vs_time.png", "max_vio.png", "max_vio_global.png", "expert_load.png")
PLOTS = {
    "val_loss.png": "validation loss against training tokens (equal data)",
    "val_loss_vs_flops.png": "validation loss against training FLOPs (equal compute; 3 x the forward FLOPs)",
    "val_loss_vs_time.png": "validation loss against training time (equal time; evaluation and checkpoints left out)",
    "max_vio.png": "MaxVio of each training batch, mean over MoE layers",
    "max_vio_global.png": "MaxVio over the whole validation set, mean over MoE layers (MaxVio_global)",
    "expert_load.png": "the experts' shares of routed tokens at the last logged step, by load rank",
}


def write_report(experiment: Experiment, results: list[RunResult], out: Path, *, planned: int,
                 smoke: bool = False) -> list[Path]:
    """Write the folder from `results` (the runs summarised so far; `planned` runs in all)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*GENERATED, *(p.name for p in out.glob("loss_vs_*.png"))]:
        (out / stale).unlink(missing_ok=True)
    if not results:
        (out / "README.md").write_text(readme(experiment, results, planned=planned, smoke=smoke))
        return [out / "README.md"]
    write_csv(results, out / "results.csv")
    results = as_written(results)  # every number below is computed from what results.csv holds
    (out / "table.md").write_text(table_markdown(experiment, results, smoke=smoke))
    title = experiment.name
    plots.curves(results, "tokens", "val_loss", "validation loss", f"{title}: validation loss", out / "val_loss.png")
    plots.curves(results, "flops", "val_loss", "validation loss", f"{title}: validation loss at equal compute",
                 out / "val_loss_vs_flops.png", xlabel="training FLOPs")
    plots.curves(results, "train_s", "val_loss", "validation loss", f"{title}: validation loss at equal time",
                 out / "val_loss_vs_time.png", xlabel="training seconds (this machine)")
    moe = [v for v in _variants(results) if any("max_vio" in r.curves for r in results if r.variant == v)]
    if moe:
        plots.tagged_curves(results, "max_vio", "MaxVio per batch (mean over MoE layers)",
                            f"{title}: load imbalance per training batch", out / "max_vio.png", variants=moe)
        plots.curves(results, "tokens", "max_vio_global", "MaxVio_global (mean over MoE layers)",
                     f"{title}: load imbalance over the validation set", out / "max_vio_global.png", variants=moe)
        plots.expert_load(results, title, out / "expert_load.png")
    if experiment.sweep:
        name = experiment.sweep.split(".")[-1]
        plots.sweep(results, experiment.sweep, experiment.groups, f"{title}: final validation loss against {name}",
                    out / f"loss_vs_{name}.png")
    (out / "README.md").write_text(readme(experiment, results, planned=planned, smoke=smoke,
                                          plots=sorted(p.name for p in out.glob("*.png"))))
    return sorted(p for p in out.iterdir() if p.is_file())


def _variants(results: list[RunResult]) -> list[str]:
    return list(dict.fromkeys(r.variant for r in results))


def table_markdown(experiment: Experiment, results: list[RunResult], *, smoke: bool = False) -> str:
    budget = experiment.active_budget(smoke)
    scale = experiment.smoke_scale if smoke else experiment.scale
    reference = experiment.reference if any(r.variant == experiment.reference for r in results) else None
    extra = tuple(p for p in (*experiment.groups, experiment.sweep) if p)
    text = [f"# {experiment.name}: {experiment.title}{' (SMOKE: not a result)' if smoke else ''}", "",
            f"{budget.steps} steps x {budget.micro_batch_size} x {scale.seq_len} tokens = "
            f"{budget.tokens(scale.seq_len):,} training tokens per run{_precisions(results)}; "
            f"seeds {list(experiment.seeds_for(smoke))}; mean ± std over seeds (sample std).", "",
            markdown_table(results, experiment.metrics, reference=reference, extra=extra), ""]
    if any(r.variant == experiment.reference for r in results) and "tokens_to_target" in experiment.metrics:
        text += [f"Tokens to target: the training tokens at which a run's validation curve first reaches the final "
                 f"validation loss of {experiment.reference} on the same seed (each seed has its own validation "
                 "documents and tokenizer), interpolated between evaluations; the mean is over the seeds that "
                 f"reach it ({experiment.reference} reaches its own final loss at its last evaluation, or earlier "
                 "where its curve dipped below it).", ""]
    if len(experiment.groups) == 2:
        rows, cols = experiment.groups
        text += [(f"Best over {experiment.sweep} of the final validation loss (each variant's mean over seeds) "
                  f"per {rows} x {cols}:"), "",
                 pivot_table(results, rows, cols), ""]
    return "\n".join(text)


def _precisions(results: list[RunResult]) -> str:
    """`in bf16`, or each precision with its run count when they differ: runs asking train.precision=auto
    that trained on different machines (experiments/runner.py) are not strictly comparable."""
    counts = Counter(r.precision for r in results if r.precision)
    if len(counts) <= 1:
        return "".join(f" in {p}" for p in counts)
    return " in mixed precisions (" + ", ".join(f"{p}: {n} run{'s' if n > 1 else ''}"
                                                for p, n in sorted(counts.items())) + ")"


# ------------------------------------------------------------------------------------ verdicts


def resolve(experiment: Experiment, results: list[RunResult], name: str) -> str | None:
    """A hypothesis' variant: the name, or of the variants a pattern matches, the one of lowest mean val loss."""
    matches = fnmatch.filter(_variants(results), name)
    if not matches:
        return None
    losses = aggregate([r for r in results if r.variant in matches], "val_loss")
    return min(matches, key=lambda v: losses[v].mean)


def judge(experiment: Experiment, results: list[RunResult], h: Hypothesis) -> tuple[str, str, Interval, str]:
    """(variant, reference, paired interval of the column, verdict) of one hypothesis."""
    variant, reference = resolve(experiment, results, h.variant), resolve(experiment, results, h.reference)
    if variant is None or reference is None:
        return variant or h.variant, reference or h.reference, Interval(math.nan, math.nan, math.nan, 0), "not run yet"
    interval = paired_interval(results, h.column, variant, reference)
    return variant, reference, interval, verdict(interval, h.lower)


def verdict_table(experiment: Experiment, results: list[RunResult]) -> str:
    lines = ["| hypothesis | compared (paired by seed) | difference, mean [95% t-interval] | seeds | p | verdict | "
             "predicted by |", "|---|---|---|---|---|---|---|"]
    for h in experiment.hypotheses:
        variant, reference, interval, word = judge(experiment, results, h)
        what = {"val_loss": "val loss", "max_vio_global": "MaxVio_global"}.get(h.column, h.column)
        lines.append(f"| {h.claim} | {what}: {variant} − {reference} (predicted "
                     f"{'< 0' if h.lower else '> 0'}) | {interval.format()} | {interval.n} | {_p(interval.p)} | **{word}** | "
                     f"{h.source or 'the zoo'} |")
    return "\n".join(lines)


def _p(p: float) -> str:
    return "-" if math.isnan(p) else f"{p:.2g}"


# ------------------------------------------------------------------------------------ README


def readme(experiment: Experiment, results: list[RunResult], *, planned: int, smoke: bool = False,
           plots: list[str] = ()) -> str:
    budget = experiment.active_budget(smoke)
    scale = experiment.smoke_scale if smoke else experiment.scale
    seeds = list(experiment.seeds_for(smoke))
    done = len(results)
    status = ("all of them summarised" if done == planned else
              f"{done} of them summarised so far (the rest are still to train: the verdicts below use the "
              "seeds summarised)")
    text = [f"# {experiment.name}: {experiment.title}{' (SMOKE: not a result)' if smoke else ''}", "",
            "Generated by `python -m experiments " + experiment.name + " --report` from the run summaries in "
            "`runs/`: every result here is formatted from `results.csv`, the setup from `experiments/"
            f"{experiment.name}.py`. Do not edit by hand.", "",
            _dedent(experiment.notes).strip(), "",
            "## Budget and corpus", "",
            f"- {len(experiment.variants)} variants x {_n(len(seeds), 'seed')} {seeds} = {planned} runs; "
            f"{status}.",
            f"- Each run: {budget.steps:,} optimizer steps x {budget.micro_batch_size} sequences x {scale.seq_len} "
            f"tokens = {budget.tokens(scale.seq_len):,} training tokens of `{Path(budget.source).name}` "
            f"(document-level split, 5% of the documents held out), warm-up {_n(budget.warmup_steps, 'step')}; "
            f"validation on {budget.val_blocks} blocks of {scale.seq_len} tokens of held-out documents every "
            f"{budget.eval_every} steps; trained{_precisions(results) or ' in ' + budget.precision}.",
            f"- Model scale: d_model {scale.d_model}, {scale.n_layers} layers, {scale.n_heads} heads, context "
            f"{scale.seq_len}, vocabulary {scale.vocab_size} (`python -m experiments {experiment.name} --show` "
            "prints every variant's diff).",
            ]
    if results:
        text.append(_time_line(results))
    if not results:
        return "\n".join([*text, "", "No run is summarised yet.", ""])
    text += ["", "## Results", "", "Mean ± sample std over seeds; Δ columns are paired by seed (each seed "
             "fixes the initialisation, the data order, the document split and the tokenizer for every variant).",
             "", table_markdown(experiment, results, smoke=smoke).split("\n", 4)[4].strip(), ""]
    if experiment.hypotheses:
        text += ["## Verdicts", "",
                 "For each hypothesis, the paired difference over seeds with its 95% Student-t interval: "
                 "**supported** when the interval excludes zero on the predicted side, **refuted** when it "
                 "excludes zero on the other, **inconclusive** when it contains zero; p is the two-sided paired "
                 "t-test's (the speedrun community's bar for a new record is p < 0.01). A pattern such as "
                 "`muon_lr*` stands for its best variant (lowest mean final loss), chosen on the same seeds.", "",
                 verdict_table(experiment, results), ""]
    if plots:
        text += ["## Plots", "", *(f"- `{name}`: {PLOTS.get(name, 'final validation loss against the swept value')}"
                                   for name in plots), ""]
        text += [f"![{name}]({name})" for name in plots] + [""]
    text += ["## What these runs cannot show", "",
             f"- One small scale ({_params(results)} parameters) and {budget.tokens(scale.seq_len):,} tokens per "
             "run: an ordering here need not hold for larger models or longer training.",
             f"- {_n(len(seeds), 'seed')} per variant: with n = {len(seeds)} a 95% t-interval reaches "
             f"{_t_factor(len(seeds))} standard deviations of the paired differences each way, so differences "
             "below the seed noise read inconclusive.",
             "- Training times are this CPU's, with the runs sharing it as the line above says: they order "
             "the variants on this machine, not on a GPU.",
             "- One corpus (English technical documentation): other text may favour other variants.", ""]
    return "\n".join(text)


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text)


def _params(results: list[RunResult]) -> str:
    active = sorted({f"{r.values['active_params'] / 1e6:.1f}" for r in results}, key=float)
    total = max(r.values["total_params"] for r in results)
    return f"{'-'.join(dict.fromkeys([active[0], active[-1]]))} M active, up to {total / 1e6:.1f} M total"


def _t_factor(n: int) -> str:
    """t(0.975, n - 1) / sqrt(n): the half-width of a 95% interval of a mean of n, in standard deviations."""
    from scipy import stats

    return f"{stats.t.ppf(0.975, n - 1) / math.sqrt(n):.2f}" if n > 1 else "infinitely many"


def _time_line(results: list[RunResult]) -> str:
    """How long the summarised runs took, from their summaries' machine and wall times."""
    walls = [r.values.get("wall_s") for r in results if r.values.get("wall_s")]
    machines = Counter((m.get("cpu"), m.get("cores"), m.get("threads"), m.get("runs_side_by_side"))
                       for m in (r.machine or {} for r in results) if m)
    where = "; ".join(f"{n} run{'s' if n > 1 else ''} on {cpu} ({cores} cores, "
                      f"{side} run{'s' if side and side > 1 else ''} at a time, "
                      f"{threads or 'all'} thread{'s' if threads != 1 else ''} each)"
                      for (cpu, cores, threads, side), n in sorted(machines.items(), key=str))
    if not walls:
        return "- Run times: not recorded."
    per_variant = {}
    for r in results:
        if r.values.get("wall_s"):
            per_variant.setdefault(r.variant, []).append(r.values["wall_s"])
    slowest = max(per_variant, key=lambda v: statistics.fmean(per_variant[v]))
    fastest = min(per_variant, key=lambda v: statistics.fmean(per_variant[v]))
    return (f"- Run time: {sum(walls) / 3600:.1f} h of run wall time in all ({len(walls)} runs: "
            f"{fastest} {statistics.fmean(per_variant[fastest]) / 60:.1f} min to {slowest} "
            f"{statistics.fmean(per_variant[slowest]) / 60:.1f} min a run, start-up and evaluations included)"
            f"{'; ' + where if where else ''}.")


def summary_lines(experiment: Experiment, results: list[RunResult]) -> list[str]:
    """One console line per variant: final validation loss, mean +- std."""
    losses = aggregate(results, "val_loss")
    lines = []
    for variant, s in losses.items():
        xs, _ = curve_stats(results, variant, "val/loss")
        lines.append(f"  {variant:<24} val loss {s.format('{:.4f}')}  ({s.n} seed(s), {xs[-1] if xs else 0:,} tokens)")
    return lines
