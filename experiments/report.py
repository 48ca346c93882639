"""An experiment's results folder: results.csv, table.md, PNG plots and a TensorBoard run per variant.

Everything here is regenerated from the run folders; README.md (written by a person, from these
numbers) is the one file left alone.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

from experiments import plots
from experiments.base import Experiment
from experiments.results import (
    RunResult,
    aggregate,
    curve_stats,
    markdown_table,
    pivot_table,
    read_scalars,
    write_csv,
)
from experiments.runner import Run

GENERATED = ("results.csv", "table.md", "val_loss.png", "max_vio.png", "expert_load.png")
TENSORBOARD = "tensorboard"


def write_report(experiment: Experiment, runs: list[Run], results: list[RunResult], out: Path,
                 *, smoke: bool = False) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*GENERATED, *(p.name for p in out.glob("loss_vs_*.png"))]:
        (out / stale).unlink(missing_ok=True)
    write_csv(results, out / "results.csv")
    (out / "table.md").write_text(table_markdown(experiment, results, smoke=smoke))
    title = experiment.name
    plots.curves(results, "val/loss", "validation loss", f"{title}: validation loss", out / "val_loss.png")
    moe = [v for v in experiment.variants if any("max_vio" in r.curves for r in results if r.variant == v)]
    if moe:
        plots.curves(results, "max_vio", "MaxVio (mean over MoE layers)", f"{title}: load imbalance",
                     out / "max_vio.png", variants=moe)
        plots.expert_load(results, title, out / "expert_load.png")
    if experiment.sweep:
        name = experiment.sweep.split(".")[-1]
        plots.sweep(results, experiment.sweep, experiment.groups, f"{title}: final validation loss against {name}",
                    out / f"loss_vs_{name}.png")
    write_tensorboard(experiment, runs, results, out / TENSORBOARD)
    return sorted(p for p in out.iterdir() if p.is_file())


def table_markdown(experiment: Experiment, results: list[RunResult], *, smoke: bool = False) -> str:
    budget = experiment.active_budget(smoke)
    scale = experiment.smoke_scale if smoke else experiment.scale
    reference = experiment.reference if len(experiment.seeds_for(smoke)) > 1 else None
    extra = tuple(p for p in (*experiment.groups, experiment.sweep) if p)
    text = [f"# {experiment.name}: {experiment.title}{' (SMOKE: not a result)' if smoke else ''}", "",
            f"{budget.steps} steps x {budget.micro_batch_size} x {scale.seq_len} tokens = "
            f"{budget.tokens(scale.seq_len):,} training tokens per run{_precisions(results)}; "
            f"seeds {list(experiment.seeds_for(smoke))}; mean ± std over seeds (sample std).", "",
            markdown_table(results, experiment.metrics, reference=reference, extra=extra), ""]
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


def write_tensorboard(experiment: Experiment, runs: list[Run], results: list[RunResult], out: Path) -> None:
    """One TensorBoard run per variant: each scalar the runs logged, as its mean over seeds at every
    step all seeds logged, plus `seed_std/<tag>` for the validation and MoE balance curves."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(out, ignore_errors=True)
    for variant in experiment.variants:
        sources = [run.source for run in runs if run.variant == variant]
        if not sources:
            continue
        per_run = [read_scalars(source) for source in sources]
        tags = set.intersection(*(set(s) for s in per_run))
        with SummaryWriter(log_dir=str(out / variant)) as writer:
            for tag in sorted(tags):
                steps = sorted(set.intersection(*(set(s[tag]) for s in per_run)))
                for step in steps:
                    values = [s[tag][step] for s in per_run]
                    writer.add_scalar(tag, sum(values) / len(values), step)
                    if len(values) > 1 and (tag.startswith(("val/", "hellaswag/")) or tag.endswith("max_vio")):
                        mean = sum(values) / len(values)
                        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                        writer.add_scalar(f"seed_std/{tag}", std, step)


def summary_lines(experiment: Experiment, results: list[RunResult]) -> list[str]:
    """One console line per variant: final validation loss, mean +- std."""
    losses = aggregate(results, "val_loss")
    lines = []
    for variant, s in losses.items():
        xs, _ = curve_stats(results, variant, "val/loss")
        lines.append(f"  {variant:<24} val loss {s.format('{:.4f}')}  ({s.n} seed(s), {xs[-1] if xs else 0:,} tokens)")
    return lines
