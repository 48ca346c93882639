"""Builders: spec -> fdl.Config graph of zoo.blocks classes, one builder per kind."""

from zoo.builders import attention, ffn  # noqa: F401  (registers the builders)
from zoo.builders.model import build, model_config
from zoo.builders.registry import build_slot, kinds, register

__all__ = ["build", "build_slot", "kinds", "model_config", "register"]
