"""The pieces behind the notebooks and the Kaggle datasets: notebook cleaning and parameter
injection, the weights dataset, the wheels list, the inference kernel's import check, the
notebooks' path and training-stage helpers, and ``download-data`` (make data)."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
from nbformat import v4

from cellmask.errors import DataError
from cellmask.kaggle import api, imports, inputs, session, weights, wheels
from cellmask.kaggle import notebooks as nbt
from cellmask.kaggle.__main__ import main as kaggle_main

ROOT = Path(__file__).resolve().parents[1]

PARAMS = """# parameters
DATA = None  # the data root
NAMES = [
    "a",  # first
    "b",
]
NOTE = "déjà vu"  # unicode before a later value
EPOCHS = 36  # epochs"""


def _notebook(params: str = PARAMS, extra: str = "print(DATA)") -> nbformat.NotebookNode:
    nb = v4.new_notebook()
    cell = v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [v4.new_markdown_cell("# title"), cell, v4.new_code_cell(extra)]
    return nb


def _write(path: Path, nb) -> Path:
    path.write_text(nbformat.writes(nb) + "\n")
    return path


# ------------------------------------------------------------------------------ notebooks


def test_clean_notebook_strips_outputs_counts_and_metadata(tmp_path):
    nb = nbt.clean_notebook(_notebook())
    canonical = _write(tmp_path / "clean.ipynb", nb)
    assert nbt.notebook_problems(canonical) == []
    dirty = nbt.clean_notebook(_notebook())
    dirty.metadata["widgets"] = {"state": {}}
    dirty.metadata["language_info"]["version"] = "3.11.7"
    dirty.cells[2].outputs = [v4.new_output("stream", text="hello\n")]
    dirty.cells[2].execution_count = 4
    dirty.cells[2].metadata["collapsed"] = True
    path = _write(tmp_path / "dirty.ipynb", dirty)
    problems = " ".join(nbt.notebook_problems(path))
    for expected in (
        "cell 2 has outputs",
        "cell 2 has an execution count",
        "cell 2 has metadata ['collapsed']",
        "notebook metadata",
    ):
        assert expected in problems
    assert nbt.strip_file(path) is True
    assert nbt.notebook_problems(path) == []
    assert path.read_text() == canonical.read_text().replace(nb.cells[0].id, dirty.cells[0].id).replace(
        nb.cells[1].id, dirty.cells[1].id
    ).replace(nb.cells[2].id, dirty.cells[2].id)
    assert nbt.strip_file(path) is False  # idempotent
    # the parameters tag survives cleaning
    assert nbt.parameters_cell(nbt.read_notebook(path)) == 1


def test_notebook_problems_catch_each_rule(tmp_path):
    def problems(nb) -> str:
        return " ".join(nbt.notebook_problems(_write(tmp_path / "x.ipynb", nbt.clean_notebook(nb))))

    two = _notebook()
    two.cells[2].metadata["tags"] = ["parameters"]
    assert "found 2" in problems(two)
    none = _notebook()
    none.cells[1].metadata = {}
    assert "found 0" in problems(none)
    assert "not a literal" in problems(_notebook(params="DATA = some_function()"))
    assert "may only hold NAME = literal" in problems(_notebook(params="import os\nDATA = None"))
    assert "more than one sys.path" in problems(
        _notebook(extra="import sys\nsys.path.insert(0, 'a')\nsys.path.append('b')")
    )
    assert "defines a class" in problems(_notebook(extra="class Head:\n    pass"))
    # not what the stripper writes (e.g. hand-edited JSON with another indentation)
    path = tmp_path / "y.ipynb"
    path.write_text(json.dumps(nbt.clean_notebook(_notebook()), indent=2))
    assert "not in canonical form" in " ".join(nbt.notebook_problems(path))
    path.write_text("{not json")
    assert "not a valid notebook" in " ".join(nbt.notebook_problems(path))


