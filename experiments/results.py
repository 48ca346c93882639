"""An experiment's numbers, read from its runs' summaries (experiments/summary.py), aggregated over seeds.

Nothing here computes a metric: values are the trainer's own scalars as the summaries hold them
(`val/loss`, `perf/tokens_per_s`, `moe/layer_i/max_vio`, `val/max_vio_global`, ...), and parameter
counts are `zoo describe`'s. What is derived is said where it is: the mean over MoE layers of MaxVio,
mean +- sample std over seeds, paired differences with their t-intervals, and the tokens a run needs to
reach a target loss, read off its validation curve.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from experiments import summary
from experiments.base import Experiment
from experiments.runner import Run

# (column, header, format): the per-run values of results.csv that the table shows.
COLUMNS = (
    ("total_params", "total params", "{:,.0f}"),
    ("active_params", "active params", "{:,.0f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_ppl", "val ppl", "{:.2f}"),
    ("val_acc", "val acc", "{:.4f}"),
    ("hellaswag_acc_norm", "HellaSwag acc_norm", "{:.3f}"),
    ("max_vio", "MaxVio batch (final)", "{:.3f}"),
    ("max_vio_mean", "MaxVio batch (mean over training)", "{:.3f}"),
    ("max_vio_global", "MaxVio global (final, validation set)", "{:.3f}"),
    ("tokens_to_target", "tokens to target", "{:,.0f}"),
    ("train_s", "training s", "{:,.0f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
)


@dataclass
class RunResult:
    variant: str
    seed: int
    values: dict[str, Any]  # the row of results.csv
    evals: list[dict[str, float]]  # each evaluation: step, tokens, flops, train_s, val_loss[, max_vio_global]
    max_vio_batch: list[tuple[int, float]] = field(default_factory=list)  # (tokens, MaxVio mean over layers)
    expert_share: dict[int, list[float]] = field(default_factory=dict)  # {layer: final share per expert}
    precision: str | None = None  # the train.precision it trained in (auto resolved by its device)
    machine: dict | None = None  # where it trained: CPU, cores, threads, runs side by side

    @property
    def curves(self) -> dict[str, dict[int, float]]:
        """{tag: {tokens: value}}: val/loss, max_vio (per batch) and max_vio_global, where the run has them."""
        out = {"val/loss": {e["tokens"]: e["val_loss"] for e in self.evals}}
        if self.max_vio_batch:
            out["max_vio"] = dict(self.max_vio_batch)
        if any("max_vio_global" in e for e in self.evals):
            out["max_vio_global"] = {e["tokens"]: e["max_vio_global"] for e in self.evals if "max_vio_global" in e}
        return out


def collect(experiment: Experiment, runs: list[Run]) -> list[RunResult]:
    """The runs' summaries as results, with the sweep's and groups' field values as columns and each run's
    tokens to its seed's target loss (`targets`)."""
    results = []
    for run in runs:
        found = summary.read(run.summary)
        values = dict(found["values"])
        for path in (experiment.sweep, *experiment.groups):
            if path:
                values[path] = experiment.sweep_value(run.variant, path)
        results.append(RunResult(run.variant, run.seed, values, found["evals"],
                                 [tuple(p) for p in found["max_vio_batch"]],
                                 {int(k): v for k, v in found["expert_share"].items()}, found["precision"],
                                 found.get("machine")))
    goal = targets(experiment, results)
    for r in results:
        if r.seed in goal:
            r.values["tokens_to_target"] = tokens_to_reach(r.evals, goal[r.seed])
    return results


def targets(experiment: Experiment, results: list[RunResult]) -> dict[int, float]:
    """{seed: the loss each run of that seed is timed to}: the reference variant's final validation loss on
    that seed. A seed fixes the validation documents and the tokenizer, so losses compare within a seed
    only; the reference itself reaches its target with its whole budget."""
    return {r.seed: r.values["val_loss"] for r in results if r.variant == experiment.reference}


def tokens_to_reach(evals: list[dict[str, float]], target: float, x: str = "tokens") -> float:
    """The training tokens (or `x`) at which a validation curve first reaches `target`, linearly interpolated
    between the evaluations around it; nan when it never does."""
    previous = None
    for e in evals:
        if e["val_loss"] <= target:
            if previous is None or previous["val_loss"] == e["val_loss"]:
                return float(e[x])
            share = (previous["val_loss"] - target) / (previous["val_loss"] - e["val_loss"])
            return previous[x] + share * (e[x] - previous[x])
        previous = e
    return math.nan


