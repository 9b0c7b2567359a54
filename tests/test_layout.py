"""The house rules of ``src/cellmask`` that a linter does not check (``make lint`` checks the import
floors and circles): what the top level holds, package faces that only hand names on, and
modules small enough to hold one concern."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cellmask"
TOP_LEVEL_MODULES = {"__init__.py", "cli.py", "config.py", "paths.py", "errors.py", "plot.py"}
"""The only modules at the top: the command line and the leaves (stages are packages)."""
ALIASES = {"tune.py": "cellmask.evaluate.tune"}
"""One-release aliases of moved modules a user's notebook may import (each only re-exports)."""
MAX_LINES = 420
"""~400 lines: past it a module is several concerns (split it into a package)."""


def test_the_top_level_holds_the_command_line_the_leaves_and_packages():
    modules = {p.name for p in PACKAGE.glob("*.py")} - set(ALIASES)
    assert modules <= TOP_LEVEL_MODULES, f"loose modules at the top: {sorted(modules - TOP_LEVEL_MODULES)}"
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert {"data", "models", "engine", "training", "predict", "evaluate", "demo", "kaggle"} <= packages


def test_package_faces_only_hand_names_on():
    for init in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        for i, node in enumerate(tree.body):
            docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            names = (
                [t.id for t in node.targets if isinstance(t, ast.Name)]
                if isinstance(node, ast.Assign)
                else []
            )
            ok = (
                docstring
                or isinstance(node, ast.Import | ast.ImportFrom)
                or names in (["__all__"], ["__version__"])
            )
            assert ok, f"{init.relative_to(PACKAGE.parent)}:{node.lineno}: a package face holds logic"


def test_no_module_is_several_concerns():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def test_a_moved_module_keeps_a_warning_alias_for_one_release():
    import importlib
    import sys

    for name, target in ALIASES.items():
        module = f"cellmask.{name.removesuffix('.py')}"
        sys.modules.pop(module, None)
        with pytest.warns(DeprecationWarning, match=target):
            alias = importlib.import_module(module)
        moved = importlib.import_module(target)
        assert all(getattr(alias, n) is getattr(moved, n) for n in alias.__all__)
