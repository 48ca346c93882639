"""Spec kind -> builder. A builder is a pure function from a spec (plus the dimensions its parent
owns) to an `fdl.Config`; it never constructs a module."""

from collections.abc import Callable

import fiddle as fdl

Builder = Callable[..., fdl.Config]
_BUILDERS: dict[tuple[str, str], Builder] = {}


def register(slot: str, kind: str) -> Callable[[Builder], Builder]:
    def decorate(fn: Builder) -> Builder:
        if (slot, kind) in _BUILDERS:
            raise ValueError(f"a builder for {slot} kind {kind!r} is already registered")
        _BUILDERS[(slot, kind)] = fn
        return fn

    return decorate


def build_slot(slot: str, spec, **parent_dims) -> fdl.Config:
    """The config for `spec` in `slot` (attention, ffn, router, ...), chosen by `spec.kind`."""
    try:
        builder = _BUILDERS[(slot, spec.kind)]
    except KeyError:
        raise ValueError(f"no builder for {slot} kind {spec.kind!r}; known: {kinds(slot)}") from None
    return builder(spec, **parent_dims)


def kinds(slot: str) -> list[str]:
    return sorted(kind for s, kind in _BUILDERS if s == slot)
