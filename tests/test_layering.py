"""Arrows point one way: experiments and benchmarks -> training -> zoo, and blocks import neither
pydantic, fiddle, training, nor any zoo module outside zoo.blocks (specs, kinds, builders, ...)."""

import ast
from pathlib import Path

import pytest

import zoo.blocks

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("pydantic", "fiddle", "training")
# What each package must not import (nested and lazy imports included): the layers above it.
ABOVE = {"zoo": ("training", "experiments", "benchmarks"), "training": ("experiments", "benchmarks")}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _forbidden_in_blocks(name: str) -> bool:
    return _within(name, FORBIDDEN) or (_within(name, ("zoo",)) and not _within(name, ("zoo.blocks",)))


def test_blocks_import_no_config_library():
    files = sorted(Path(zoo.blocks.__file__).parent.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in _imports(path):
            assert not _forbidden_in_blocks(name), f"{path.name} imports {name}: blocks must stay plain torch"


def test_the_check_catches_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from pydantic import BaseModel\nimport fiddle as fdl\nfrom zoo.kinds import register\n\n"
                   "def f():\n    from training import trainer\n    import zoo.specs\n")
    names = _imports(bad)
    assert names == {"pydantic", "fiddle", "zoo.kinds", "training", "zoo.specs"}
    assert all(_forbidden_in_blocks(name) for name in names)
    assert not any(_forbidden_in_blocks(name) for name in ("zoo.blocks.rope", "zoo.blocks", "torch", "zoology"))


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_imports_point_down_the_layers(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    wrong = [f"{path.relative_to(ROOT)} imports {name}" for path in files for name in sorted(_imports(path))
             if _within(name, ABOVE[package])]
    assert not wrong, f"{package} may not import {', '.join(ABOVE[package])}: " + "; ".join(wrong)
