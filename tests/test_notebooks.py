"""The notebooks: committed clean, and every one executed top to bottom on synthetic data.

Each notebook runs in its own kernel (nbclient), in ``notebooks/`` as its working directory, with
the values of its ``parameters`` cell replaced: a synthetic Kaggle-layout dataset, one shared
output folder, the smoke profile, one epoch, CPU. The notebooks share their runs the way they
do on Kaggle: 02-04 fine-tune from 01's LIVECell runs, 07 predicts with the weights dataset built
from the 02-06 runs (``make weights``) laid out as Kaggle mounts it, 08 scores those runs. A
notebook's upstream notebooks run first (once per session), so any one test can run alone.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from cellmask.kaggle.notebooks import (
    inject_parameters,
    notebook_parameters,
    notebook_problems,
    notebook_text,
    read_notebook,
)
from cellmask.kaggle.packaging import list_notebooks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
EXPECTED = [
    "00_prepare_data",
    "01_pretrain_livecell",
    "02_finetune_faster_rcnn_swin_t",
    "03_finetune_cascade_resnext101",
    "04_finetune_cascade_resnest101",
    "05_soft_teacher",
    "06_segmenter",
    "07_inference",
    "08_evaluate",
]
BRANCHES = ["faster_rcnn_swin_t", "cascade_rcnn_resnext101", "cascade_rcnn_resnest101"]
UPSTREAM = {
    **{nb: ["01_pretrain_livecell"] for nb in EXPECTED[2:5]},
    "07_inference": [*EXPECTED[2:5], "06_segmenter"],
    "08_evaluate": [*EXPECTED[2:5], "06_segmenter"],
}
"""Notebooks whose runs a notebook reads (run first)."""


# ------------------------------------------------------------------------------ hygiene


def test_the_numbered_notebooks_exist():
    assert list_notebooks(ROOT) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_committed_clean(name):
    assert notebook_problems(NOTEBOOK_DIR / f"{name}.ipynb") == []


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_parameters_default_to_kaggle(name):
    params = notebook_parameters(read_notebook(NOTEBOOK_DIR / f"{name}.ipynb"))
    # paths default to None (resolved by cellmask.kaggle.session: Kaggle's input on Kaggle) or
    # to a Kaggle input folder; nothing points at a developer's machine
    assert params["DATA"] is None and params["OUT"] is None
    assert params["WHEELS"] == "/kaggle/input/cellmask-wheels"
    for key, value in params.items():
        if isinstance(value, str) and "/" in value:
            assert value.startswith("/kaggle/input/"), (key, value)
    assert params.get("PROFILE", "paper") == "paper"


# ------------------------------------------------------------------------------ execution


class NotebookSession:
    """Executes notebooks once each, upstream first, in one shared synthetic 'Kaggle'."""

    def __init__(self, tmp: Path) -> None:
        from cellmask.data.synthetic import write_dataset

        self.data, self.out, self.inputs = tmp / "data", tmp / "working", tmp / "input"
        write_dataset(self.data, n_train=8, n_unlabeled=2, n_test=2, n_livecell=6, size=(128, 160))
        self.params = {
            "DATA": str(self.data),
            "OUT": str(self.out),
            "PROFILE": "smoke",
            "EPOCHS": 1,
            "LIVECELL_EPOCHS": 1,
            "FINETUNE_EPOCHS": 1,
            "DEVICE": "cpu",
            "N_FOLDS": 2,
            "BRANCHES": BRANCHES,
            "WEIGHTS": None,
        }
        self.done: dict[str, object] = {}
        self.env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])

    def run(self, name: str):
        """The executed notebook ``name`` (its upstream notebooks executed first)."""
        if name in self.done:
            return self.done[name]
        for upstream in UPSTREAM.get(name, []):
            self.run(upstream)
        if name == "07_inference":
            self.params["WEIGHTS"] = str(self._weights_dataset())
        from nbclient import NotebookClient

        nb = read_notebook(NOTEBOOK_DIR / f"{name}.ipynb")
        known = notebook_parameters(nb)
        values = {k: v for k, v in self.params.items() if k in known}
        if name == "08_evaluate":
            values["WEIGHTS"] = None  # 08 scores the runs under OUT/sartorius
        nb = inject_parameters(nb, values)
        client = NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
        )
        client.execute(env=self.env)
        if keep := os.environ.get("CELLMASK_NOTEBOOK_OUTPUTS"):  # to look at what CI ran
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / f"{name}.ipynb").write_text(notebook_text(nb))
        self.done[name] = nb
        return nb

    def _weights_dataset(self) -> Path:
        """``make weights`` from the session's competition runs, where Kaggle mounts the dataset."""
        from cellmask.kaggle.weights import collect_weights, discover_runs

        branches, segmenter = discover_runs(self.out / "sartorius")
        # a "tuned" predict config that keeps every box: one-epoch smoke models score low
        tuned = self.out / "tune" / "predict.yaml"
        tuned.parent.mkdir(parents=True, exist_ok=True)
        tuned.write_text("predict:\n  score_thresholds: 0.0\n  min_area: 4\n")
        out = self.inputs / "cellmask-weights"
        collect_weights(branches, segmenter, predict_config=tuned, out=out)
        return out


@pytest.fixture(scope="session")
def notebooks(tmp_path_factory) -> NotebookSession:
    return NotebookSession(tmp_path_factory.mktemp("kaggle"))


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_executes(notebooks, name):
    nb = notebooks.run(name)
    assert _outputs(nb, "image/png"), f"{name} shows no plot"
    as_text = [
        o
        for o in _outputs(nb, "text/plain")
        if o["data"]["text/plain"].startswith("<Figure") and "image/png" not in o["data"]
    ]
    assert not as_text, f"{name}: a figure is shown as text, not drawn (%matplotlib inline missing?)"
    out, data = notebooks.out, notebooks.data
    if name == "00_prepare_data":
        with (out / "folds.csv").open() as f:
            rows = list(csv.DictReader(f))
        with (data / "train.csv").open() as f:
            ids = {row["id"] for row in csv.DictReader(f)}
        assert {r["image_id"] for r in rows} == ids
        assert {r["fold"] for r in rows} == {"0", "1"}
        assert (out / "instances.csv").stat().st_size > 0
    elif name == "01_pretrain_livecell":
        for branch in BRANCHES:
            assert (out / "livecell" / branch / "best.pt").is_file(), branch
    elif name in UPSTREAM and name.startswith("0") and "finetune" in name:
        branch = notebook_parameters(read_notebook(NOTEBOOK_DIR / f"{name}.ipynb"))["BRANCH"]
        assert (out / "sartorius" / branch / "best.pt").is_file()
        assert f"livecell/{branch}/best.pt" in _text(nb)  # started from 01's LIVECell run
    elif name == "05_soft_teacher":
        assert "2 unlabeled images" in _text(nb)
    elif name == "06_segmenter":
        assert (out / "livecell" / "segmenter_upernet_swin_t" / "best.pt").is_file()
        assert list((out / "sartorius").glob("segmenter_upernet_swin_t*/best.pt"))
    elif name == "07_inference":
        from cellmask.submission import check_submission

        assert check_submission(out / "submission.csv", data / "test") == []
        with (out / "submission.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert {r["id"] for r in rows} == {p.stem for p in (data / "test").glob("*.png")}
        assert sum(bool(r["predicted"]) for r in rows) > 0  # predict.yaml of the weights was used
    elif name == "08_evaluate":
        with (out / "evaluate" / "scores.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert sorted(r[""] for r in rows) == sorted(BRANCHES)
        assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