# ------------------------------------------------------------------------------------ aggregation


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample std over seeds (n - 1); nan for one seed
    n: int

    def format(self, fmt: str) -> str:
        if math.isnan(self.mean):
            return "-"
        if self.n < 2 or math.isnan(self.std) or self.std == 0:  # one seed, or a count fixed by the spec
            return fmt.format(self.mean)
        return f"{fmt.format(self.mean)} ± {fmt.format(self.std)}"


def stat(values: Iterable[float]) -> Stat:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return Stat(math.nan, math.nan, 0)
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values))


def aggregate(results: list[RunResult], column: str) -> dict[str, Stat]:
    """{variant: mean +- std over seeds of one column}, variants in first-seen order."""
    by_variant: dict[str, list[float]] = defaultdict(list)
    for r in results:
        by_variant[r.variant].append(r.values.get(column, math.nan))
    return {variant: stat(values) for variant, values in by_variant.items()}


def paired_delta(results: list[RunResult], column: str, reference: str) -> dict[str, Stat]:
    """{variant: mean +- std over seeds of (variant - reference)}, paired by seed: the seed sets the
    initialisation, data order, document split and tokenizer, so each seed's pair shares them."""
    ref = {r.seed: r.values.get(column, math.nan) for r in results if r.variant == reference}
    by_variant: dict[str, list[float]] = defaultdict(list)
    for r in results:
        if r.seed in ref:
            by_variant[r.variant].append(r.values.get(column, math.nan) - ref[r.seed])
    return {variant: stat(values) for variant, values in by_variant.items()}


def curve_stats(results: list[RunResult], variant: str, tag: str) -> tuple[list[int], list[Stat]]:
    """(x values, Stat per x) of a curve over the seeds of one variant, at the x values all seeds share."""
    curves = [r.curves[tag] for r in results if r.variant == variant and tag in r.curves]
    if not curves:
        return [], []
    xs = sorted(set.intersection(*(set(c) for c in curves)))
    return xs, [stat(c[x] for c in curves) for x in xs]


def eval_curve(results: list[RunResult], variant: str, x: str, y: str = "val_loss"
               ) -> tuple[list[Stat], list[Stat]]:
    """(x, y) over the seeds of one variant at each evaluation step all its seeds share: x is "tokens",
    "flops" (the same for every seed) or "train_s" (each seed's own training time, so a spread too)."""
    runs = [{e["step"]: e for e in r.evals} for r in results if r.variant == variant]
    if not runs:
        return [], []
    steps = sorted(set.intersection(*(set(run) for run in runs)))
    steps = [s for s in steps if all(run[s].get(x) is not None and y in run[s] for run in runs)]
    return ([stat(run[s][x] for run in runs) for s in steps], [stat(run[s][y] for run in runs) for s in steps])


@dataclass(frozen=True)
class Interval:
    """A paired difference (variant - reference) over seeds: its mean and 95% t-interval."""

    mean: float
    low: float
    high: float
    n: int
    p: float = math.nan  # two-sided paired t-test of a zero mean difference

    @property
    def contains_zero(self) -> bool:
        return not (self.high < 0 or self.low > 0)

    def format(self, fmt: str = "{:+.4f}") -> str:
        if self.n < 2:
            return f"{fmt.format(self.mean)} (1 seed: no interval)" if self.n else "-"
        return f"{fmt.format(self.mean)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def paired_interval(results: list[RunResult], column: str, variant: str, reference: str) -> Interval:
    """Mean of (variant - reference) over the seeds both have, with Student's t 95% interval (n - 1 degrees
    of freedom): mean +- t(0.975, n - 1) * sd / sqrt(n)."""
    from scipy import stats

    ref = {r.seed: r.values.get(column, math.nan) for r in results if r.variant == reference}
    diffs = [r.values.get(column, math.nan) - ref[r.seed] for r in results if r.variant == variant and r.seed in ref]
    diffs = [d for d in diffs if not math.isnan(d)]
    if not diffs:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Interval(mean, math.nan, math.nan, 1)
    error = statistics.stdev(diffs) / math.sqrt(len(diffs))
    half = stats.t.ppf(0.975, len(diffs) - 1) * error
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if error > 0 else (0.0 if mean else 1.0)
    return Interval(mean, mean - half, mean + half, len(diffs), p)


