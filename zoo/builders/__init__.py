"""Builders: spec -> fdl.Config graph of zoo.blocks classes. Each kind's builder is part of its
registration in `zoo.kinds`; `build_slot` picks it by the spec's `kind`."""

from zoo.builders.model import build, model_config
from zoo.kinds import build_slot

__all__ = ["build", "build_slot", "model_config"]