def test_inject_parameters_replaces_values_only():
    nb = _notebook()
    out = nbt.inject_parameters(nb, {"DATA": Path("/tmp/data"), "NAMES": ["x"], "EPOCHS": 1, "NOTE": "ok"})
    source = nbt.cell_source(out.cells[1])
    assert source.splitlines() == [
        "# parameters",
        "DATA = '/tmp/data'  # the data root",
        "NAMES = ['x']",
        "NOTE = 'ok'  # unicode before a later value",
        "EPOCHS = 1  # epochs",
    ]
    assert nbt.notebook_parameters(out) == {"DATA": "/tmp/data", "NAMES": ["x"], "NOTE": "ok", "EPOCHS": 1}
    assert nbt.notebook_parameters(nb)["EPOCHS"] == 36  # the input is not modified
    with pytest.raises(KeyError, match="EPOCH"):
        nbt.inject_parameters(nb, {"EPOCH": 1})
    with pytest.raises(ValueError, match="not a plain literal"):
        nbt.inject_parameters(nb, {"DATA": object()})


def test_parameters_of_plain_json(tmp_path):
    """Pushing reads notebooks without nbformat: as JSON, sources as lists of lines."""
    path = _write(tmp_path / "n.ipynb", nbt.clean_notebook(_notebook()))
    raw = nbt.read_notebook_json(path)
    assert isinstance(raw["cells"][1]["source"], list)
    assert nbt.notebook_parameters(raw)["EPOCHS"] == 36
    out = nbt.write_notebook_json(nbt.inject_parameters(raw, {"EPOCHS": 2}), tmp_path / "o.ipynb")
    assert nbt.notebook_parameters(nbt.read_notebook(out))["EPOCHS"] == 2
    nbformat.validate(nbt.read_notebook(out))


# ------------------------------------------------------------------------------ weights


