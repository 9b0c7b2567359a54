"""Kaggle packaging: the committed metadata, the kernel folders, and the kaggle commands of
``make push-datasets / push / push-train / submit`` (run against a fake ``kaggle`` CLI, and as
``DRY_RUN=1`` through make itself). Nothing here needs the real CLI, credentials or a network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_checkout, run_make

from cellmask.kaggle import api, packaging
from cellmask.kaggle.__main__ import main
from cellmask.kaggle.notebooks import notebook_parameters, notebook_problems, read_notebook

ROOT = Path(__file__).resolve().parents[1]
LICENSES = {
    "CC0-1.0",
    "CC-BY-SA-4.0",
    "CC-BY-NC-SA-4.0",
    "CC-BY-4.0",
    "CC-BY-NC-4.0",
    "other",
    "unknown",
    "apache-2.0",
}
KERNEL_KEYS = {
    "id",
    "title",
    "code_file",
    "language",
    "kernel_type",
    "is_private",
    "enable_gpu",
    "enable_internet",
    "dataset_sources",
    "competition_sources",
    "kernel_sources",
    "model_sources",
    "docker_image_pinning_type",
}


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of the checkout's sources (what staging and the make targets read and write)."""
    return copy_checkout(tmp_path)


FAKE_KAGGLE = r"""
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_KAGGLE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
state = os.environ["FAKE_KAGGLE_LOG"] + ".status"
if args[:2] == ["kernels", "push"]:
    print("Kernel version 7 successfully pushed.  Please check progress at https://www.kaggle.com/code/x")
elif args[:2] == ["kernels", "status"]:
    n = int(open(state).read()) if os.path.exists(state) else 0
    open(state, "w").write(str(n + 1))
    final = os.environ.get("FAKE_KAGGLE_FINAL", "COMPLETE")
    status = "RUNNING" if n < 2 else final
    print(f'{args[2]} has status "KernelWorkerStatus.{status}"')
    if status == "ERROR":
        print('Failure message: "Your notebook hit an error"')
elif args[:2] == ["datasets", "status"]:
    if args[2].split("/")[1] in os.environ.get("FAKE_KAGGLE_MISSING", "").split(","):
        print("404 Client Error: Not Found", file=sys.stderr)
        sys.exit(1)
    print("ready")
else:
    print("ok")
"""


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch) -> Path:
    """A ``kaggle`` executable on PATH that logs its arguments (one JSON list per line) and answers
    like the real CLI; credentials in the environment, none on disk."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "kaggle"
    exe.write_text(f"#!{sys.executable}\n{FAKE_KAGGLE}")
    exe.chmod(0o755)
    log = tmp_path / "kaggle.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(api.runner, "find_kaggle_cli", lambda: str(exe))  # even where a real one is installed
    monkeypatch.setenv("FAKE_KAGGLE_LOG", str(log))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KAGGLE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    return log


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# ------------------------------------------------------------------------------ committed metadata


def test_inference_kernel_metadata():
    meta = json.loads((ROOT / "kernel-metadata.json").read_text())
    assert set(meta) == KERNEL_KEYS
    assert meta["id"] == "USER/cellmask-inference"
    assert packaging.slugify(meta["title"]) == "cellmask-inference"
    assert (meta["language"], meta["kernel_type"]) == ("python", "notebook")
    assert meta["is_private"] is True and meta["enable_gpu"] is True
    assert meta["enable_internet"] is False  # set explicitly: the CLI's default is true
    assert meta["competition_sources"] == ["sartorius-cell-instance-segmentation"] == [api.COMPETITION]
    # the code file exists and is a valid notebook without outputs
    code = ROOT / meta["code_file"]
    assert code == ROOT / "notebooks" / "07_inference.ipynb"
    assert notebook_problems(code) == []
    # the weights, wheels and code datasets, each defined under datasets/
    assert sorted(meta["dataset_sources"]) == sorted(f"USER/{n}" for n in packaging.DATASET_NAMES)
    for source in meta["dataset_sources"]:
        name = source.split("/")[1]
        dataset = json.loads((ROOT / "datasets" / name / "dataset-metadata.json").read_text())
        assert dataset["id"] == source
    assert meta["kernel_sources"] == [] and meta["model_sources"] == []
    # kaggle CLI: "original" keeps the image of the kernel's first version (wheels built for it)
    assert meta["docker_image_pinning_type"] == "original"


@pytest.mark.parametrize("name", packaging.DATASET_NAMES)
def test_dataset_metadata(name):
    meta = json.loads((ROOT / "datasets" / name / "dataset-metadata.json").read_text())
    assert meta["id"] == f"USER/{name}"
    assert 6 <= len(meta["title"]) <= 50 and packaging.slugify(meta["title"]) == name
    assert 20 <= len(meta["subtitle"]) <= 80
    assert len(meta["licenses"]) == 1 and meta["licenses"][0]["name"] in LICENSES


def test_every_dataset_folder_is_known():
    folders = sorted(p.parent.name for p in (ROOT / "datasets").glob("*/dataset-metadata.json"))
    assert folders == sorted(packaging.DATASET_NAMES)


# ------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("notebook", [n for n in packaging.list_notebooks(ROOT) if n != "07_inference"])
def test_training_kernel_metadata(notebook):
    spec = packaging.kernel_spec(notebook, root=ROOT)
    meta = packaging.kernel_metadata(spec, "someone", ROOT)
    assert set(meta) == KERNEL_KEYS
    assert meta["id"] == f"someone/{spec.slug}" and packaging.slugify(meta["title"]) == spec.slug
    assert len(meta["title"]) >= 5
    assert meta["enable_internet"] is True
    assert meta["enable_gpu"] is (notebook != "00_prepare_data")
    assert (ROOT / meta["code_file"]).is_file()
    assert meta["competition_sources"] == [api.COMPETITION]
    assert {"someone/cellmask-wheels", "someone/cellmask-code"} <= set(meta["dataset_sources"])
    if "finetune" in notebook or "soft_teacher" in notebook:  # reads its branch's LIVECell run
        branch = notebook_parameters(read_notebook(ROOT / "notebooks" / f"{notebook}.ipynb"))["BRANCH"]
        assert meta["kernel_sources"] == [f"someone/{packaging.pretrain_slug(branch)}"]
        assert (ROOT / "configs" / f"{branch}.yaml").is_file()


def test_kernel_slugs_are_distinct():
    specs = [packaging.kernel_spec(n, root=ROOT) for n in packaging.list_notebooks(ROOT)]
    specs += [
        packaging.kernel_spec("01_pretrain_livecell", b, root=ROOT)
        for b in ("faster_rcnn_swin_t", "cascade_rcnn_resnext101", "soft_teacher_resnext101")
    ]
    assert len({s.slug for s in specs}) == len(specs)


def test_kernel_spec_errors():
    with pytest.raises(ValueError, match="unknown notebook"):
        packaging.kernel_spec("09_nothing", root=ROOT)
    with pytest.raises(ValueError, match="only applies to 01_pretrain_livecell"):
        packaging.kernel_spec("02_finetune_faster_rcnn_swin_t", "faster_rcnn_swin_t", root=ROOT)
    with pytest.raises(ValueError, match="unknown branch"):
        packaging.kernel_spec("01_pretrain_livecell", "no_such_config", root=ROOT)


def test_stage_kernel_injects_the_branch_and_leaves_the_checkout_alone(checkout):
    before = {
        p: p.read_bytes()
        for p in [checkout / "kernel-metadata.json", *(checkout / "notebooks").glob("*.ipynb")]
    }
    spec = packaging.kernel_spec("01_pretrain_livecell", "cascade_rcnn_resnext101", root=checkout)
    folder = packaging.stage_kernel(spec, "someone", checkout)
    assert folder == checkout / "build" / "kaggle" / "kernels" / "cellmask-pretrain-cascade-rcnn-resnext101"
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["id"] == "someone/cellmask-pretrain-cascade-rcnn-resnext101"
    staged = read_notebook(folder / meta["code_file"])
    assert notebook_parameters(staged)["BRANCHES"] == ["cascade_rcnn_resnext101"]
    # the inference kernel: the committed notebook as is, the template with the user filled in
    folder = packaging.stage_kernel(packaging.kernel_spec("07_inference", root=checkout), "someone", checkout)
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert (folder / meta["code_file"]).read_bytes() == (
        checkout / "notebooks" / "07_inference.ipynb"
    ).read_bytes()
    assert meta["enable_internet"] is False and meta["id"] == "someone/cellmask-inference"
    assert "USER" not in json.dumps(meta)
    assert {p: p.read_bytes() for p in before} == before


def test_stage_dataset_links_the_files_and_fills_the_user(checkout):
    weights = checkout / "datasets" / "cellmask-weights"
    with pytest.raises(packaging.DataError, match="make weights"):
        packaging.stage_dataset("cellmask-weights", "someone", checkout)
    (weights / "segmenter").mkdir()
    (weights / "segmenter" / "best.pt").write_bytes(b"weights")
    template = (weights / "dataset-metadata.json").read_bytes()
    folder = packaging.stage_dataset("cellmask-weights", "someone", checkout)
    assert (folder / "segmenter" / "best.pt").read_bytes() == b"weights"
    assert json.loads((folder / "dataset-metadata.json").read_text())["id"] == "someone/cellmask-weights"
    assert (weights / "dataset-metadata.json").read_bytes() == template
    # the wheels dataset needs wheels, not just its base_image.json
    with pytest.raises(packaging.DataError, match="make wheels"):
        packaging.stage_dataset("cellmask-wheels", "someone", checkout)


def test_code_dataset_holds_configs_sources_and_notebooks(checkout):
    (checkout / "src" / "cellmask" / "__pycache__").mkdir(exist_ok=True)
    (checkout / "src" / "cellmask" / "__pycache__" / "x.pyc").write_bytes(b"")
    out = packaging.build_code_dataset(checkout)
    assert (out / "configs" / "faster_rcnn_swin_t.yaml").is_file()
    assert (out / "src" / "cellmask" / "kaggle" / "session.py").is_file()
    assert (out / "notebooks" / "07_inference.ipynb").is_file()
    assert not list(out.rglob("__pycache__"))


# ------------------------------------------------------------------------------ user and credentials


def test_username_from_env_then_kaggle_json(tmp_path):
    home = tmp_path / "home"
    assert api.kaggle_username({"KAGGLE_USERNAME": "alice", "HOME": str(home)}) == "alice"
    with pytest.raises(api.KaggleSetupError, match=r"KAGGLE_USERNAME is not set.*\.kaggle/kaggle\.json"):
        api.kaggle_username({"HOME": str(home)})
    (home / ".config" / "kaggle").mkdir(parents=True)  # the CLI's XDG location
    (home / ".config" / "kaggle" / "kaggle.json").write_text('{"username": "xdg", "key": "k"}')
    assert api.kaggle_username({"HOME": str(home)}) == "xdg"
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "kaggle.json").write_text('{"username": "bob", "key": "k"}')
    assert api.kaggle_username({"HOME": str(home)}) == "bob"
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "kaggle.json").write_text('{"key": "k"}')
    with pytest.raises(api.KaggleSetupError, match="has no username"):
        api.kaggle_username({"HOME": str(home), "KAGGLE_CONFIG_DIR": str(custom)})
    (custom / "kaggle.json").write_text("not json")
    with pytest.raises(api.KaggleSetupError, match="not a readable kaggle.json"):
        api.kaggle_username({"HOME": str(home), "KAGGLE_CONFIG_DIR": str(custom)})


def test_setup_check_names_everything_missing(tmp_path):
    env = {"HOME": str(tmp_path)}
    with pytest.raises(api.KaggleSetupError) as err:
        api.check_kaggle_setup(env, which=lambda _: None)
    assert "`kaggle` command is not installed" in str(err.value) and "no Kaggle credentials" in str(err.value)
    with pytest.raises(api.KaggleSetupError, match="^no Kaggle credentials"):
        api.check_kaggle_setup(env, which=lambda _: "/usr/bin/kaggle")
    with pytest.raises(
        api.KaggleSetupError, match="^the `kaggle` command is not installed .*: install the CLI"
    ):
        api.check_kaggle_setup({**env, "KAGGLE_USERNAME": "a", "KAGGLE_KEY": "k"}, which=lambda _: None)
    api.check_kaggle_setup(
        {**env, "KAGGLE_USERNAME": "a", "KAGGLE_KEY": "k"}, which=lambda _: "/usr/bin/kaggle"
    )
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text('{"username": "a", "key": "k"}')
    api.check_kaggle_setup(env, which=lambda _: "/usr/bin/kaggle")


# ------------------------------------------------------------------------------ CLI outputs


def test_parse_push_and_status_outputs():
    out = "Kernel version 12 successfully pushed.  Please check progress at https://www.kaggle.com/code/a/b"
    assert api.parse_push_version(out) == 12
    assert api.parse_push_version("Kernel push error: Notebook not found") is None
    assert api.parse_status('a/b has status "complete"') == "complete"  # older CLI
    assert api.parse_status('a/b has status "KernelWorkerStatus.RUNNING"') == "running"
    assert api.parse_status('a/b has status "KernelWorkerStatus.ERROR"\nFailure message: "x"') == "error"
    with pytest.raises(api.KaggleCommandError, match="could not read a kernel status"):
        api.parse_status("403 Forbidden")


# ------------------------------------------------------------------------------ the commands, run


def test_submit_pushes_waits_and_submits_the_pushed_version(checkout, fake_kaggle, capsys):
    assert main(["--root", str(checkout), "submit", "--message", "first try", "--poll", "0"]) == 0
    calls = _calls(fake_kaggle)
    folder = str(checkout / "build" / "kaggle" / "kernels" / "cellmask-inference")
    # first the datasets the kernel attaches, until each is ready (the fake: at once)
    assert calls[:3] == [
        ["datasets", "status", f"someone/{name}", "--format", "json"] for name in packaging.DATASET_NAMES
    ]
    assert calls[3] == ["kernels", "push", "-p", folder]
    assert (
        calls[4:7] == [["kernels", "status", "someone/cellmask-inference/7"]] * 3
    )  # the pushed version: running, running, complete
    assert calls[7] == [
        "competitions", "submit", "sartorius-cell-instance-segmentation", "-f", "submission.csv",
        "-k", "someone/cellmask-inference", "-v", "7", "-m", "first try",
    ]  # fmt: skip
    assert len(calls) == 8
    assert json.loads(Path(folder, "kernel-metadata.json").read_text())["id"] == "someone/cellmask-inference"


def test_submit_stops_when_the_kernel_run_fails(checkout, fake_kaggle, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_KAGGLE_FINAL", "ERROR")
    assert main(["--root", str(checkout), "submit", "--poll", "0"]) == 2
    err = capsys.readouterr().err
    assert "ended with status error: Your notebook hit an error" in err
    assert "kaggle kernels output someone/cellmask-inference" in err
    assert not [c for c in _calls(fake_kaggle) if c[0] == "competitions"]


def test_submit_a_given_version_without_pushing(checkout, fake_kaggle):
    assert main(["--root", str(checkout), "submit", "--version", "3", "--message", "again"]) == 0
    assert _calls(fake_kaggle) == [
        ["competitions", "submit", api.COMPETITION, "-f", "submission.csv", "-k", "someone/cellmask-inference",
         "-v", "3", "-m", "again"],
    ]  # fmt: skip


def test_push_datasets_versions_existing_and_creates_new(checkout, fake_kaggle, monkeypatch):
    from cellmask.kaggle import wheels

    built = []
    monkeypatch.setattr(wheels, "build_own_wheel", lambda root, out, stamp: built.append(stamp) or out)
    monkeypatch.setenv("FAKE_KAGGLE_MISSING", "cellmask-wheels")
    (checkout / "datasets" / "cellmask-weights" / "segmenter").mkdir()
    (checkout / "datasets" / "cellmask-weights" / "segmenter" / "best.pt").write_bytes(b"w")
    (checkout / "datasets" / "cellmask-wheels" / "cellmask-0.1.0-py3-none-any.whl").write_bytes(b"w")
    assert main(["--root", str(checkout), "push-datasets", "--message", "v2"]) == 0
    staged = checkout / "build" / "kaggle" / "datasets"
    assert _calls(fake_kaggle) == [
        ["datasets", "status", "someone/cellmask-weights", "--format", "json"],
        ["datasets", "version", "-p", str(staged / "cellmask-weights"), "-r", "zip", "-m", "v2"],
        ["datasets", "status", "someone/cellmask-wheels", "--format", "json"],
        ["datasets", "create", "-p", str(staged / "cellmask-wheels"), "-r", "zip"],
        ["datasets", "status", "someone/cellmask-code", "--format", "json"],
        ["datasets", "version", "-p", str(staged / "cellmask-code"), "-r", "zip", "-m", "v2"],
    ]
    assert (staged / "cellmask-wheels" / "base_image.json").is_file()  # the kernel can read it
    assert (staged / "cellmask-code" / "configs" / "base.yaml").is_file()
    # the wheel is rebuilt from the working tree with the stamp the code dataset carries
    code_stamp = json.loads((staged / "cellmask-code" / "cellmask-build.json").read_text())
    assert [s.version for s in built] == [code_stamp["version"]]
    # what was pushed is recorded: a new dataset's first version; a plain-status CLI tells no number
    record = json.loads((checkout / "build" / "kaggle" / "pushed.json").read_text())
    assert record["someone/cellmask-wheels"]["version"] == 1
    assert record["someone/cellmask-code"]["stamp"] == code_stamp["version"]


def test_push_train_and_missing_setup(checkout, fake_kaggle, monkeypatch, capsys):
    assert (
        main(["--root", str(checkout), "push-train", "notebooks/02_finetune_faster_rcnn_swin_t.ipynb"]) == 0
    )
    folder = checkout / "build" / "kaggle" / "kernels" / "cellmask-finetune-faster-rcnn-swin-t"
    assert _calls(fake_kaggle) == [  # the datasets it attaches first: live, then the push
        ["datasets", "status", "someone/cellmask-wheels", "--format", "json"],
        ["datasets", "status", "someone/cellmask-code", "--format", "json"],
        ["kernels", "push", "-p", str(folder)],
    ]
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["enable_internet"] is True and meta["kernel_sources"] == [
        "someone/cellmask-pretrain-faster-rcnn-swin-t"
    ]
    # without credentials (and with the dry run off) nothing runs, and one line says why
    monkeypatch.delenv("KAGGLE_KEY")
    assert main(["--root", str(checkout), "push"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no Kaggle credentials" in err and "kaggle.json" in err
    assert len(_calls(fake_kaggle)) == 3


# ------------------------------------------------------------------------------ DRY_RUN through make


def _make(checkout: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run_make(checkout, tmp_path, *args, **env)


def test_make_submit_dry_run_prints_the_real_commands(checkout, tmp_path):
    proc = _make(checkout, tmp_path, "submit", "DRY_RUN=1", KAGGLE_USERNAME="someone")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert lines[:3] == [
        f"$ kaggle datasets status someone/{name} --format json" for name in packaging.DATASET_NAMES
    ]
    assert (
        lines[3] == "$ kaggle kernels push -p build/kaggle/kernels/cellmask-inference"
    )  # from the repo root
    assert lines[4] == "$ kaggle kernels status someone/cellmask-inference/VERSION_OF_THE_PUSH"
    assert lines[5].startswith(
        "$ kaggle competitions submit sartorius-cell-instance-segmentation -f submission.csv "
        "-k someone/cellmask-inference -v VERSION_OF_THE_PUSH "
    )
    assert " -m 'cellmask " in lines[5]
    assert len(lines) == 6
    folder = checkout / "build" / "kaggle" / "kernels" / "cellmask-inference"
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["id"] == "someone/cellmask-inference" and meta["enable_internet"] is False

    proc = _make(
        checkout,
        tmp_path,
        "submit",
        "DRY_RUN=1",
        "VERSION=4",
        "MSG=tuned thresholds",
        KAGGLE_USERNAME="someone",
    )
    assert proc.stdout.strip().splitlines() == [
        "$ kaggle competitions submit sartorius-cell-instance-segmentation -f submission.csv "
        "-k someone/cellmask-inference -v 4 -m 'tuned thresholds'"
    ]


def test_make_without_a_user_name_says_what_to_do(checkout, tmp_path):
    proc = _make(checkout, tmp_path, "submit", "DRY_RUN=1")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "cellmask kaggle" in line]
    assert len(errors) == 1 and "KAGGLE_USERNAME is not set" in errors[0] and "kaggle.json" in errors[0]
    assert not (checkout / "build").exists()


def test_make_push_train_dry_run(checkout, tmp_path):
    proc = _make(
        checkout, tmp_path, "push-train", "NB=01_pretrain_livecell", "BRANCH=cascade_rcnn_resnest101", "DRY_RUN=1",
        KAGGLE_USERNAME="someone",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "$ kaggle kernels push -p build/kaggle/kernels/cellmask-pretrain-cascade-rcnn-resnest101"
        in proc.stdout
    )
    proc = _make(checkout, tmp_path, "push-train", "DRY_RUN=1", KAGGLE_USERNAME="someone")
    assert proc.returncode != 0 and "usage: make push-train NB=" in proc.stdout
    # 01 without BRANCH would build a four-branch kernel nothing attaches: a usage line instead
    proc = _make(
        checkout, tmp_path, "push-train", "NB=01_pretrain_livecell", "DRY_RUN=1", KAGGLE_USERNAME="someone"
    )
    assert (
        proc.returncode != 0
        and "BRANCH is required" in proc.stdout
        and "usage: make push-train" in proc.stdout
    )
    assert "kaggle kernels push" not in proc.stdout


def test_make_push_train_passes_epochs_overrides_and_a_continuation(checkout, tmp_path):
    from cellmask.kaggle.notebooks import notebook_parameters, read_notebook_json

    proc = _make(
        checkout, tmp_path, "push-train", "NB=03_finetune_cascade_resnext101", "EPOCHS=3",
        "RESUME_FROM=someone/k/2", "OVERRIDES=train.lr=1e-4 train.batch_size=4", "DRY_RUN=1",
        KAGGLE_USERNAME="someone",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "continues someone/k/2" in proc.stdout
    # the datasets it attaches are waited for, as for make push and make submit
    waits = [line for line in proc.stdout.splitlines() if line.startswith("$ kaggle datasets status")]
    assert waits == [
        f"$ kaggle datasets status someone/{n} --format json" for n in ("cellmask-wheels", "cellmask-code")
    ]
    assert proc.stdout.index("$ kaggle datasets status") < proc.stdout.index("$ kaggle kernels push")
    folder = checkout / "build" / "kaggle" / "kernels" / "cellmask-finetune-cascade-resnext101"
    params = notebook_parameters(read_notebook_json(folder / "03_finetune_cascade_resnext101.ipynb"))
    assert params["EPOCHS"] == 3 and params["RESUME_FROM"] == "someone/k/2"
    assert params["OVERRIDES"] == ["train.lr=1e-4", "train.batch_size=4"]
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    # the LIVECell run it fine-tunes from, and the pinned version it continues
    assert meta["kernel_sources"] == ["someone/cellmask-pretrain-cascade-rcnn-resnext101", "someone/k/2"]
    # the committed notebook is untouched
    committed = notebook_parameters(
        read_notebook_json(checkout / "notebooks" / "03_finetune_cascade_resnext101.ipynb")
    )
    assert committed["EPOCHS"] is None and committed["RESUME_FROM"] is None


@pytest.mark.parametrize(
    ("arg", "says"),
    [
        ("RESUME_FROM=someone/k", "owner/slug/N"),
        ("RESUME_FROM=/kaggle/input/k", "owner/slug/N"),
        ("EPOCHS=0", "EPOCHS must be >= 1"),
        ("OVERRIDES=train.lr", "KEY.PATH=VALUE"),
    ],
)
def test_make_push_train_refuses_bad_run_options(checkout, tmp_path, arg, says):
    proc = _make(
        checkout, tmp_path, "push-train", "NB=02_finetune_faster_rcnn_swin_t", arg, "DRY_RUN=1",
        KAGGLE_USERNAME="someone",
    )  # fmt: skip
    assert proc.returncode != 0 and says in proc.stderr
    assert "kaggle kernels push" not in proc.stdout


def test_make_pull_runs_dry_run(checkout, tmp_path):
    proc = _make(checkout, tmp_path, "pull-runs", "DRY_RUN=1", KAGGLE_USERNAME="someone")
    assert proc.returncode == 0, proc.stderr
    pulled = [
        line.split()[4] for line in proc.stdout.splitlines() if line.startswith("$ kaggle kernels output")
    ]
    assert pulled == [
        "someone/cellmask-finetune-faster-rcnn-swin-t",
        "someone/cellmask-finetune-cascade-resnext101",
        "someone/cellmask-finetune-cascade-resnest101",
        "someone/cellmask-soft-teacher",
        "someone/cellmask-segmenter",
    ]
    # only what make weights reads: not last.pt (optimizer state) nor the epoch checkpoints
    assert all(
        line.endswith(" -p runs --file-pattern '(^|/)(best\\.pt|config\\.yaml|metrics\\.csv|status\\.json)$'")
        for line in proc.stdout.splitlines()
        if line.startswith("$ ")
    ), proc.stdout


def test_make_pull_evaluation_dry_run(checkout, tmp_path):
    proc = _make(checkout, tmp_path, "pull-evaluation", "DRY_RUN=1", KAGGLE_USERNAME="someone")
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert commands == ["$ kaggle kernels output someone/cellmask-evaluate -p runs"]
    assert "make weights PREDICT_CONFIG=runs/evaluate/tune/tuned.predict.yaml" in proc.stdout
