"""Field-path edits and diffs of specs: `--set a.b.c=value`, preset variants, `zoo diff`.

An edit works on the spec's plain-data form and the result is validated as a whole, so every
change is typed and checked by the spec itself (values are parsed as JSON, never evaluated). A new
`kind` starts its slot from that kind's defaults; later edits in the same call change them.
"""

from __future__ import annotations

import json
import types
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import to_jsonable_python

S = TypeVar("S", bound=BaseModel)


class SpecError(ValueError):
    """A bad spec or edit; the message is one line naming the field and the fix."""


def _parse(text: str) -> tuple[str, Any, str]:
    """'model.ffn.top_k=4' -> ('model.ffn.top_k', 4, '4'): the path, the value (JSON, or else a plain
    string) and the value's text as typed."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise SpecError(f"--set expects path=value (e.g. model.ffn.top_k=4), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path.strip(), value, raw


def with_changes(spec: S, changes: dict[str, Any]) -> S:
    """A validated copy of `spec` with each dotted path set to its value (a spec or plain data)."""
    return _edit(spec, [(path, value, None) for path, value in changes.items()])


def apply_sets(spec: S, assignments: list[str]) -> S:
    """`with_changes` from `--set path=value` texts. A value JSON reads as a number or a boolean is kept
    as its text when the field is a string (`data.source=2024` is the folder "2024")."""
    return _edit(spec, [_parse(a) for a in assignments])


def validate(cls: type[S], data: Any) -> S:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise SpecError(validation_message(err, data)) from None


def _edit(spec: S, edits: list[tuple[str, Any, str | None]]) -> S:
    cls = type(spec)
    data = spec.model_dump(mode="json")
    for path, value, text in edits:
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        _set_path(cls, data, path, value, text)
    return validate(cls, data)


def _set_path(cls: type[BaseModel], data: dict, path: str, value: Any, text: str | None = None) -> None:
    """Set `path` in `data` (the plain form of a `cls`), walking the declared types beside the data so
    that a new `kind` can start from that kind's defaults and a value can be checked against its field."""
    keys = path.split(".")
    node: Any = data
    annotation: Any = cls  # the declared type of `node`
    for depth, key in enumerate(keys):
        here = ".".join(keys[:depth]) or "the spec"
        last = depth == len(keys) - 1
        slot = annotation
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise SpecError(f"{here} is a list of {len(node)}; use an index 0..{len(node) - 1}, got {key!r}")
            key = int(key)
            annotation = _item_type(annotation)
        else:
            model = _model_of(annotation, node)
            settable = set(node) if isinstance(node, dict) else set()
            if last and model and isinstance(node, dict):
                settable |= set(model.model_fields)  # a new kind's required field is not in the node yet
            if key not in settable:
                valid = ", ".join(sorted(settable)) if isinstance(node, dict) else "none (it is a value)"
                raise SpecError(f"unknown field {'.'.join(keys[: depth + 1])!r}; valid keys at {here}: {valid}")
            annotation = model.model_fields[key].annotation if model else None
        if not last:
            node = node[key]
        elif key == "kind" and node.get("kind") != value:
            # A new kind starts from its own defaults: the old kind's fields would not fit it.
            node.clear()
            node.update(_kind_defaults(slot, value))
            node[key] = value
        else:
            node[key] = _prefer_text(annotation, value, text)


def _members(annotation: Any) -> list[Any]:
    """The types a slot may hold: Annotated, Optional and unions unwrapped, None dropped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [] if annotation is type(None) else [annotation]


def _specs(annotation: Any) -> list[type[BaseModel]]:
    return [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]


def _kind(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("kind")
    return field.default if field is not None else None


def _model_of(annotation: Any, node: Any) -> type[BaseModel] | None:
    """The spec class of a dict node: the one member of its slot, or the member its `kind` names."""
    models = _specs(annotation)
    if len(models) == 1:
        return models[0]
    if isinstance(node, dict):
        return next((m for m in models if _kind(m) == node.get("kind")), None)
    return None


def _item_type(annotation: Any) -> Any:
    lists = [m for m in _members(annotation) if get_origin(m) is list]
    return get_args(lists[0])[0] if lists else None


def _kind_defaults(slot: Any, kind: Any) -> dict[str, Any]:
    """The plain data of kind `kind` in `slot` with every field that has a default; a required field is
    left out, so validation names it. An unknown kind gives {} (validation lists the valid kinds)."""
    model = next((m for m in _specs(slot) if _kind(m) == kind), None)
    if model is None:
        return {}
    return {name: to_jsonable_python(field.get_default(call_default_factory=True))
            for name, field in model.model_fields.items() if not field.is_required()}


def _prefer_text(annotation: Any, value: Any, text: str | None) -> Any:
    """`text` instead of its JSON reading `value` when only the text fits the field (a string field
    given 2024 or true); otherwise `value`, and validation reports what is wrong with it."""
    if text is None or isinstance(value, str) or annotation is None:
        return value
    adapter = TypeAdapter(annotation)
    try:
        adapter.validate_python(value)
    except ValidationError:
        try:
            adapter.validate_python(text)
        except ValidationError:
            return value
        return text
    return value


def validation_message(err: ValidationError, data: Any) -> str:
    """One line: the first invalid field (union tags dropped), what is wrong, the value given."""
    first = err.errors()[0]
    path = _readable_loc(first["loc"], data)
    message = first["msg"].removeprefix("Value error, ")
    got = f" (got {first['input']!r})" if first["type"] not in ("value_error", "missing") and "input" in first else ""
    more = f" [and {err.error_count() - 1} more]" if err.error_count() > 1 else ""
    return f"{path or 'spec'}: {message}{got}{more}"


def _readable_loc(loc: tuple, data: Any) -> str:
    """Drop the union tags pydantic puts in error locations ('model.ffn.moe.top_k' -> 'model.ffn.top_k')."""
    parts, node = [], data
    for item in loc:
        if isinstance(node, dict) and item not in node and node.get("kind") == item:
            continue
        parts.append(str(item))
        node = node[item] if isinstance(node, (dict, list)) and _has(node, item) else None
    return ".".join(parts)


def _has(node: dict | list, item: Any) -> bool:
    return item in node if isinstance(node, dict) else isinstance(item, int) and item < len(node)


def flatten(spec: BaseModel) -> dict[str, Any]:
    """{dotted path: leaf value} of a spec's JSON form."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        elif isinstance(node, list) and node:
            for i, value in enumerate(node):
                walk(value, f"{prefix}.{i}")
        else:
            out[prefix] = node

    walk(spec.model_dump(mode="json"), "")
    return out


ABSENT = "<absent>"


def diff(a: BaseModel, b: BaseModel) -> list[tuple[str, Any, Any]]:
    """(path, value in a, value in b) for every leaf that differs; ABSENT where a side lacks it."""
    fa, fb = flatten(a), flatten(b)
    paths = list(fa) + [p for p in fb if p not in fa]
    return [(p, fa.get(p, ABSENT), fb.get(p, ABSENT)) for p in paths if fa.get(p, ABSENT) != fb.get(p, ABSENT)]
