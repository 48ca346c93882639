"""Experiments: ablations declared as a base preset + named variants (diffs) + one scale + a budget.

    python -m experiments exp1 --show     # each variant as its diff from the base, the scale, the budget
    python -m experiments exp1            # train what is missing, then write experiments/results/exp1/
    python -m experiments all --smoke     # every variant of every experiment for a few steps (CI)

See experiments/base.py for what an experiment declares, runner.py for how runs are trained and
resumed, results.py and report.py for what is read back and written.
"""

from experiments import exp1, exp2, exp3, exp4
from experiments.base import Budget, Experiment, Scale, Variant

EXPERIMENTS: dict[str, Experiment] = {e.EXPERIMENT.name: e.EXPERIMENT for e in (exp1, exp2, exp3, exp4)}

__all__ = ["EXPERIMENTS", "Budget", "Experiment", "Scale", "Variant"]
