"""The preset registry: named, nullary functions returning a RunSpec."""

from collections.abc import Callable

from zoo.overrides import SpecError
from zoo.specs import RunSpec

Preset = Callable[[], RunSpec]
_PRESETS: dict[str, Preset] = {}


def preset(fn: Preset) -> Preset:
    """Register `fn` under its name. Its docstring's first line is its description in `zoo list`."""
    if not (fn.__doc__ or "").strip():
        raise ValueError(f"preset {fn.__name__} needs a docstring saying what it is and where its numbers come from")
    if fn.__name__ in _PRESETS:
        raise ValueError(f"preset {fn.__name__} is registered twice")
    _PRESETS[fn.__name__] = fn
    return fn


def names() -> list[str]:
    return list(_PRESETS)


def describe_line(name: str) -> str:
    return (_lookup(name).__doc__ or "").strip().splitlines()[0]


def get(name: str) -> RunSpec:
    spec = _lookup(name)()
    if not isinstance(spec, RunSpec):
        raise TypeError(f"preset {name} returned {type(spec).__name__}, not a RunSpec")
    return spec


def _lookup(name: str) -> Preset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise SpecError(f"unknown preset {name!r}; known presets: {', '.join(_PRESETS)} (see `zoo list`)") from None
