"""The notebooks: committed clean, and every one executed top to bottom on synthetic data.

Each notebook runs in its own kernel (nbclient), in ``notebooks/`` as its working directory, with
the values of its ``parameters`` cell replaced: a synthetic Kaggle-layout dataset (with unlabeled
images for Soft Teacher), one shared output folder, the smoke profile, one epoch, CPU. The
notebooks share their runs the way they do on Kaggle: 01 pretrains the four detector branches on
LIVECell, 02-05 fine-tune from those runs (05 is Soft Teacher), 06 trains the segmenter, 08
scores every trained branch (ablation) and tunes the thresholds, and 07 predicts with the weights
dataset built from the 02-06 runs and 08's tuned config (``make weights``).

07 runs as the offline kernel it is on Kaggle: the wheels and weights datasets are laid out
where Kaggle mounts them (``input/cellmask-wheels``, ``input/cellmask-weights``), the wheels
folder holds the cellmask wheel built from this checkout (``make wheels``'s own-wheel command),
and a first injected cell blocks the network (``socket``) and records ``sys.modules``. The kernel
installs cellmask from the wheel with ``pip install --no-index --find-links`` into a folder of its
own (``PIP_TARGET``, put first on ``sys.path``) so the test environment is never modified; pip
ignores installed packages with ``--target``, so there the dependencies come from the test
environment standing in for Kaggle's image, and the import check compares everything the kernel
imported with what ``base_image.json`` and the wheels declare.

A notebook's upstream notebooks run first (once per session), so any one test can run alone.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cellmask.kaggle.notebooks import (
    inject_parameters,
    notebook_parameters,
    notebook_problems,
    notebook_text,
    read_notebook,
)
from cellmask.kaggle.packaging import BASE_IMAGE, list_notebooks

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
BRANCHES = [
    "faster_rcnn_swin_t",
    "cascade_rcnn_resnext101",
    "cascade_rcnn_resnest101",
    "soft_teacher_resnext101",
]
TRAINING = EXPECTED[2:7]
"""The notebooks writing the competition runs (02-05: detector branches, 06: the segmenter)."""
UPSTREAM = {
    **{nb: ["01_pretrain_livecell"] for nb in EXPECTED[2:6]},
    "08_evaluate": TRAINING,
    "07_inference": [*TRAINING, "08_evaluate"],
}
"""Notebooks whose outputs a notebook reads (run first)."""
OFFLINE = "cellmask CI: no network in the offline kernel"

FIRST_CELL_07 = f"""# injected by tests/test_notebooks.py: no network, and the modules imported from here on
import socket as _ci_socket
import sys as _ci_sys

_ci_modules_before = set(_ci_sys.modules)
_ci_real_socket = _ci_socket.socket


def _ci_offline(*args, **kwargs):
    raise OSError({OFFLINE!r})


