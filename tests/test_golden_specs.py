"""Golden dumps (axlearn's habit): every registered preset's resolved spec is checked in as
tests/golden/<preset>.json, so a change to a default in zoo/specs.py, to a preset or to a variant's
diff shows up as a failing test naming the fields that moved, instead of silently changing a run.

The dump is the spec's JSON form, the data `zoo show --json` prints and every run writes as its
spec.json (the file a checkpoint is rebuilt from), re-serialised with sorted keys so that reordering
fields in specs.py is no churn. It holds no paths or timestamps, only the presets' values.

When a change is meant, regenerate the goldens and commit them with the change:

    python -m pytest tests/test_golden_specs.py --update-goldens
"""

import json
from pathlib import Path

import pytest

from zoo import presets

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "golden"
UPDATE = "python -m pytest tests/test_golden_specs.py --update-goldens"
SHOWN_CHANGES = 10  # the message lists this many changed fields, then counts the rest


def golden_text(name: str) -> str:
    spec_json = presets.get(name).model_dump_json()
    return json.dumps(json.loads(spec_json), indent=2, sort_keys=True) + "\n"


def _leaves(node, prefix: str = "") -> dict:
    """{dotted path: leaf value} of plain JSON data (zoo.overrides.flatten's paths, for a file no spec may read)."""
    if isinstance(node, dict) and node:
        return {p: v for key, value in node.items() for p, v in _leaves(value, f"{prefix}{key}.").items()}
    if isinstance(node, list) and node:
        return {p: v for i, value in enumerate(node) for p, v in _leaves(value, f"{prefix}{i}.").items()}
    return {prefix.removesuffix("."): node}


def _changes(golden: str, now: str) -> list[str]:
    """'path: golden value -> value now' for every leaf that differs."""
    old, new = _leaves(json.loads(golden)), _leaves(json.loads(now))

    def show(side: dict, path: str) -> str:
        return json.dumps(side[path]) if path in side else "<absent>"

    paths = sorted(set(old) | set(new))
    return [f"{p}: {show(old, p)} -> {show(new, p)}" for p in paths if old.get(p, ...) != new.get(p, ...)]


@pytest.mark.parametrize("name", presets.names())
def test_preset_matches_its_golden(name, request):
    path, text = GOLDEN_DIR / f"{name}.json", golden_text(name)
    where = path.relative_to(ROOT)
    if request.config.getoption("--update-goldens"):
        GOLDEN_DIR.mkdir(exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        return
    if not path.is_file():
        pytest.fail(f"preset {name} has no golden dump: {where} is missing; write it with: {UPDATE}")
    golden = path.read_text()
    if golden != text:
        changes = _changes(golden, text)
        listed = "; ".join(changes[:SHOWN_CHANGES]) + (f"; and {len(changes) - SHOWN_CHANGES} more"
                                                       if len(changes) > SHOWN_CHANGES else "")
        pytest.fail(f"preset {name} no longer resolves to {where}: "
                    f"{listed or 'the same values, formatted differently'}. "
                    f"If the change is meant, regenerate the goldens with: {UPDATE}")


def test_every_golden_has_a_preset(request):
    stale = sorted({p.stem for p in GOLDEN_DIR.glob("*.json")} - set(presets.names()))
    if request.config.getoption("--update-goldens"):
        for name in stale:
            (GOLDEN_DIR / f"{name}.json").unlink()
        return
    files = ", ".join(str((GOLDEN_DIR / f"{name}.json").relative_to(ROOT)) for name in stale)
    assert not stale, f"{files}: no registered preset has that name; delete it, or regenerate with: {UPDATE}"
