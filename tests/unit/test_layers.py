"""The layer rule and the module size rule, checked on the source tree.

Layers, top to bottom: `mission_runner` (the composition root), `stream`, `projections`,
`planner`, `writer`, `core`. Data flows down (the stream drives the projections, whose
changes drive the planner, whose plans the writer appends), and so do imports: a module may
import its own package and the packages below it, never one above; nothing imports the
composition root; `core` imports nothing of ours. Every import counts, also the ones inside
functions and under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LAYERS = ("core", "writer", "planner", "projections", "stream", "mission_runner")
RANK = {name: rank for rank, name in enumerate(LAYERS)}
MAX_LINES = 600


def _modules() -> list[Path]:
    found = (p for layer in LAYERS for p in (ROOT / layer).rglob("*.py*"))
    return sorted(p for p in found if p.suffix in (".py", ".pyi"))


def _package(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def _imported_packages(path: Path, package: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                out.append((node.lineno, package))
            elif node.module:
                out.append((node.lineno, node.module.split(".")[0]))
    return [(line, name) for line, name in out if name in RANK]


def upward_imports(path: Path, package: str) -> list[str]:
    """`path`'s imports of packages above `package` (the one it belongs to)."""
    return [
        f"{path.name}:{line} imports {name}"
        for line, name in _imported_packages(path, package)
        if name != package and RANK[name] > RANK[package]
    ]


def test_imports_point_down() -> None:
    problems = [
        f"{_package(path)}/{p}" for path in _modules() for p in upward_imports(path, _package(path))
    ]
    assert not problems, "imports that point up:\n" + "\n".join(problems)


def test_the_rule_sees_every_kind_of_import(tmp_path: Path) -> None:
    # The walker itself: an upward import inside a function or under TYPE_CHECKING counts.
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from planner import due\n"
        "def f() -> None:\n    import stream.frames\n"
        "from core import clock\nfrom . import sibling\nimport orjson\n"
    )
    found = upward_imports(planted, "writer")
    assert [p.split(" imports ")[1] for p in found] == ["planner", "stream"]
    assert upward_imports(planted, "mission_runner") == []


def _all_python() -> list[Path]:
    found = (p for top in (*LAYERS, "tests", "bench") for p in (ROOT / top).rglob("*.py*"))
    return sorted(p for p in found if p.suffix in (".py", ".pyi"))


@pytest.mark.parametrize("path", _all_python(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it"