class _CIOfflineSocket(_ci_real_socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None and family in (-1, _ci_socket.AF_INET, _ci_socket.AF_INET6):
            _ci_offline()
        super().__init__(family, type, proto, fileno)


_ci_socket.socket = _CIOfflineSocket
_ci_socket.create_connection = _ci_offline
_ci_socket.getaddrinfo = _ci_offline
"""

LAST_CELL_07 = """# injected by tests/test_notebooks.py: what was imported, and whether the network stayed blocked
import json as _ci_json
import urllib.request as _ci_urllib

_ci_probes = {}
for _ci_name, _ci_call in {
    "socket": lambda: _ci_socket.socket(_ci_socket.AF_INET, _ci_socket.SOCK_STREAM),
    "create_connection": lambda: _ci_socket.create_connection(("127.0.0.1", 9), timeout=1),
    "urlopen": lambda: _ci_urllib.urlopen("http://localhost:9/", timeout=1),
}.items():
    try:
        _ci_call()
        _ci_probes[_ci_name] = "connected"
    except OSError as _ci_error:
        _ci_probes[_ci_name] = str(_ci_error)
_ci_new = {
    name: getattr(module, "__file__", None)
    for name, module in list(_ci_sys.modules.items())
    if name not in _ci_modules_before
}
with open(_CI_REPORT, "w") as _ci_f:
    _ci_json.dump({"modules": _ci_new, "probes": _ci_probes}, _ci_f)
"""


# ------------------------------------------------------------------------------ hygiene


def test_the_numbered_notebooks_exist():
    assert list_notebooks(ROOT) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_committed_clean(name):
    assert notebook_problems(NOTEBOOK_DIR / f"{name}.ipynb") == []


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_parameters_default_to_kaggle(name):
    params = notebook_parameters(read_notebook(NOTEBOOK_DIR / f"{name}.ipynb"))
    # paths default to None: found under /kaggle/input in either input layout (old: <slug>/; new:
    # competitions/, datasets/<owner>/, notebooks/<owner>/) by cellmask.data.inputs, or (the
    # wheels, before cellmask is installed) by the install cell; no input path is spelled out
    assert params["DATA"] is None and params["OUT"] is None
    assert params["WHEELS"] is None
    assert params.get("WEIGHTS") is None and params.get("CONFIGS") is None
    for key, value in params.items():
        assert not (isinstance(value, str) and "/" in value), (key, value)
    assert params.get("PROFILE", "paper") == "paper"
    # the fine-tuning notebooks start from the LIVECell run, unless told otherwise on purpose
    assert params.get("FROM_IMAGENET", False) is False
    if name.startswith(("02", "03", "04", "05")):
        assert params["INIT"] is None and "FROM_IMAGENET" in params
    # inference and evaluation run the configured pipeline unless told to run the paper's
    # (--paper-exact), and the switch reaches the code (not only the parameters cell)
    if name in ("07_inference", "08_evaluate"):
        nb = read_notebook(NOTEBOOK_DIR / f"{name}.ipynb")
        code = [
            c.source
            for c in nb.cells
            if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])
        ]
        assert params["PAPER_EXACT"] is False and any("PAPER_EXACT" in c for c in code)


# ------------------------------------------------------------------------------ execution


class NotebookSession:
    """Executes notebooks once each, upstream first, in one shared synthetic 'Kaggle'."""

    def __init__(self, tmp: Path) -> None:
        from cellmask.data.synthetic import write_dataset

        self.tmp = tmp
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
            "WEIGHTS": None,  # 08: the runs under OUT/sartorius (07 gets the weights dataset)
            "PREDICT_CONFIG": str(tmp / "keep_every_box.predict.yaml"),  # 08's starting point
        }
        # one-epoch smoke detectors score low: thresholds that keep every box let the rest of the
        # pipeline (segmenter, overlap removal, scoring, RLE) work on real instances; 08 tunes
        # from there and 07 predicts with what 08 tuned
        Path(self.params["PREDICT_CONFIG"]).write_text("predict:\n  score_thresholds: 0.0\n  min_area: 4\n")
        self.done: dict[str, object] = {}
        self.seconds: dict[str, float] = {}
        self.env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
        self.report_07 = tmp / "inference_kernel.json"
        self.pip_target = tmp / "pip-target"

    def run(self, name: str):
        """The executed notebook ``name`` (its upstream notebooks executed first)."""
        import time

        if name in self.done:
            return self.done[name]
        for upstream in UPSTREAM.get(name, []):
            self.run(upstream)
        from nbclient import NotebookClient
        from nbformat.v4 import new_code_cell

        nb = read_notebook(NOTEBOOK_DIR / f"{name}.ipynb")
        known = notebook_parameters(nb)
        values = {k: v for k, v in self.params.items() if k in known}
        env = self.env
        if name == "07_inference":
            values |= self._offline_inputs()
            env = self._offline_env()
        nb = inject_parameters(nb, values)
        if name == "07_inference":
            nb.cells.insert(0, new_code_cell(FIRST_CELL_07))
            nb.cells.append(new_code_cell(f"_CI_REPORT = {str(self.report_07)!r}\n" + LAST_CELL_07))
        client = NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
        )
        start = time.perf_counter()
        client.execute(env=env)
        self.seconds[name] = time.perf_counter() - start
        if keep := os.environ.get("CELLMASK_NOTEBOOK_OUTPUTS"):  # to look at what CI ran
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / f"{name}.ipynb").write_text(notebook_text(nb))
        self.done[name] = nb
        return nb

    def trained_branches(self) -> list[Path]:
        """The detector runs 02-05 wrote (``make weights`` finds the same ones)."""
        from cellmask.kaggle.weights import discover_runs

        return discover_runs(self.out / "sartorius")[0]

    def _offline_inputs(self) -> dict[str, str]:
        """``input/cellmask-wheels`` and ``input/cellmask-weights`` as Kaggle mounts them, and the
        install folder: 07's parameters."""
        from cellmask.kaggle.weights import collect_weights, discover_runs
        from cellmask.kaggle.wheels import read_base_image, wheel_commands

        wheels = self.inputs / "cellmask-wheels"
        source = self.tmp / "checkout"  # a copy: building a wheel writes build/ and *.egg-info
        shutil.copytree(
            ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, source / name)
        (own,) = wheel_commands(wheels, read_base_image(ROOT / BASE_IMAGE), [], source=source)  # make wheels
        subprocess.run([*own, "--no-index", "-q"], check=True, env=self._offline_env())
        shutil.copy2(ROOT / BASE_IMAGE, wheels / BASE_IMAGE.name)

        branches, segmenter = discover_runs(self.out / "sartorius")  # make weights
        tuned = self.out / "evaluate" / "tune" / "tuned.predict.yaml"  # 08's
        weights = self.inputs / "cellmask-weights"
        collect_weights(branches, segmenter, predict_config=tuned, out=weights)
        return {"WEIGHTS": str(weights), "WHEELS": str(wheels), "PIP_TARGET": str(self.pip_target)}

    def _offline_env(self) -> dict[str, str]:
        """The kernel's environment: no checkout sources on the path, pip with no index, no
        configuration and a proxy that refuses (the kernel's own sockets are blocked in it)."""
        env = {k: v for k, v in self.env.items() if not k.startswith("PIP_") and k.lower() not in PROXIES}
        env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "").replace(str(ROOT / "src"), "")
        env |= {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env |= dict.fromkeys(PROXIES, "http://127.0.0.1:9")
        return env

    def inference_report(self) -> dict:
        """What the injected cells of 07 recorded: ``modules`` (name -> file) and ``probes``."""
        self.run("07_inference")
        return json.loads(self.report_07.read_text())


PROXIES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture(scope="session")
def notebooks(tmp_path_factory) -> NotebookSession:
    session = NotebookSession(tmp_path_factory.mktemp("kaggle"))
    yield session
    if session.seconds:  # the budget of this file is ~6 minutes on a 2-core machine
        print("\nnotebook seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in session.seconds.items()))


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


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
        rows = _csv(out / "folds.csv")
        assert {r["image_id"] for r in rows} == {r["id"] for r in _csv(data / "train.csv")}
        assert {r["fold"] for r in rows} == {"0", "1"}
        assert (out / "instances.csv").stat().st_size > 0
    elif name == "01_pretrain_livecell":
        for branch in BRANCHES:
            assert (out / "livecell" / branch / "best.pt").is_file(), branch
        # Soft Teacher's LIVECell stage is its plain Faster R-CNN (the config's header)
        cfg = yaml.safe_load((out / "livecell" / "soft_teacher_resnext101" / "config.yaml").read_text())
        assert cfg["model"]["type"] == "faster_rcnn" and "semi" not in cfg
        assert cfg["train"]["optimizer"] == "adamw"
    elif name in UPSTREAM and name.startswith(("02", "03", "04", "05")):
        branch = notebook_parameters(read_notebook(NOTEBOOK_DIR / f"{name}.ipynb"))["BRANCH"]
        assert (out / "sartorius" / branch / "best.pt").is_file()
        assert f"livecell/{branch}/best.pt" in _text(nb)  # started from 01's LIVECell run
        if name == "05_soft_teacher":
            run = out / "sartorius" / branch
            assert "2 unlabeled images" in _text(nb)
            assert yaml.safe_load((run / "config.yaml").read_text())["model"]["type"] == "soft_teacher"
            assert list(run.glob("pseudo_boxes_epoch_*.png"))  # written at validation, shown
            history = _csv(run / "metrics.csv")
            assert float(history[-1]["train_pseudo_boxes_per_image"]) >= 0.0
            assert len(_outputs(nb, "image/png")) >= 6  # images, metrics, curves, stats, pseudo-boxes, ...
    elif name == "06_segmenter":
        assert (out / "livecell" / "segmenter_upernet_swin_t" / "best.pt").is_file()
        assert list((out / "sartorius").glob("segmenter_upernet_swin_t*/best.pt"))
    elif name == "07_inference":
        _check_inference(notebooks, nb)
    elif name == "08_evaluate":
        _check_evaluation(notebooks, nb)


def _check_inference(notebooks: NotebookSession, nb) -> None:
    from cellmask.predict import load_predict_config, resolve_run
    from cellmask.submission import check_submission

    out, data = notebooks.out, notebooks.data
    submission = out / "submission.csv"
    assert check_submission(submission, data / "test") == []
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cellmask.cli",
            "check-submission",
            str(submission),
            "--images",
            str(data / "test"),
        ],
        capture_output=True,
        text=True,
        env=notebooks.env,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("OK:"), proc.stdout + proc.stderr
    rows = _csv(submission)
    assert {r["id"] for r in rows} == {p.stem for p in (data / "test").glob("*.png")}
    assert sum(bool(r["predicted"]) for r in rows) > 0  # instances, not only empty rows
    # the ensemble of every trained branch, with the tuned thresholds 08 wrote into the weights
    used = yaml.safe_load((out / "submission.predict.yaml").read_text())
    runs = {resolve_run(r).name: r for r in notebooks.trained_branches()}
    assert sorted(b["name"] for b in used["runs"]["branches"]) == sorted(runs) and len(runs) == len(BRANCHES)
    for branch in used["runs"]["branches"]:  # WBF weights: each run's ensemble.weight (contract 6)
        cfg = yaml.safe_load((runs[branch["name"]] / "config.yaml").read_text())
        assert branch["weight"] == (cfg.get("ensemble") or {}).get("weight", 1), branch["name"]
    tuned = load_predict_config(out / "evaluate" / "tune" / "tuned.predict.yaml")
    assert used["predict"]["score_thresholds"] == tuned["score_thresholds"]
    assert used["predict"]["mask_threshold"] == tuned["mask_threshold"]
    # cellmask came from the wheel (installed into PIP_TARGET), and nothing reached the network
    report = notebooks.inference_report()
    assert Path(report["modules"]["cellmask"]).is_relative_to(notebooks.pip_target)
    assert f"from {notebooks.pip_target / 'cellmask'}" in _text(nb)
    assert all(OFFLINE in message for message in report["probes"].values()), report["probes"]


def _check_evaluation(notebooks: NotebookSession, nb) -> None:
    from cellmask.predict import load_predict_config, resolve_run

    evaluation = notebooks.out / "evaluate"
    rows = {r["row"]: r for r in _csv(evaluation / "ablation.csv")}
    trained = [resolve_run(r).name for r in notebooks.trained_branches()]
    assert len(trained) == len(BRANCHES)
    # one row per branch that was trained (whatever 02-05 produced), then the ensemble's variants
    assert sorted(n.removesuffix(" + segmenter") for n in rows if n.endswith(" + segmenter")) == sorted(
        trained
    )
    assert {"ensemble, no TTA", "ensemble + TTA"} <= set(rows)
    # the paper's pipeline is labelled as such; both readings of the TTA fusion are scored
    assert [n for n, r in rows.items() if r["paper_exact"] == "True"] == [
        "ensemble + TTA, paper-exact (5.3.2)"
    ]
    assert {r["tta_fusion"] for r in rows.values()} == {"-", "views", "per_model"}
    assert sum(r["configured"] == "True" for r in rows.values()) == 1
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows.values())
    assert {int(r["branches"]) for n, r in rows.items() if n.startswith("ensemble")} == {len(trained)}
    # PREDICT_CONFIG keeps every box; the paper-exact rows use the paper's thresholds instead
    kept = {n: int(r["instances"]) for n, r in rows.items() if "paper-exact" not in n}
    assert all(k > 0 for k in kept.values()), kept
    assert "| row |" in _text(nb) or _outputs(nb, "text/markdown")  # the ablation table is shown
    assert len(_outputs(nb, "image/png")) >= 4  # per class, per threshold, comparison, tuning
    tuned = load_predict_config(evaluation / "tune" / "tuned.predict.yaml")
    assert set(tuned["score_thresholds"]) == {"shsy5y", "cort", "astro"}


