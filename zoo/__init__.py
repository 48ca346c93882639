"""Blueberry Zoo: a declarative model zoo for Mixture-of-Experts LLM research."""

from zoo.builders import build, model_config

__all__ = ["build", "model_config"]
