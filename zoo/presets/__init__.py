"""Presets: named, nullary functions returning a RunSpec. Variants call a base and change a copy.

`get(name)` returns a preset's spec; `get(name, tiny=True)` the same architecture at toy size;
`resolve(name, sets)` that spec with `--set` edits applied, what every command (training included)
starts from.
"""

from zoo.overrides import apply_sets
from zoo.presets import core, exp1, families, perf  # noqa: F401  (registers the presets)
from zoo.presets.registry import describe_line, names, preset
from zoo.presets.registry import get as _get
from zoo.presets.tiny import tiny
from zoo.specs import RunSpec

DEFAULT_PRESET = "deepseek_glm4"  # what the trainer trains without --preset


def get(name: str, *, tiny: bool = False) -> RunSpec:
    spec = _get(name)
    return _tiny(spec) if tiny else spec


def resolve(name: str, sets: list[str] | None = None, tiny: bool = False) -> RunSpec:
    """Preset `name` (at toy size with `tiny`) with `--set path=value` edits applied."""
    return apply_sets(get(name, tiny=tiny), sets or [])


_tiny = tiny

__all__ = ["DEFAULT_PRESET", "describe_line", "get", "names", "preset", "resolve", "tiny"]
