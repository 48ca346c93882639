"""Presets: named, nullary functions returning a RunSpec. Variants call a base and change a copy.

`get(name)` returns a preset's spec; `get(name, tiny=True)` the same architecture at toy size.
"""

from zoo.presets import core, exp1, perf  # noqa: F401  (registers the presets)
from zoo.presets.registry import describe_line, names, preset
from zoo.presets.registry import get as _get
from zoo.presets.tiny import tiny
from zoo.specs import RunSpec


def get(name: str, *, tiny: bool = False) -> RunSpec:
    spec = _get(name)
    return _tiny(spec) if tiny else spec


_tiny = tiny

__all__ = ["describe_line", "get", "names", "preset", "tiny"]
