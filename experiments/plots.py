"""PNG plots of an experiment: every variant, mean over seeds with error bars of the std over seeds.

    val_loss.png           validation loss against training tokens
    val_loss_vs_flops.png  ... against training FLOPs
    val_loss_vs_time.png   ... against training seconds
    max_vio.png            MaxVio per training batch (mean over MoE layers) against training tokens, MoE variants
    max_vio_global.png     MaxVio over the validation set (mean over MoE layers), MoE variants
    expert_load.png  experts' shares of routed tokens at the last logged step, by load rank, per MoE layer
    loss_vs_<x>.png  final validation loss against a swept field (log x), one line per group

With one seed there is no spread to show: the plot says "1 seed" instead of drawing zero-size bars.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.results import RunResult, aggregate, curve_stats, eval_curve  # noqa: E402

DPI = 120


def _variants(results: list[RunResult]) -> list[str]:
    return list(dict.fromkeys(r.variant for r in results))


def _colors(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _seeds_note(results: list[RunResult]) -> str:
    counts = sorted({s.n for s in aggregate(results, "val_loss").values()})
    n = counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"mean ± std over {n} seeds" if counts[-1] > 1 else "1 seed: no error bars"


def curves(results: list[RunResult], x: str, y: str, ylabel: str, title: str, path: Path,
           variants: list[str] | None = None, xlabel: str = "training tokens") -> None:
    """`y` at each evaluation against `x` ("tokens", "flops" or "train_s"), mean over seeds with error
    bars of their std (both ways where x differs between seeds, as training time does)."""
    variants = variants or _variants(results)
    fig, ax = plt.subplots(figsize=(8, 5))
    for variant, color in zip(variants, _colors(len(variants))):
        xs, ys = eval_curve(results, variant, x, y)
        if not xs:
            continue
        ax.errorbar([s.mean for s in xs], [s.mean for s in ys], yerr=[_bar(s) for s in ys],
                    xerr=[_bar(s) for s in xs] if any(_bar(s) for s in xs) else None, label=variant, color=color,
                    marker="o", markersize=3, capsize=3, linewidth=1.2)
    _finish(fig, ax, results, xlabel, ylabel, title, path, len(variants))


def tagged_curves(results: list[RunResult], tag: str, ylabel: str, title: str, path: Path,
                  variants: list[str] | None = None) -> None:
    """A curve the runs log more often than they evaluate (MaxVio per batch) against training tokens."""
    variants = variants or _variants(results)
    fig, ax = plt.subplots(figsize=(8, 5))
    for variant, color in zip(variants, _colors(len(variants))):
        xs, stats = curve_stats(results, variant, tag)
        if xs:
            ax.errorbar(xs, [s.mean for s in stats], yerr=[_bar(s) for s in stats], label=variant, color=color,
                        linewidth=1.0, elinewidth=0.5, alpha=0.9)
    _finish(fig, ax, results, "training tokens", ylabel, title, path, len(variants))


def _bar(s) -> float:
    return 0.0 if math.isnan(s.std) else s.std


def _finish(fig, ax, results, xlabel: str, ylabel: str, title: str, path: Path, n: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} ({_seeds_note(results)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if n > 8 else 9, ncol=2 if n > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def expert_load(results: list[RunResult], title: str, path: Path) -> None:
    """Per MoE variant and layer, the experts' shares of routed tokens at the last logged step, sorted
    from the most to the least loaded: expert indices mean nothing across seeds, load ranks do."""
    variants = [v for v in _variants(results) if any(r.expert_share for r in results if r.variant == v)]
    if not variants:
        return
    all_layers = sorted({layer for r in results for layer in r.expert_share})
    color = dict(zip(all_layers, _colors(len(all_layers))))
    cols = min(3, len(variants))
    rows = math.ceil(len(variants) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, variant in zip(axes.flat, variants):
        runs = [r for r in results if r.variant == variant]
        for layer in sorted(runs[0].expert_share):
            shares = [sorted(r.expert_share[layer], reverse=True) for r in runs]
            n_experts = len(shares[0])
            means = [sum(s[e] for s in shares) / len(shares) for e in range(n_experts)]
            stds = [_std([s[e] for s in shares]) for e in range(n_experts)]
            ax.errorbar(range(1, n_experts + 1), means, yerr=stds, marker="o", markersize=3, capsize=2,
                        color=color[layer], label=f"layer {layer}")
        ax.axhline(1 / n_experts, color="gray", linestyle="--", linewidth=1, label="uniform")
        ax.set_title(variant, fontsize=9)
        ax.set_xlabel("expert, by load rank (1 = most loaded)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(variants):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("share of routed tokens")
    fig.suptitle(f"{title}: expert load at the last logged step ({_seeds_note(results)})")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def sweep(results: list[RunResult], x: str, groups: tuple[str, ...], title: str, path: Path,
          column: str = "val_loss", ylabel: str = "final validation loss") -> None:
    """Final `column` against the field `x` (log scale), one line per combination of `groups`."""
    lines: dict[tuple, dict[float, list[float]]] = {}
    for r in results:
        key = tuple(r.values[g] for g in groups)
        lines.setdefault(key, {}).setdefault(r.values[x], []).append(r.values[column])
    fig, ax = plt.subplots(figsize=(8, 5))
    for (key, points), color in zip(sorted(lines.items()), _colors(len(lines))):
        xs = sorted(points)
        means = [sum(points[v]) / len(points[v]) for v in xs]
        label = ", ".join(f"{g.split('.')[-1]}={k}" for g, k in zip(groups, key)) or None
        ax.errorbar(xs, means, yerr=[_std(points[v]) for v in xs], marker="o", capsize=3, color=color, label=label)
    ax.set_xscale("log")
    ticks = sorted({v for points in lines.values() for v in points})
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} ({_seeds_note(results)})")
    ax.grid(alpha=0.3, which="both")
    if groups:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
