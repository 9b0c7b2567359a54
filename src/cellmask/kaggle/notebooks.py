"""Notebook hygiene and parameters: the committed ``.ipynb`` files are sources, not results.

Every notebook under ``notebooks/`` is committed with its outputs stripped and its metadata
reduced to a canonical form (:func:`clean_notebook`; ``make notebooks-clean`` rewrites them),
so a diff shows code changes only and Kaggle (which pushes ``.ipynb``) and GitHub (which renders
them) read the very file that is reviewed. :func:`notebook_problems` lists what breaks the rules;
the tests fail on any.

Each notebook has exactly one code cell tagged ``parameters`` holding plain ``NAME = value``
assignments (literals only). :func:`inject_parameters` rewrites the values of that cell in
place, the way the tests run a notebook on synthetic data and ``make push-train`` pushes one
notebook per branch; there is no extra "injected" cell, so a pushed notebook reads like the
committed one.

``nbformat`` is imported on use: it is a test/tooling dependency, not a runtime one.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PARAMETERS_TAG = "parameters"
KERNELSPEC: dict[str, str] = {"display_name": "Python 3", "language": "python", "name": "python3"}
NOTEBOOK_METADATA: dict[str, Any] = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
"""The whole top-level metadata of a committed notebook."""
CELL_METADATA_KEYS = ("tags",)
"""The only cell metadata kept (the ``parameters`` tag lives there)."""

_SYS_PATH = re.compile(r"\bsys\.path\b")
_CLASS_DEF = re.compile(r"^\s*class\s+\w+", re.MULTILINE)


def _nbformat() -> Any:
    try:
        import nbformat
    except ImportError as exc:  # pragma: no cover - the test extras install it
        raise ImportError("nbformat is needed for notebook tools: pip install nbformat") from exc
    return nbformat


def read_notebook(path: str | Path) -> Any:
    """The notebook at ``path`` as an ``nbformat.NotebookNode`` (version 4)."""
    return _nbformat().read(str(path), as_version=4)


def clean_notebook(nb: Any) -> Any:
    """A copy of ``nb`` without outputs, execution counts and non-canonical metadata.

    Code cells keep ``source``, ``id`` and their ``tags``; markdown cells keep ``source``,
    ``id``, ``tags`` and attachments; the notebook's metadata becomes :data:`NOTEBOOK_METADATA`.
    """
    nbf = _nbformat()
    nb = copy.deepcopy(nb)
    nb.metadata = nbf.from_dict(copy.deepcopy(NOTEBOOK_METADATA))
    for cell in nb.cells:
        tags = list(cell.get("metadata", {}).get("tags", []))
        cell.metadata = nbf.from_dict({"tags": tags} if tags else {})
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.nbformat, nb.nbformat_minor = 4, max(5, int(nb.get("nbformat_minor", 5)))
    for cell in nb.cells:  # nbformat 4.5 wants cell ids; an older file gets fresh ones
        if not cell.get("id"):
            from nbformat.corpus.words import generate_corpus_id

            cell.id = generate_corpus_id()
    return nb


def notebook_text(nb: Any) -> str:
    """``nb`` serialised as committed (nbformat's JSON, one trailing newline)."""
    text = _nbformat().writes(nb)
    return text if text.endswith("\n") else text + "\n"


def strip_file(path: str | Path) -> bool:
    """Rewrite ``path`` in its clean, canonical form; returns whether the file changed."""
    path = Path(path)
    old = path.read_text(encoding="utf-8")
    new = notebook_text(clean_notebook(read_notebook(path)))
    if new != old:
        path.write_text(new, encoding="utf-8")
    return new != old


def cell_source(cell: Mapping[str, Any]) -> str:
    """A cell's source as one string (a file may store it as a list of lines)."""
    source = cell.get("source", "")
    return source if isinstance(source, str) else "".join(source)


def parameters_cell(nb: Mapping[str, Any]) -> int:
    """Index of the one code cell tagged ``parameters`` (``nb``: an ``nbformat`` node or the
    notebook's plain JSON).

    Raises:
        ValueError: no such cell, or more than one.
    """
    found = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and PARAMETERS_TAG in cell.get("metadata", {}).get("tags", [])
    ]
    if len(found) != 1:
        raise ValueError(f"expected exactly one code cell tagged {PARAMETERS_TAG!r}, found {len(found)}")
    return found[0]


