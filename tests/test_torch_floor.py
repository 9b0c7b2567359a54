"""Kaggle's image ships an older torch than the tests run on (``base_image.json``: torch 2.10,
torchvision 0.25; CI has 2.14), and CI cannot install a second torch. So every torch and
torchvision module-level API that cellmask's sources use (functions, classes and modules reached
from an import; tensor methods and keyword arguments are not seen by this scan) is listed in
``tests/fixtures/torch_apis.json`` with the release that introduced it ("2.0": in torch 2.0 /
torchvision 0.15 or earlier), and this test keeps that list exact: a new API use must be added
there with its version (reviewed once), and none may be newer than the image's. Today none is:
the newest are ``torch.amp.GradScaler`` (2.3) and ``torchvision.tv_tensors`` (0.16)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBS = ("torch", "torchvision")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _chain(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def used_apis(source: str) -> set[str]:
    """Dotted torch / torchvision names a module uses: ``from`` imports, and attribute chains on
    an imported torch / torchvision module (``F.interpolate`` after ``import torch.nn.functional
    as F`` is ``torch.nn.functional.interpolate``), longest chains only."""
    tree = ast.parse(source)
    alias: dict[str, str] = {}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in LIBS:
                    alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBS:
            names |= {f"{node.module}.{a.name}" for a in node.names}
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(parents.get(node), ast.Attribute):
            chain = _chain(node)
            if chain and chain[0] in alias:
                names.add(".".join([alias[chain[0]], *chain[1:]]))
    return names


def test_used_apis_reads_imports_aliases_and_chains():
    src = "import torch\nimport torch.nn.functional as F\nfrom torchvision.ops import roi_align\n"
    src += "x = torch.amp.GradScaler('cuda')\ny = F.interpolate(x).shape\n"
    assert used_apis(src) == {
        "torchvision.ops.roi_align",
        "torch.amp.GradScaler",
        "torch.nn.functional.interpolate",  # a call's attribute (.shape) is not an API
    }


def test_every_torch_api_we_use_is_listed_and_exists_in_the_images_torch():
    declared = json.loads((ROOT / "tests" / "fixtures" / "torch_apis.json").read_text())
    base = json.loads((ROOT / "datasets" / "cellmask-wheels" / "base_image.json").read_text())
    used: set[str] = set()
    for path in sorted((ROOT / "src" / "cellmask").rglob("*.py")):
        used |= used_apis(path.read_text())
    used = {n for n in used if not any(m.startswith(n + ".") for m in used)}  # longest chains
    listed = {name for lib in LIBS for name in declared[lib]}
    assert not used - listed, (
        f"add to tests/fixtures/torch_apis.json with their version: {sorted(used - listed)}"
    )
    assert not listed - used, (
        f"no longer used, drop from tests/fixtures/torch_apis.json: {sorted(listed - used)}"
    )
    for lib in LIBS:
        newer = {n: v for n, v in declared[lib].items() if _version(v) > _version(base[lib])}
        assert not newer, f"newer than the image's {lib} {base[lib]}: {newer}"
