"""The committed experiment results: `python -m experiments expN --report` rebuilds each folder from its run
summaries byte for byte, and every number the README states is the one its results.csv gives."""

import csv
import math
import shutil
import statistics
from pathlib import Path

import matplotlib
import pytest

from experiments import EXPERIMENTS
from experiments.__main__ import main

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and "runs" not in p.relative_to(folder).parts}


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_report_rebuilds_the_committed_folder_byte_for_byte(name, tmp_path):
    committed = RESULTS / name
    if (committed / "runs").is_dir():
        shutil.copytree(committed / "runs", tmp_path / "results" / name / "runs")
    assert main([name, "--report", "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]) == 0
    rebuilt, want = _files(tmp_path / "results" / name), _files(committed)
    assert sorted(rebuilt) == sorted(want), "the committed folder holds exactly what --report writes"
    for relative, path in want.items():
        if relative.endswith(".png") and f"Matplotlib version{matplotlib.__version__}".encode() not in path.read_bytes():
            continue  # drawn by another matplotlib: its pixels may differ, its numbers are checked below
        assert rebuilt[relative].read_bytes() == path.read_bytes(), f"{name}/{relative} is not what --report writes"


def _rows(name: str) -> list[dict[str, str]]:
    path = RESULTS / name / "results.csv"
    if not path.is_file():
        pytest.skip(f"{name} has no summarised run yet")
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_readme_number_is_results_csv(name):
    """Recomputed here from results.csv alone, independently of experiments/results.py: each variant's mean
    final loss in the table, and each verdict's paired difference and 95% t-interval."""
    from scipy import stats

    rows, readme = _rows(name), (RESULTS / name / "README.md").read_text()
    experiment = EXPERIMENTS[name]
    by_variant: dict[str, dict[int, dict[str, str]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], {})[int(row["seed"])] = row
    for variant, seeds in by_variant.items():
        mean = statistics.fmean(float(r["val_loss"]) for r in seeds.values())
        line = next(line for line in readme.splitlines() if line.startswith(f"| {variant} |"))
        assert f" {mean:.4f}" in line, (variant, mean, line)
    for h in experiment.hypotheses:
        variant, reference = _best(by_variant, h.variant), _best(by_variant, h.reference)
        if variant is None or reference is None:
            continue
        line = next(line for line in readme.splitlines() if line.startswith(f"| {h.claim} |"))
        assert f"{variant} − {reference}" in line, line
        diffs = [float(by_variant[variant][s][h.column]) - float(by_variant[reference][s][h.column])
                 for s in sorted(set(by_variant[variant]) & set(by_variant[reference]))]
        mean = statistics.fmean(diffs)
        if len(diffs) < 2:
            assert f"{mean:+.4f} (1 seed: no interval)" in line and "**inconclusive**" in line
            continue
        test = stats.ttest_1samp(diffs, 0.0)
        half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        low, high = mean - half, mean + half
        assert f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] | {len(diffs)} | {test.pvalue:.2g} |" in line, (line, mean, low, high)
        word = "inconclusive" if low <= 0 <= high else "supported" if (high < 0) == h.lower else "refuted"
        assert f"**{word}**" in line, line


def _best(by_variant: dict, pattern: str) -> str | None:
    import fnmatch

    matches = fnmatch.filter(list(by_variant), pattern)
    if not matches:
        return None
    return min(matches, key=lambda v: statistics.fmean(float(r["val_loss"]) for r in by_variant[v].values()))
