"""Blueberry Zoo runtime: DeepSpeed engine, data, optimizers, checkpoints, logging, evaluation."""