def verdict(interval: Interval, lower: bool) -> str:
    """supported (the interval excludes zero on the predicted side), refuted (on the other side), or
    inconclusive (it contains zero, or there are fewer than 2 seeds)."""
    if interval.n < 2 or interval.contains_zero:
        return "inconclusive"
    return "supported" if (interval.high < 0) == lower else "refuted"


# ------------------------------------------------------------------------------------ writing


def write_csv(results: list[RunResult], path: Path) -> None:
    columns = ["variant", "seed"]
    for r in results:
        columns += [c for c in r.values if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in results:
            writer.writerow({"variant": r.variant, "seed": r.seed, **{k: _plain(v) for k, v in r.values.items()}})


def _plain(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def as_written(results: list[RunResult]) -> list[RunResult]:
    """The results with each value as results.csv writes it (floats to 6 significant digits), so that
    what is computed from them is what anyone recomputes from the file."""
    return [replace(r, values={k: float(_plain(v)) if isinstance(v, float) else v for k, v in r.values.items()})
            for r in results]


def markdown_table(results: list[RunResult], columns: tuple[str, ...], *, reference: str | None = None,
                   extra: tuple[str, ...] = ()) -> str:
    """Mean +- std over seeds per variant of `columns` (those no run has are left out); `extra` field
    paths are shown as they are. With a reference variant, a column of the paired difference in
    validation loss."""
    unknown = set(columns) - {c[0] for c in COLUMNS}
    if unknown:
        raise ValueError(f"unknown table columns {sorted(unknown)}; known: {[c[0] for c in COLUMNS]}")
    present = [c for c in COLUMNS if c[0] in columns and any(c[0] in r.values for r in results)]
    seeds = {v: s.n for v, s in aggregate(results, "val_loss").items()}
    header = ["variant", *extra, "seeds", *(h for _, h, _ in present)]
    if reference:
        header.append(f"Δ val loss vs {reference} (paired)")
    stats = {column: aggregate(results, column) for column, _, _ in present}
    delta = paired_delta(results, "val_loss", reference) if reference else {}
    first = {r.variant: r for r in reversed(results)}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in aggregate(results, "val_loss"):
        cells = [variant, *(_cell(first[variant].values.get(e)) for e in extra), str(seeds[variant])]
        cells += [_reached_cell(stats[column][variant], fmt, seeds[variant]) if column == "tokens_to_target"
                  else stats[column][variant].format(fmt) for column, _, fmt in present]
        if reference:
            cells.append("(reference)" if variant == reference else _signed(delta.get(variant)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _reached_cell(s: Stat, fmt: str, runs: int) -> str:
    """Tokens to target over the seeds that reach it, and how many do when not all."""
    if s.n == 0:
        return "not reached"
    return s.format(fmt) + (f" ({s.n} of {runs} reach it)" if s.n < runs else "")


def _cell(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _signed(s: Stat | None) -> str:
    if s is None or math.isnan(s.mean):
        return "-"
    return f"{s.mean:+.4f}" + (f" ± {s.std:.4f}" if s.n > 1 else "")


def pivot_table(results: list[RunResult], rows: str, cols: str, column: str = "val_loss",
                fmt: str = "{:.3f}") -> str:
    """A grid rows x cols (field paths) of `column`: each variant's mean over its seeds, and in each cell the
    lowest of those means (the cell's variants differ in the other fields, e.g. a swept learning rate).
    The mean first: a minimum over seeds as well would pick the luckiest seed, not the best setting."""
    seeds: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        seeds[(r.values[rows], r.values[cols], r.variant)].append(r.values[column])
    cells: dict[tuple, list[float]] = defaultdict(list)
    for (rv, cv, _), values in seeds.items():
        cells[(rv, cv)].append(statistics.fmean(values))
    row_values = sorted({k[0] for k in cells})
    col_values = sorted({k[1] for k in cells})
    lines = [f"| {rows} \\ {cols} | " + " | ".join(map(str, col_values)) + " |",
             "|" + "---|" * (len(col_values) + 1)]
    for rv in row_values:
        lines.append(f"| {rv} | " + " | ".join(fmt.format(min(cells[(rv, cv)])) if (rv, cv) in cells else "-"
                                              for cv in col_values) + " |")
    return "\n".join(lines)