def _run(
    path: Path, model_type: str, weight: int | None = 1, payload: bytes = b"weights", done: int = 3
) -> Path:
    """A run directory as `cellmask train` leaves it after ``done`` of its 3 epochs."""
    path.mkdir(parents=True)
    (path / "best.pt").write_bytes(payload)
    (path / "last.pt").write_bytes(b"optimizer state too")
    cfg = {
        "model": {"type": model_type, "backbone": {"name": "bb"}},
        "profile": "smoke",
        "ensemble": {"weight": weight},
        "train": {"epochs": 3},
    }
    (path / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    rows = ["epoch,train_loss,val_AP,stopped,iters"] + [f"{e},1.0,0.{e},," for e in range(1, done + 1)]
    (path / "metrics.csv").write_text("\n".join(rows) + "\n")  # no status.json: an older run
    return path


def test_make_weights_refuses_a_cut_run_and_names_it(tmp_path, capsys):
    from cellmask.engine.status import RunStatus, write_status
    from cellmask.kaggle.__main__ import main

    runs = tmp_path / "runs"
    _run(runs / "faster_rcnn_swin_t", "faster_rcnn")
    cut = _run(runs / "cascade_rcnn_resnext101", "cascade_rcnn", done=2)  # 2 of 3 epochs (older run)
    _run(runs / "segmenter_upernet_swin_t", "segmenter")
    write_status(
        runs / "faster_rcnn_swin_t", RunStatus(False, 1, 3, iteration=40, stopped="max_hours", best_epoch=1)
    )
    out = tmp_path / "datasets" / "cellmask-weights"
    args = ["--root", str(tmp_path), "weights", "--from", str(runs), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "only finished runs ship" in err and err.count("\n") == 1
    assert f"{runs / 'faster_rcnn_swin_t'} (1/3 epochs (cut: max_hours), best epoch 1)" in err
    assert f"{cut} (2/3 epochs (unfinished), best epoch 2)" in err and "ACCEPT_UNFINISHED=1" in err
    assert not (out / "branches").exists()  # nothing packed
    assert main([*args, "--accept-unfinished"]) == 0  # told to: packed, each run's status printed
    printed = capsys.readouterr().out
    assert "1/3 epochs (cut: max_hours), best epoch 1" in printed and "3/3 epochs, best epoch 3" in printed


def test_collect_weights_lays_out_the_dataset(tmp_path):
    runs = tmp_path / "runs"
    det1 = _run(runs / "faster_rcnn_swin_t", "faster_rcnn", 2, b"one")
    det2 = _run(runs / "cascade_rcnn_resnext101", "cascade_rcnn", 3, b"two")
    seg = _run(runs / "segmenter_upernet_swin_t", "segmenter", None, b"seg")
    tuned = tmp_path / "predict.yaml"
    tuned.write_text("predict: {min_area: 4}\n")
    out = tmp_path / "datasets" / "cellmask-weights"
    out.mkdir(parents=True)
    (out / "dataset-metadata.json").write_text("{}")
    (out / "branches" / "old_run").mkdir(parents=True)  # stale: replaced
    manifest = weights.collect_weights([det1, det2], seg, tuned, out)
    assert sorted(p.name for p in (out / "branches").iterdir()) == [
        "cascade_rcnn_resnext101",
        "faster_rcnn_swin_t",
    ]
    assert (out / "branches" / "faster_rcnn_swin_t" / "best.pt").read_bytes() == b"one"
    assert (out / "segmenter" / "best.pt").read_bytes() == b"seg"
    assert (out / "segmenter" / "config.yaml").is_file()
    assert not list(out.rglob("last.pt"))  # weights only
    assert (out / "predict.yaml").read_text() == tuned.read_text()
    assert (out / "dataset-metadata.json").read_text() == "{}"
    assert manifest["branches"]["cascade_rcnn_resnext101"]["ensemble_weight"] == 3
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    found, found_seg = weights.discover_runs(runs)
    assert (found, found_seg) == ([det2, det1], seg)


def test_collect_weights_refuses_mixed_up_runs(tmp_path):
    det = _run(tmp_path / "a" / "det", "faster_rcnn")
    seg = _run(tmp_path / "seg", "segmenter")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="is a segmenter run, given as a detector branch"):
        weights.collect_weights([det, seg], seg, out=out)
    with pytest.raises(DataError, match="is a faster_rcnn run, given as the segmenter"):
        weights.collect_weights([det], det, out=out)
    with pytest.raises(DataError, match="share a directory name"):
        weights.collect_weights([det, _run(tmp_path / "b" / "det", "cascade_rcnn")], seg, out=out)
    with pytest.raises(DataError, match="no detector run"):
        weights.collect_weights([], seg, out=out)
    (det / "best.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"det/best\.pt"):
        weights.collect_weights([det], seg, out=out)
    with pytest.raises(FileNotFoundError, match="no such predict config"):
        weights.collect_weights(
            [_run(tmp_path / "c" / "det", "faster_rcnn")], seg, tmp_path / "missing.yaml", out=out
        )
    _run(tmp_path / "two" / "s1", "segmenter")
    _run(tmp_path / "two" / "s2", "segmenter")
    with pytest.raises(DataError, match="several segmenter runs"):
        weights.discover_runs(tmp_path / "two")


# ------------------------------------------------------------------------------ wheels


def test_missing_distributions_walks_what_the_image_lacks():
    graph = {
        "cellmask": ["torch>=2.1", "Timm>=1.0", "ensemble_boxes", "pytest; extra == 'test'"],
        "timm": ["torch", "huggingface-hub", "safetensors"],
        "ensemble-boxes": ["numpy", "numba", "colorama; platform_system == 'Windows'"],
        "numba": ["llvmlite"],  # provided: its dependencies come with it
        "huggingface-hub": ["tomli; python_version < '3.11'", "filelock"],
    }
    base = {"python": "3.11", "platforms": [], "provided": {"torch": [], "numpy": [], "numba": []}}
    assert wheels.missing_distributions(base, requires=graph.get) == [
        "ensemble-boxes",
        "filelock",
        "huggingface-hub",
        "safetensors",
        "timm",
    ]
    older = {**base, "python": "3.10"}
    assert "tomli" in wheels.missing_distributions(older, requires=graph.get)


def test_the_declared_base_image_and_the_wheel_commands():
    base = wheels.read_base_image(ROOT / "datasets" / "cellmask-wheels" / "base_image.json")
    missing = wheels.missing_distributions(base)  # cellmask's installed metadata
    assert {"ensemble-boxes", "segmentation-models-pytorch", "timm", "pycocotools"} <= set(missing)
    assert not {"torch", "torchvision", "numpy", "pandas"} & set(missing)
    assert wheels.pinned(["timm", "not-installed"], version=_fake_version) == ["timm==1.0.9", "not-installed"]
    download, own = wheels.wheel_commands("out", base, ["timm==1.0.9"], source="repo")
    assert download[download.index("--python-version") + 1] == base["python"]
    assert {"--no-deps", "--only-binary=:all:"} <= set(download) and download[-1] == "timm==1.0.9"
    assert [download[i + 1] for i, a in enumerate(download) if a == "--platform"] == base["platforms"]
    assert own[1:] == [
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--wheel-dir",
        "out",
        "repo",
    ]


def _fake_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError

    if name == "timm":
        return "1.0.9"
    raise PackageNotFoundError(name)


def test_requirement_closure_walks_markers_and_stops_where_told():
    graph = {
        "a": ["B>=1", "c; python_version < '3.11'", "d; extra == 'test'"],
        "b": ["e"],
        "e": ["f"],
    }
    assert wheels.requirement_closure(["a"], "3.11", graph.get) == {"a", "b", "e", "f"}
    assert wheels.requirement_closure(["a"], "3.10", graph.get) == {"a", "b", "c", "e", "f"}
    assert wheels.requirement_closure(["a"], "3.11", graph.get, stop=["b"]) == {"a", "b"}


# ------------------------------------------------------------------------------ imports


def test_code_imports_reads_every_branch_and_skips_magics():
    source = """%matplotlib inline
!pip install nothing
import os, numpy.linalg as la
from pathlib import Path
from . import sibling
if False:
    import scipy.stats
    from torchvision.ops import nms
def later():
    import yaml
"""
    assert imports.code_imports(source) == {"os", "numpy", "pathlib", "scipy", "torchvision", "yaml"}
    nb = _notebook(extra="import timm\n%time from cv2 import imread")
    assert imports.notebook_imports(nb) == {"timm"}
    with pytest.raises(SyntaxError):
        imports.code_imports("import (")


def test_undeclared_imports_maps_modules_to_distributions():
    dists = {
        "timm": ["timm"],
        "mpl_toolkits": ["matplotlib"],
        "google": ["protobuf"],
        "nvidia": ["nvidia-cublas", "nvidia_cufft"],
        "yaml": ["PyYAML"],
    }
    allowed = ["timm", "matplotlib", "nvidia-cufft", "pyyaml"]
    modules = [
        "json",
        "_socket",
        "timm.models",
        "mpl_toolkits.axes_grid1",
        "nvidia.cufft",
        "yaml",
        "__main__",
    ]
    assert imports.undeclared_imports(modules, allowed, dists) == []
    problems = imports.undeclared_imports([*modules, "google.protobuf", "helpers"], allowed, dists)
    assert len(problems) == 2
    assert problems[0].startswith("google: from protobuf, neither in the base image")
    assert problems[1].startswith("helpers: no installed distribution provides it")
    # recorded from sys.modules: a module made at run time (no file) is not an import
    recorded = {"__mp_main__": None, "_cython_3_2": None, "helpers": "/work/helpers.py", "timm": "/t.py"}
    assert imports.undeclared_imports(recorded, allowed, dists) == [
        "helpers (/work/helpers.py): no installed distribution provides it (a local module?)"
    ]


def test_kernel_distributions_are_the_image_and_the_wheels_with_their_dependencies():
    graph = {
        "torch": ["sympy", "triton; platform_system == 'Linux'", "pywin32; sys_platform == 'win32'"],
        "cellmask": ["torch>=2", "timm", "pytest; extra == 'test'"],
        "timm": ["huggingface_hub"],
    }
    base = {"python": "3.11", "platforms": [], "provided": {"torch": ["torch"]}}
    assert imports.kernel_distributions(base, ["cellmask"], graph.get) == {
        "torch", "sympy", "triton", "cellmask", "timm", "huggingface-hub",
    }  # fmt: skip
    assert imports.kernel_distributions(base, [], graph.get) == {"torch", "sympy", "triton"}


# ------------------------------------------------------------------------------ session


def test_notebook_paths_in_a_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT / "notebooks")
    monkeypatch.delenv("CELLMASK_DATA", raising=False)
    nothing = tmp_path / "no-input"  # not on Kaggle
    paths = session.notebook_paths(out=tmp_path / "out", input_root=nothing)
    assert paths.configs == ROOT / "configs" and paths.data == ROOT / "data" / "synthetic"
    assert paths.out.is_dir() and paths.run("livecell", "x") == tmp_path / "out" / "livecell" / "x"
    assert paths.config("faster_rcnn_swin_t") == ROOT / "configs" / "faster_rcnn_swin_t.yaml"
    assert paths.has_config("faster_rcnn_swin_t") and not paths.has_config("nope")
    with pytest.raises(FileNotFoundError, match="available: .*faster_rcnn_swin_t"):
        paths.config("nope")
    monkeypatch.chdir(tmp_path)  # outside a checkout, no code dataset
    outside = session.notebook_paths(data=tmp_path, out=tmp_path / "o", input_root=nothing)
    assert outside.configs is None
    with pytest.raises(FileNotFoundError, match=r"configs/ \+ src/cellmask.*attach the cellmask-code"):
        outside.config("faster_rcnn_swin_t")
    code = tmp_path / "input" / "datasets" / "me" / "cellmask-code"  # Kaggle's newer layout
    (code / "src" / "cellmask").mkdir(parents=True)
    (code / "configs").mkdir()
    on_kaggle = session.notebook_paths(data=tmp_path, out=tmp_path / "o", input_root=tmp_path / "input")
    assert on_kaggle.configs == code / "configs"


def test_find_relative_tries_roots_in_order(tmp_path):
    first, second, kernels = tmp_path / "a", tmp_path / "b", tmp_path / "input" / "notebooks" / "me"
    for root in (first, second, kernels / "k"):
        (root / "livecell" / "x").mkdir(parents=True)
    (kernels / "k" / "livecell" / "x" / "best.pt").write_bytes(b"")  # an input: tried last
    found = inputs.find_relative("livecell/x/best.pt", roots=[first, second], input_root=tmp_path / "input")
    assert found == kernels / "k" / "livecell" / "x" / "best.pt"
    (second / "livecell" / "x" / "best.pt").write_bytes(b"")
    assert (
        inputs.find_relative("livecell/x/best.pt", roots=[first, second])
        == second / "livecell" / "x" / "best.pt"
    )
    (first / "livecell" / "x" / "best.pt").write_bytes(b"")
    assert (
        inputs.find_relative("livecell/x/best.pt", roots=[first, second])
        == first / "livecell" / "x" / "best.pt"
    )
    assert inputs.find_relative("livecell/y/best.pt", roots=[first, second], input_root=tmp_path) is None


def test_stage_config_pretrains_soft_teacher_as_its_plain_detector(tmp_path):
    from cellmask.config import load_config

    paths = session.NotebookPaths(data=tmp_path, out=tmp_path, configs=ROOT / "configs")
    name = "soft_teacher_resnext101"
    plain = session.stage_config(paths, name, "livecell", "smoke")
    semi = session.stage_config(paths, name, "sartorius", "smoke")
    base = load_config(ROOT / "configs" / "base.yaml", profile="smoke")
    assert semi == load_config(ROOT / "configs" / f"{name}.yaml", profile="smoke")
    assert semi["model"]["type"] == "soft_teacher" and semi["train"]["optimizer"] == "sgd"
    # LIVECell: the same Faster R-CNN (backbone, heads) with the detectors' recipe, no semi section
    assert plain["model"] == {**semi["model"], "type": "faster_rcnn"} and "semi" not in plain
    assert {k: plain[k] for k in session.LIVECELL_RECIPE} == {k: base[k] for k in session.LIVECELL_RECIPE}
    assert plain["train"] == base["train"]  # every field, the batch included (not Soft Teacher's 1)
    assert plain["train"]["optimizer"] == "adamw" and plain["train"]["scheduler"] == "cosine"
    paper = session.stage_config(paths, name, "livecell", "paper", overrides=["train.lr=0.5"])
    assert paper["train"]["lr"] == 0.5 and paper["train"]["epochs"] == 36  # overrides come last
    # other branches are trained on LIVECell as they are
    assert session.stage_config(paths, "faster_rcnn_swin_t", "livecell", "smoke") == load_config(
        ROOT / "configs" / "faster_rcnn_swin_t.yaml", profile="smoke"
    )


# ------------------------------------------------------------------------------ download-data


def test_download_data_dry_run_prints_the_download_and_the_unpacking(tmp_path, capsys):
    target = tmp_path / "data" / "sartorius"
    assert kaggle_main(["--dry-run", "download-data", "--dir", str(target)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"$ kaggle competitions download -c sartorius-cell-instance-segmentation -p {target}"
    archive = target / "sartorius-cell-instance-segmentation.zip"
    assert lines[1].endswith(f" -m zipfile -e {archive} {target}") and lines[2] == f"$ rm {archive}"
    assert not target.exists()  # nothing ran


FAKE_DOWNLOAD = """
import sys, zipfile
from pathlib import Path
args = sys.argv[1:]
assert args[:4] == ["competitions", "download", "-c", "sartorius-cell-instance-segmentation"], args
out = Path(args[args.index("-p") + 1])
with zipfile.ZipFile(out / "sartorius-cell-instance-segmentation.zip", "w") as zf:
    zf.writestr("train.csv", "id,annotation")
    zf.writestr("train/a.png", b"png")
    zf.writestr("test/b.png", b"png")
print("Downloading sartorius-cell-instance-segmentation.zip")
"""


def test_download_data_unpacks_the_zip_and_says_where(tmp_path, monkeypatch, capsys):
    exe = tmp_path / "kaggle"
    exe.write_text(f"#!{sys.executable}\n{FAKE_DOWNLOAD}")
    exe.chmod(0o755)
    monkeypatch.setattr(api.runner, "find_kaggle_cli", lambda: str(exe))
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    target = tmp_path / "sartorius"
    assert kaggle_main(["download-data", "--dir", str(target)]) == 0
    assert (target / "train.csv").is_file() and (target / "train" / "a.png").is_file()
    assert not (target / "sartorius-cell-instance-segmentation.zip").exists()  # unpacked, then deleted
    out = capsys.readouterr().out
    assert f"--data {target}" in out and "train/ (1 files)" in out
    # a folder with the data is left alone
    assert kaggle_main(["download-data", "--dir", str(target)]) == 0
    assert "already holds the competition data" in capsys.readouterr().out


def test_download_data_without_the_cli_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(api.runner, "find_kaggle_cli", lambda: None)
    assert kaggle_main(["download-data", "--dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "`kaggle` command is not installed" in err and ".venv/bin/pip install kaggle" in err


def test_download_data_refuses_an_archive_without_the_layout(tmp_path):
    from cellmask.errors import DataError
    from cellmask.kaggle import data

    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("other.txt", "x")
    data.unpack(archive, tmp_path / "d")
    assert data.missing(tmp_path / "d") == ["train.csv", "train"] and not archive.exists()
    archive.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        data.unpack(archive, tmp_path / "d")


def test_collect_weights_carries_the_image_type_classifier_a_predict_config_names(tmp_path):
    from cellmask.predict.options import load_predict_config

    det = _run(tmp_path / "runs" / "faster_rcnn_swin_t", "faster_rcnn")
    seg = _run(tmp_path / "runs" / "segmenter", "segmenter")
    _run(tmp_path / "demo" / "image_type", "image_type", payload=b"typer")
    tuned = tmp_path / "demo" / "predict.yaml"
    tuned.write_text("predict: {type_classifier: image_type, min_area: 4}\n")  # relative to the file
    out = tmp_path / "weights"
    manifest = weights.collect_weights([det], seg, tuned, out)
    assert (out / "type_classifier" / "best.pt").read_bytes() == b"typer"
    assert manifest["type_classifier"]["type"] == "image_type"
    opts = load_predict_config(out / "predict.yaml")  # what the offline kernel reads
    assert Path(opts["type_classifier"]) == (out / "type_classifier").resolve() and opts["min_area"] == 4
