"""What a kernel imports, against what it may import: the offline inference kernel has only the
standard library, the base image that ``datasets/cellmask-wheels/base_image.json`` declares and
the wheels dataset (``make wheels``).

Imports are collected two ways, since each misses what the other sees:

- statically, :func:`code_imports` / :func:`notebook_imports`: every ``import`` statement of the
  notebook's code cells, on every branch (the Kaggle-only install path too);
- at run time, the new entries of ``sys.modules`` while the kernel runs (the tests record them):
  every module cellmask and its dependencies import on the path the kernel takes.

:func:`undeclared_imports` maps top-level module names to the distributions that provide them
(``importlib.metadata.packages_distributions``) and lists each one that is neither in the
standard library nor provided by an allowed distribution (:func:`kernel_distributions`).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cellmask.kaggle.wheels import normalize_name, requirement_closure

__all__ = [
    "code_imports",
    "kernel_distributions",
    "notebook_imports",
    "undeclared_imports",
]


def _python_lines(source: str) -> str:
    """``source`` without IPython magics and shell escapes (``%matplotlib``, ``!pip``)."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def code_imports(source: str) -> set[str]:
    """Top-level names of the modules ``source`` imports anywhere (``import a.b`` -> ``a``;
    relative imports are left out).

    Raises:
        SyntaxError: ``source`` is not Python (magic and shell lines are skipped first).
    """
    names = set()
    for node in ast.walk(ast.parse(_python_lines(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def notebook_imports(nb: Mapping[str, Any]) -> set[str]:
    """:func:`code_imports` of every code cell of a notebook (``nbformat`` node or plain JSON)."""
    from cellmask.kaggle.notebooks import cell_source

    return set().union(*(code_imports(cell_source(c)) for c in nb["cells"] if c["cell_type"] == "code"))


def kernel_distributions(
    base: Mapping[str, Any],
    wheels: Iterable[str],
    requires: Callable[[str], Iterable[str] | None] | None = None,
) -> set[str]:
    """Normalised names of every distribution the kernel has: the base image's (``provided``)
    and the wheels', each with what it requires (an installed distribution brings its own
    dependencies), for ``base["python"]`` on Linux.

    Args:
        requires: ``name -> Requires-Dist lines`` (default: this environment's metadata).
    """
    return requirement_closure([*base["provided"], *wheels], str(base["python"]), requires)


def undeclared_imports(
    modules: Iterable[str] | Mapping[str, str | None],
    allowed: Iterable[str],
    distributions: Mapping[str, list[str]] | None = None,
) -> list[str]:
    """One line per top-level module of ``modules`` that the kernel may not import: neither in
    the standard library nor provided by a distribution of ``allowed``.

    Args:
        modules: module names (``cellmask.predict`` counts as ``cellmask``), or ``{name: file}``
            as recorded from ``sys.modules``: a top-level module without a file that no
            distribution provides was made at run time by the code that imported it (the
            ``__mp_main__`` alias of multiprocessing, Cython's shared ``_cython_3_x`` module,
            torch's generated ``_remote_module_*``) and is not reported; one with a file is a
            local module the kernel would not have.
        allowed: distribution names (:func:`kernel_distributions`).
        distributions: ``top-level name -> distributions`` (default:
            ``importlib.metadata.packages_distributions()`` of this environment).
    """
    if distributions is None:
        from importlib.metadata import packages_distributions

        distributions = packages_distributions()
    files = dict(modules) if isinstance(modules, Mapping) else None
    allowed = {normalize_name(n) for n in allowed}
    problems = []
    for top in sorted({m.partition(".")[0] for m in modules}):
        if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "__main__":
            continue
        dists = sorted({normalize_name(d) for d in distributions.get(top, [])})
        if not dists:
            if files is not None and files.get(top) is None:
                continue  # made at run time, not imported from a file
            where = f" ({files[top]})" if files else ""
            problems.append(f"{top}{where}: no installed distribution provides it (a local module?)")
        elif not allowed & set(dists):
            problems.append(
                f"{top}: from {', '.join(dists)}, neither in the base image (base_image.json) nor in the wheels"
            )
    return problems
