"""The kind registry: every attention, FFN, router and RoPE-scaling kind is one `Kind` record.

A record holds the kind's spec class, its builder, its shrink rule (for `zoo.presets.tiny` and the
experiments' `Scale`), its `describe` accounting, its model-level validation and the Hugging Face
formats that can express it. The spec unions (`union(slot)`), `build_slot`, `shrink` and
`zoo.describe` read the registry, so a new kind is one block file plus one `register` call.

pydantic fixes a discriminated union when it builds a class, so `register` and `unregister` re-point
every spec field declared with a slot's union at the registered kinds and rebuild the spec classes.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field

SLOTS = ("attention", "ffn", "router", "rope_scaling")
CACHE_BYTES = 2  # describe's KV-cache sizes are in bf16


class Spec(BaseModel):
    # No NaN or infinity in any field: every bound check passes for NaN (NaN <= 1 is False), and JSON
    # writes both as null, so spec.json could not be read back.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Size(Protocol):
    """The size a shrink aims at: `tiny()`'s toy size or an experiment's `Scale`. A kind's shrink rule
    says which sort of dimension each of its fields is; the size says what that sort becomes."""

    d_model: int
    n_heads: int
    max_experts: int | None  # None keeps expert counts

    def kv_heads(self, n_heads: int, n_kv_heads: int) -> int: ...

    def width(self, value: int, *, toy: int) -> int:
        """A width that follows d_model (an FFN's or an expert's hidden size); `toy`: its toy size."""

    def per_head(self, value: int, *, toy: int, even: bool = False) -> int:
        """A rank or head dim set per head rather than from d_model (MLA's); `even`: RoPE rotates pairs."""

    def context(self, value: int) -> int:
        """A length within the context: a RoPE scaling's original context, a sliding window."""


@dataclass(frozen=True)
class Count:
    """What `describe` reads off one built block (see zoo/describe.py for the conventions)."""

    label: str
    params: int
    active_params: int
    flops_per_token: int
    kv_cache_bytes_per_token: int = 0
    kv_cache_bytes_mha_equivalent: int = 0  # what an MHA with the same heads would cache


@dataclass(frozen=True)
class Kind:
    """One kind of one slot.

    build: (spec, **dims its parent owns) -> fdl.Config; for a RoPE scaling (a `ScalingSpec`),
        RotaryEmbedding's keyword arguments: a scaling zoo/blocks/rope.py has no rule for passes its own
        `frequencies` function and factors.
    shrink: (the spec's plain data, a Size) -> None, editing the data in place.
    describe: (built module, seq_len) -> Count; attention and FFN kinds must have one.
    check: validation against the dimensions the parent owns (attention: d_model=, where=; router:
        n_experts=, top_k=); raises ValueError naming the field and the fix.
    hf_formats: the Hugging Face model_types whose layout expresses this kind.
    """

    slot: str
    spec: type[Spec]
    build: Callable[..., Any]
    shrink: Callable[[dict, Size], None] | None = None
    describe: Callable[..., Count] | None = None
    check: Callable[..., None] | None = None
    hf_formats: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.model_fields["kind"].default


@dataclass(frozen=True)
class _SlotTag:
    """Marks a slot's union inside field annotations, so a rebuild can find and re-point it."""

    slot: str


_KINDS: dict[tuple[str, str], Kind] = {}
# Each (slot, name)'s place in its union, from its first registration and kept through unregister: a
# kind registered again (a test swapping a built-in) goes back where it was, so the unions and the
# JSON schema do not depend on what ran before.
_ORDER: dict[tuple[str, str], int] = {}


def register(kind: Kind) -> Kind:
    if kind.slot not in SLOTS:
        raise ValueError(f"slot {kind.slot!r} is not one of {', '.join(SLOTS)}")
    if "kind" not in kind.spec.model_fields:
        raise ValueError(f"{kind.spec.__name__} needs a `kind: Literal[...]` field with its name as the default")
    if (kind.slot, kind.name) in _KINDS:
        raise ValueError(f"{kind.slot} kind {kind.name!r} is already registered")
    if kind.slot in ("attention", "ffn") and kind.describe is None:
        raise ValueError(f"{kind.slot} kind {kind.name!r} needs a describe rule (zoo describe counts every layer)")
    _KINDS[(kind.slot, kind.name)] = kind
    _ORDER.setdefault((kind.slot, kind.name), len(_ORDER))
    try:
        _rebuild(kind.slot)
    except Exception:
        unregister(kind)  # a spec the unions cannot hold leaves the registry as it was
        raise
    return kind


def unregister(kind: Kind) -> None:
    del _KINDS[(kind.slot, kind.name)]
    _rebuild(kind.slot)


@contextmanager
def registered(kind: Kind) -> Iterator[Kind]:
    """`kind` registered inside the block and gone after it (a test's toy kind leaks into no other test)."""
    register(kind)
    try:
        yield kind
    finally:
        unregister(kind)


def kinds(slot: str) -> list[Kind]:
    return [_KINDS[key] for key in sorted(_KINDS, key=_ORDER.__getitem__) if key[0] == slot]


def kind_of(spec: Spec) -> Kind:
    """The record of the kind `spec` is an instance of."""
    for kind in _KINDS.values():
        if type(spec) is kind.spec:
            return kind
    raise ValueError(f"{type(spec).__name__} is not a registered kind")


def union(slot: str) -> Any:
    """The field annotation of `slot`: a union of its registered spec classes, discriminated by `kind`."""
    members = tuple(k.spec for k in kinds(slot))
    return Annotated[Union[members], Field(discriminator="kind"), _SlotTag(slot)]


def build_slot(slot: str, spec: Spec, **parent_dims) -> Any:
    """The config for `spec` in `slot`, from its kind's builder."""
    kind = _KINDS.get((slot, spec.kind))
    if kind is None:
        raise ValueError(f"no builder for {slot} kind {spec.kind!r}; known: {sorted(k.name for k in kinds(slot))}")
    return kind.build(spec, **parent_dims)


def shrink(spec: Spec, data: dict, size: Size) -> None:
    """Apply every registered kind's shrink rule inside `spec`, whose plain data is `data` (edited in
    place): a kind's rule first, then the specs it holds."""
    kind = next((k for k in _KINDS.values() if type(spec) is k.spec), None)
    if kind is not None and kind.shrink is not None:
        kind.shrink(data, size)
    for name in type(spec).model_fields:
        value = getattr(spec, name)
        if isinstance(value, Spec):
            shrink(value, data[name], size)
        elif isinstance(value, list):
            for item, item_data in zip(value, data[name]):
                if isinstance(item, Spec):
                    shrink(item, item_data, size)


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def matrix_numel(module) -> int:
    """Parameters in matrices: 2 FLOPs per token each, where a token passes through them."""
    return sum(p.numel() for p in module.parameters() if p.ndim >= 2)


def attention_flops(attn, per_key: int, seq_len: int, *, window: int | None = None) -> int:
    """An attention's forward FLOPs per token: its matrices, plus `per_key` for the scores and weighted sum
    of each key a token sees, on average (T + 1) / 2 under the causal mask; with a sliding window W < T,
    the token at position t sees min(t + 1, W) keys."""
    T, W = seq_len, window if window is not None and window < seq_len else seq_len
    mean_keys = (W * (W + 1) / 2 + (T - W) * W) / T
    return 2 * matrix_numel(attn) + round(per_key * mean_keys)


def _rebuild(slot: str) -> None:
    """Re-point the fields declared with `slot`'s union at its registered kinds, then rebuild every spec
    class. Classes are rebuilt in the order they were created, after the classes they hold: a class
    keeps a copy of its fields' schemas."""
    for cls in _spec_classes(Spec):
        for name, field in cls.model_fields.items():
            if _SlotTag(slot) in field.metadata:  # the union is the whole annotation
                members = get_args(union(slot))[0]
            else:
                members = _repointed(field.annotation, slot)
            if members is not field.annotation:
                field = copy.copy(field)
                field.annotation = members
                cls.model_fields[name] = field
        if cls.__pydantic_complete__:
            cls.model_rebuild(force=True)


def _repointed(annotation: Any, slot: str) -> Any:
    """`annotation` with the union tagged `slot` inside it replaced by the current one (itself if none)."""
    args = get_args(annotation)
    if get_origin(annotation) is Annotated and _SlotTag(slot) in args[1:]:
        return union(slot)
    new = tuple(_repointed(arg, slot) for arg in args)
    if all(a is b for a, b in zip(new, args)):
        return annotation
    if get_origin(annotation) is Annotated:
        return Annotated[(new[0], *args[1:])]
    if get_origin(annotation) in (Union, types.UnionType):
        return Union[new]
    return get_origin(annotation)[new]


def _spec_classes(cls: type[Spec]) -> Iterator[type[Spec]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _spec_classes(sub)