@pytest.mark.slow
def test_inference_kernel_imports_only_the_base_image_and_the_wheels(notebooks):
    """07 imports nothing that is not in the standard library, the base image base_image.json
    declares or the wheels dataset: what its code cells import (every branch) and every module
    that appeared in ``sys.modules`` while it ran (cellmask's imports on that path included)."""
    from cellmask.kaggle.imports import kernel_distributions, notebook_imports, undeclared_imports
    from cellmask.kaggle.wheels import read_base_image, wheel_distributions

    report = notebooks.inference_report()
    static = notebook_imports(read_notebook(NOTEBOOK_DIR / "07_inference.ipynb"))
    runtime = set(report["modules"])
    # the recording saw the pipeline: an empty or partial one would pass vacuously
    assert {"cellmask.predict.predictor", "torch", "timm", "ensemble_boxes", "matplotlib"} <= runtime
    assert {"cellmask", "matplotlib", "subprocess"} <= static
    base = read_base_image(ROOT / BASE_IMAGE)
    built = {p.name.split("-")[0] for p in (notebooks.inputs / "cellmask-wheels").glob("*.whl")}
    assert built == {"cellmask"}  # what this test built; make wheels adds the rest
    allowed = kernel_distributions(base, wheel_distributions(base))
    assert undeclared_imports(static, allowed) == []
    assert undeclared_imports(report["modules"], allowed) == []
