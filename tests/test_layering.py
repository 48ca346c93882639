"""Arrows point one way: blocks import neither pydantic, fiddle, nor the spec/builder/training layers."""

import ast
from pathlib import Path

import zoo.blocks

FORBIDDEN = ("pydantic", "fiddle", "zoo.specs", "zoo.builders", "zoo.presets", "zoo.overrides", "training")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_blocks_import_no_config_library():
    files = sorted(Path(zoo.blocks.__file__).parent.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in _imports(path):
            assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), (
                f"{path.name} imports {name}: blocks must stay plain torch"
            )


def test_the_check_catches_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from pydantic import BaseModel\nimport fiddle as fdl\n")
    assert {"pydantic", "fiddle"} <= _imports(bad)


def test_zoo_does_not_import_training():
    """experiments -> training -> zoo: only the `zoo` command (the application on top) may reach training."""
    root = Path(zoo.blocks.__file__).parents[1]
    for path in sorted(root.rglob("*.py")):
        if path.name == "cli.py" and path.parent == root:
            continue
        for name in _imports(path):
            assert not (name == "training" or name.startswith("training.")), f"{path} imports {name}"
