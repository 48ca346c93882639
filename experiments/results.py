"""Metrics read back from each run's TensorBoard events, aggregated over seeds, written as tables.

Nothing here computes a metric: values are the trainer's own scalars (`val/loss`, `hellaswag/acc_norm`,
`perf/tokens_per_s`, `moe/layer_i/max_vio`, ...), and parameter counts are `zoo describe`'s. What is
derived is said where it is: the final value of a curve, the median of logged throughput, the mean
over MoE layers of MaxVio, and mean +- sample std over seeds.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from experiments.base import Experiment
from experiments.runner import RUN_RECORD, Run

MOE_MAX_VIO = re.compile(r"moe/layer_(\d+)/max_vio$")
MOE_LOAD = re.compile(r"moe_load/layer_(\d+)/expert_(\d+)$")

# (column, header, format): the per-run values of results.csv that the table shows.
COLUMNS = (
    ("total_params", "total params", "{:,.0f}"),
    ("active_params", "active params", "{:,.0f}"),
    ("val_loss", "val loss", "{:.3f}"),
    ("val_ppl", "val ppl", "{:.1f}"),
    ("val_acc", "val acc", "{:.3f}"),
    ("hellaswag_acc_norm", "HellaSwag acc_norm", "{:.3f}"),
    ("max_vio", "MaxVio (final)", "{:.2f}"),
    ("max_vio_mean", "MaxVio (mean over training)", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
)


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every event file of a run (a resumed run writes one per process)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = defaultdict(dict)
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values[tag].update({e.step: e.value for e in acc.Scalars(tag)})
    return dict(values)


@dataclass
class RunResult:
    variant: str
    seed: int
    values: dict[str, float]  # the row of results.csv
    curves: dict[str, dict[int, float]]  # {tag: {tokens: value}} for plots
    expert_share: dict[int, list[float]] = field(default_factory=dict)  # {layer: final share per expert}
    precision: str | None = None  # the train.precision it trained in (spec.json: auto resolved by its device)


def collect(experiment: Experiment, runs: list[Run]) -> list[RunResult]:
    from zoo.describe import describe

    results = []
    for run in runs:
        scalars = read_scalars(run.source)
        if "val/loss" not in scalars:
            raise ValueError(f"{run.source} has no val/loss scalars: is it a finished run?")
        steps = run.spec.train.steps
        tokens_per_step = run.spec.train.micro_batch_size * run.spec.train.grad_accum * run.spec.data.seq_len
        counts = describe(run.spec)
        values = {"total_params": counts["total_params"], "active_params": counts["active_params"],
                  "tokens": steps * tokens_per_step}
        for tag, column in (("val/loss", "val_loss"), ("val/ppl", "val_ppl"), ("val/acc", "val_acc"),
                            ("hellaswag/acc_norm", "hellaswag_acc_norm"), ("hellaswag/acc", "hellaswag_acc")):
            if tag in scalars:
                values[column] = scalars[tag][max(scalars[tag])]
        throughput = scalars.get("perf/tokens_per_s", {})
        # The first step carries one-off costs (allocation, warm caches): the median of the others.
        steady = [v for s, v in throughput.items() if s > 1] or list(throughput.values())
        if steady:
            values["tokens_per_s"] = statistics.median(steady)
        vio = _layer_mean({tag: curve for tag, curve in scalars.items() if MOE_MAX_VIO.match(tag)})
        if vio:
            values["max_vio"] = vio[max(vio)]
            values["max_vio_mean"] = statistics.fmean(vio.values())
        record = run.source / RUN_RECORD
        if record.is_file():
            values["wall_s"] = json.loads(record.read_text())["wall_s"]
        for path in (experiment.sweep, *experiment.groups):
            if path:
                values[path] = experiment.sweep_value(run.variant, path)
        curves = {"val/loss": scalars["val/loss"]}
        if vio:
            curves["max_vio"] = vio
        curves = {tag: {step * tokens_per_step: v for step, v in curve.items()} for tag, curve in curves.items()}
        saved = run.source / "spec.json"
        # Only the precision: a folder saved by an older zoo may hold a spec this one's rules refuse.
        precision = json.loads(saved.read_text())["train"]["precision"] if saved.is_file() else None
        results.append(RunResult(run.variant, run.seed, values, curves, _final_shares(scalars), precision))
    return results


def _layer_mean(curves: dict[str, dict[int, float]]) -> dict[int, float]:
    """The mean over MoE layers at every step that all layers logged."""
    if not curves:
        return {}
    steps = set.intersection(*(set(c) for c in curves.values()))
    return {s: statistics.fmean(c[s] for c in curves.values()) for s in sorted(steps)}


def _final_shares(scalars: dict[str, dict[int, float]]) -> dict[int, list[float]]:
    shares: dict[int, dict[int, float]] = defaultdict(dict)
    for tag, curve in scalars.items():
        if match := MOE_LOAD.match(tag):
            shares[int(match[1])][int(match[2])] = curve[max(curve)]
    return {layer: [experts[e] for e in sorted(experts)] for layer, experts in sorted(shares.items())}


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
        cells += [stats[column][variant].format(fmt) for column, _, fmt in present]
        if reference:
            cells.append("(reference)" if variant == reference else _signed(delta.get(variant)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _signed(s: Stat | None) -> str:
    if s is None or math.isnan(s.mean):
        return "-"
    return f"{s.mean:+.3f}" + (f" ± {s.std:.3f}" if s.n > 1 else "")


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
