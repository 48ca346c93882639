"""Blueberry Zoo runtime: DeepSpeed engine, data, optimizers, checkpoints, logging, evaluation."""

# What training computes (its data, losses, updates and evaluations), as a number: bumped by any change that
# alters a run's numbers, so that experiment runs trained before the change are retrained rather than
# reported beside runs trained after it (experiments/runner.py).
RESULTS_VERSION = 1