def _assignments(source: str) -> dict[str, ast.Assign]:
    """``NAME -> its ast.Assign`` of a parameters cell; every statement must be one."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValueError(f"the parameters cell is not valid Python: {exc}") from None
    out: dict[str, ast.Assign] = {}
    for node in tree.body:
        if not (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            raise ValueError(
                f"the parameters cell may only hold NAME = literal lines (line {node.lineno} does not)"
            )
        out[node.targets[0].id] = node
    return out


def notebook_parameters(nb: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters cell's ``{NAME: value}`` (values are Python literals; ``nb`` as for
    :func:`parameters_cell`).

    Raises:
        ValueError: no single parameters cell, or a statement that is not ``NAME = literal``.
    """
    source = cell_source(nb["cells"][parameters_cell(nb)])
    out = {}
    for name, node in _assignments(source).items():
        try:
            out[name] = ast.literal_eval(node.value)
        except ValueError:
            raise ValueError(f"parameter {name} (line {node.lineno}) is not a literal") from None
    return out


def _literal(name: str, value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
        same = False
    if not same:
        raise ValueError(
            f"parameter {name}: {value!r} is not a plain literal (str, number, bool, None, list, dict)"
        )
    return text


def inject_parameters(nb: Mapping[str, Any], values: Mapping[str, Any]) -> Any:
    """A copy of ``nb`` (as for :func:`parameters_cell`) whose parameters cell assigns ``values``
    instead of its own.

    Only the value of each named assignment changes: comments, order and the other lines stay.
    ``pathlib.Path`` values are written as strings.

    Raises:
        KeyError: a name the parameters cell does not assign (a typo would be ignored otherwise).
        ValueError: a value that is not a plain literal.
    """
    nb = copy.deepcopy(nb)
    cell = nb["cells"][parameters_cell(nb)]
    source = cell_source(cell)
    nodes = _assignments(source)
    unknown = sorted(set(values) - set(nodes))
    if unknown:
        raise KeyError(f"not parameters of this notebook: {unknown}; known: {sorted(nodes)}")
    lines = source.encode("utf-8").split(b"\n")  # ast offsets are UTF-8 byte offsets
    # replace from the bottom up, so earlier line numbers stay valid
    for name in sorted(values, key=lambda n: nodes[n].lineno, reverse=True):
        value = nodes[name].value
        first, last = value.lineno - 1, value.end_lineno - 1
        head = lines[first][: value.col_offset]
        tail = lines[last][value.end_col_offset :]
        lines[first : last + 1] = [head + _literal(name, values[name]).encode("utf-8") + tail]
    cell["source"] = b"\n".join(lines).decode("utf-8")
    return nb


def read_notebook_json(path: str | Path) -> dict[str, Any]:
    """The notebook at ``path`` as plain JSON (no nbformat needed: what pushing uses)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_notebook_json(nb: Mapping[str, Any], path: str | Path) -> Path:
    """Write plain notebook JSON the way nbformat does (indent 1, sorted keys, UTF-8)."""
    path = Path(path)
    path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def notebook_problems(path: str | Path) -> list[str]:
    """What keeps the committed notebook ``path`` from being clean (empty when it is).

    Checked: no outputs, no execution counts, canonical notebook and cell metadata, the file
    byte-equal to its :func:`clean_notebook` form, exactly one ``parameters`` cell of literal
    assignments, at most one ``sys.path`` line, and no class definitions (no model code).
    """
    path = Path(path)
    nbf = _nbformat()
    try:
        nb = read_notebook(path)
        nbf.validate(nb)
    except Exception as exc:  # an invalid notebook: nothing else can be checked
        return [f"{path}: not a valid notebook ({type(exc).__name__}: {str(exc)[:200]})"]
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and cell.get("outputs"):
            problems.append(f"{path}: cell {i} has outputs")
        if cell.cell_type == "code" and cell.get("execution_count") is not None:
            problems.append(f"{path}: cell {i} has an execution count")
        extra = sorted(set(cell.get("metadata", {})) - set(CELL_METADATA_KEYS))
        if extra:
            problems.append(f"{path}: cell {i} has metadata {extra}")
        if cell.cell_type == "code" and _CLASS_DEF.search(cell.source):
            problems.append(f"{path}: cell {i} defines a class (model code belongs in src/cellmask)")
    if dict(nb.metadata) != NOTEBOOK_METADATA:
        problems.append(f"{path}: notebook metadata is not {NOTEBOOK_METADATA}")
    try:
        notebook_parameters(nb)
    except ValueError as exc:
        problems.append(f"{path}: {exc}")
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    if len(_SYS_PATH.findall(code)) > 1:
        problems.append(f"{path}: more than one sys.path line")
    if not problems and path.read_text(encoding="utf-8") != notebook_text(clean_notebook(nb)):
        problems.append(f"{path}: not in canonical form")
    return [p + " (make notebooks-clean strips outputs and metadata)" for p in problems]
