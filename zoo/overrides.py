"""Field-path edits and diffs of specs: `--set a.b.c=value`, preset variants, `zoo diff`.

An edit works on the spec's plain-data form and the result is validated as a whole, so every
change is typed and checked by the spec itself (values are parsed as JSON, never evaluated).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

S = TypeVar("S", bound=BaseModel)


class SpecError(ValueError):
    """A bad spec or edit; the message is one line naming the field and the fix."""


def parse_assignment(text: str) -> tuple[str, Any]:
    """'model.ffn.top_k=4' -> ('model.ffn.top_k', 4). Values are JSON, or else a plain string."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise SpecError(f"--set expects path=value (e.g. model.ffn.top_k=4), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path.strip(), value


def with_changes(spec: S, changes: dict[str, Any]) -> S:
    """A validated copy of `spec` with each dotted path set to its value (a spec or plain data)."""
    data = spec.model_dump(mode="json")
    for path, value in changes.items():
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        _set_path(data, path, value)
    return validate(type(spec), data)


def apply_sets(spec: S, assignments: list[str]) -> S:
    return with_changes(spec, dict(parse_assignment(a) for a in assignments))


def validate(cls: type[S], data: Any) -> S:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise SpecError(_one_line(err, data)) from None


def _set_path(data: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        here = ".".join(keys[:depth]) or "the spec"
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise SpecError(f"{here} is a list of {len(node)}; use an index 0..{len(node) - 1}, got {key!r}")
            key = int(key)
        elif not isinstance(node, dict) or key not in node:
            valid = ", ".join(sorted(node)) if isinstance(node, dict) else "none (it is a value)"
            raise SpecError(f"unknown field {'.'.join(keys[: depth + 1])!r}; valid keys at {here}: {valid}")
        if depth == len(keys) - 1:
            if key == "kind" and isinstance(node, dict) and node.get("kind") != value:
                # A new kind takes that kind's defaults: the old kind's fields would not fit it.
                node.clear()
            node[key] = value
        else:
            node = node[key]


def _one_line(err: ValidationError, data: Any) -> str:
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
