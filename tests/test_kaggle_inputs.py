"""cellmask.data.inputs: every input a kernel reads found under a fake ``/kaggle/input`` in both
layouts Kaggle mounts (``<slug>/``, and ``competitions/``, ``datasets/<owner>/``,
``notebooks/<owner>/``), a missing one reported with what was looked for, a bounded search, and
the fine-tuning notebooks' LIVECell-init decision (:func:`cellmask.kaggle.session.livecell_init`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellmask.data import inputs
from cellmask.data.inputs import default_data_root
from cellmask.kaggle import session

COMPETITION = "sartorius-cell-instance-segmentation"
BRANCH = "faster_rcnn_swin_t"


def _files(root: Path, *relative: str) -> None:
    """Empty files (and their folders) at ``root/<relative>``; a trailing ``/`` makes a folder."""
    for rel in relative:
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")


def _competition(folder: Path) -> None:
    _files(folder, "train.csv", "test/a.png", "train/b.png", "LIVECell_dataset_2021/images/c.tif")


def _wheels(folder: Path) -> None:
    _files(folder, "cellmask-0.1.0-py3-none-any.whl", "timm-1.0.0-py3-none-any.whl")


def _code(folder: Path) -> None:
    _files(folder, "configs/base.yaml", "src/cellmask/__init__.py", "pyproject.toml")


def _weights(folder: Path) -> None:
    _files(folder, "manifest.json", "branches/x/best.pt", "branches/x/config.yaml", "segmenter/best.pt")


def _pretrain_output(folder: Path, branch: str = BRANCH) -> None:
    _files(folder, f"livecell/{branch}/best.pt", f"livecell/{branch}/config.yaml", "__notebook__.ipynb")


def _old_layout(root: Path) -> dict[str, Path]:
    """Every input as ``/kaggle/input/<slug>/``; returns where each is."""
    where = {
        "competition": root / COMPETITION,
        "wheels": root / "cellmask-wheels",
        "code": root / "cellmask-code",
        "weights": root / "cellmask-weights",
        "pretrain": root / "cellmask-pretrain-faster-rcnn-swin-t",
    }
    _fill(where)
    return where


def _new_layout(root: Path) -> dict[str, Path]:
    """Every input as the newer notebooks see it; returns where each is."""
    where = {
        "competition": root / "competitions" / COMPETITION,
        "wheels": root / "datasets" / "me" / "cellmask-wheels",
        "code": root / "datasets" / "me" / "cellmask-code",
        "weights": root / "datasets" / "me" / "cellmask-weights",
        "pretrain": root / "notebooks" / "me" / "cellmask-pretrain-faster-rcnn-swin-t",
    }
    _fill(where)
    return where


def _fill(where: dict[str, Path]) -> None:
    _competition(where["competition"])
    _wheels(where["wheels"])
    _code(where["code"])
    _weights(where["weights"])
    _pretrain_output(where["pretrain"])


@pytest.fixture(params=["old", "new"])
def layout(request, tmp_path) -> tuple[Path, dict[str, Path]]:
    root = tmp_path / "input"
    return root, (_old_layout if request.param == "old" else _new_layout)(root)


# ------------------------------------------------------------------------------ finding


def test_every_input_is_found_in_both_layouts(layout):
    root, where = layout
    assert inputs.competition_root(root) == where["competition"]
    assert inputs.wheels_folder(root) == where["wheels"]
    assert inputs.code_dataset(root) == where["code"]
    assert inputs.weights_dataset(root) == where["weights"]
    run = where["pretrain"] / "livecell" / BRANCH
    assert inputs.find_run("livecell", BRANCH, input_root=root) == run
    assert inputs.find_run("livecell", "other", input_root=root) is None
    assert where["pretrain"] in inputs.input_mounts(root)
    assert set(where.values()) <= set(inputs.input_mounts(root))


def test_session_helpers_use_the_resolver(layout, tmp_path, monkeypatch):
    root, where = layout
    run = where["pretrain"] / "livecell" / BRANCH
    assert inputs.find_relative(f"livecell/{BRANCH}/best.pt", input_root=root) == run / "best.pt"
    assert inputs.find_relative("manifest.json", input_root=root) == where["weights"] / "manifest.json"
    assert inputs.find_relative("nothing.txt", input_root=root) is None
    assert session.code_configs(root) == where["code"] / "configs"
    # on "Kaggle" (the input root exists): the data is the competition's folder, whichever layout
    monkeypatch.delenv("CELLMASK_DATA", raising=False)
    assert default_data_root(root) == where["competition"]
    monkeypatch.chdir(tmp_path)  # outside a checkout: the configs come from the code dataset
    paths = session.notebook_paths(out=tmp_path / "out", input_root=root)
    assert paths.data == where["competition"] and paths.configs == where["code"] / "configs"
    monkeypatch.setenv("CELLMASK_DATA", str(tmp_path / "mine"))  # the variable still comes first
    assert default_data_root(root) == tmp_path / "mine"


def test_preferred_names_win_over_other_matches(tmp_path):
    root = tmp_path / "input"
    _competition(root / "competitions" / "a-copy")  # found first in walking order
    _competition(root / "competitions" / COMPETITION)
    _wheels(root / "datasets" / "me" / "aa-wheels")
    _wheels(root / "datasets" / "me" / "cellmask-wheels")
    assert inputs.competition_root(root) == root / "competitions" / COMPETITION
    assert inputs.wheels_folder(root) == root / "datasets" / "me" / "cellmask-wheels"
    _competition(root / "zz")  # the others follow, shallowest first
    assert inputs.find_all(inputs.COMPETITION_INPUT, root) == [
        root / "competitions" / COMPETITION,
        root / "zz",
        root / "competitions" / "a-copy",
    ]


def test_a_wheel_folder_without_cellmask_is_not_the_wheels_dataset(tmp_path):
    _files(tmp_path / "input" / "other", "timm-1.0.0-py3-none-any.whl")
    assert inputs.find(inputs.WHEELS_INPUT, tmp_path / "input") is None


# ------------------------------------------------------------------------------ missing inputs


def test_a_missing_input_says_what_was_looked_for_and_what_is_there(tmp_path):
    root = tmp_path / "input"
    _wheels(root / "datasets" / "me" / "cellmask-wheels")
    _files(root / "datasets" / "me", *[f"extra-{i:02d}/x.txt" for i in range(20)])
    with pytest.raises(inputs.InputNotFound) as caught:
        inputs.competition_root(root)
    assert isinstance(caught.value, FileNotFoundError)
    message = str(caught.value)
    assert message.startswith("no competition data: looked for a folder holding train.csv + test/")
    for expected in (
        f"{root}/<slug>/",  # the old layout
        f"{root}/competitions/<competition>/",  # the new one
        f"{root}/datasets/<owner>/<slug>/",
        f"{root}/notebooks/<owner>/<slug>/",
        "attach the competition's data",
        f"{root} holds:\n  datasets/\n    me/",  # two levels deep ...
    ):
        assert expected in message, expected
    assert "cellmask-wheels" not in message  # ... and no deeper
    with pytest.raises(inputs.InputNotFound, match=r"no code dataset: .* configs/ \+ src/cellmask"):
        inputs.code_dataset(root)
    with pytest.raises(inputs.InputNotFound, match="no weights dataset: .* manifest.json"):
        inputs.weights_dataset(root)
    with pytest.raises(inputs.InputNotFound, match="does not exist"):
        inputs.wheels_folder(tmp_path / "nowhere")


def test_the_listing_is_truncated(tmp_path):
    root = tmp_path / "input"
    _files(root, *[f"slug-{i:02d}/" for i in range(30)])
    text = inputs.describe_inputs(root)
    assert "slug-00/" in text and "slug-29/" not in text
    assert f"... and {30 - inputs.LISTED_PER_FOLDER} more" in text


# ------------------------------------------------------------------------------ bounded search


def test_the_search_is_bounded(tmp_path):
    root = tmp_path / "input"
    deep = root / "notebooks" / "me" / "kernel" / "nested" / "livecell" / BRANCH  # 6 levels
    _files(deep, "best.pt", "config.yaml")
    _code(root / "a" / "b" / "c" / "d" / "e" / "code")
    assert inputs.find_run("livecell", BRANCH, input_root=root) is None
    assert inputs.find(inputs.CODE_INPUT, root) is None
    # runs inside image folders or inside another input are not looked for
    _files(root / "x" / "images" / "livecell" / BRANCH, "best.pt", "config.yaml")
    _competition(root / COMPETITION)
    _files(root / COMPETITION / "livecell" / BRANCH, "best.pt", "config.yaml")
    assert inputs.find_run("livecell", BRANCH, input_root=root) is None


def test_big_image_folders_are_never_listed(tmp_path, monkeypatch):
    root = tmp_path / "input"
    _competition(root / "competitions" / COMPETITION)
    _files(root / "datasets" / "me" / "livecell-copy" / "images", *[f"{i}.tif" for i in range(50)])
    _pretrain_output(root / "notebooks" / "me" / "pretrain")
    listed: list[Path] = []
    real = Path.iterdir

    def spy(self):
        listed.append(self)
        return real(self)

    monkeypatch.setattr(Path, "iterdir", spy)
    assert inputs.find_run("livecell", BRANCH, input_root=root) is not None
    assert inputs.competition_root(root) == root / "competitions" / COMPETITION
    assert not [
        p for p in listed if p.name in inputs.PRUNED or p.is_relative_to(root / "competitions" / COMPETITION)
    ]


# ------------------------------------------------------------------------------ LIVECell init


def test_livecell_init_finds_the_branch_run(layout, tmp_path):
    root, where = layout
    found = session.livecell_init(BRANCH, profile="paper", roots=[tmp_path / "out"], input_root=root)
    assert found == where["pretrain"] / "livecell" / BRANCH / "best.pt"
    _pretrain_output(tmp_path / "out")  # the same session's run comes first
    found = session.livecell_init(BRANCH, profile="paper", roots=[tmp_path / "out"], input_root=root)
    assert found == tmp_path / "out" / "livecell" / BRANCH / "best.pt"


def test_livecell_init_stops_the_paper_profile_without_a_run(tmp_path):
    root = tmp_path / "input"
    _competition(root / "competitions" / COMPETITION)
    _pretrain_output(root / "notebooks" / "me" / "other-branch", "cascade_rcnn_resnext101")
    with pytest.raises(inputs.InputNotFound) as caught:
        session.livecell_init(BRANCH, profile="paper", roots=[tmp_path / "out"], input_root=root)
    message = str(caught.value)
    for expected in (
        f"livecell/{BRANCH}/",
        "best.pt + config.yaml",
        str(tmp_path / "out"),
        "01_pretrain_livecell",
        "INIT",
        "FROM_IMAGENET",
        f"{root}/notebooks/<owner>/<slug>/",
        f"{root} holds:",
    ):
        assert expected in message, expected


def test_livecell_init_on_purpose_or_outside_the_paper_profile(tmp_path):
    root = tmp_path / "input"
    root.mkdir()
    assert session.livecell_init(BRANCH, profile="paper", from_imagenet=True, input_root=root) is None
    for profile in ("demo", "smoke"):  # CPU runs go on from the config's backbone
        assert session.livecell_init(BRANCH, profile=profile, input_root=root) is None
    checkpoint = tmp_path / "mine.pt"
    checkpoint.write_bytes(b"")
    assert session.livecell_init(BRANCH, init=checkpoint, input_root=root) == checkpoint
    with pytest.raises(ValueError, match="pick one"):
        session.livecell_init(BRANCH, init=checkpoint, from_imagenet=True, input_root=root)


@pytest.mark.parametrize("layout", [_old_layout, _new_layout])
def test_a_continuation_finds_the_previous_versions_run_by_its_kernel_reference(tmp_path: Path, layout):
    """``RESUME_FROM = "me/cellmask-finetune-x/3"`` (what make push-train RESUME_FROM=.. injects,
    the version attached as a kernel source) resolves to that output's ``sartorius/<config>``."""
    root = tmp_path / "input"
    layout(root)
    mount = (root / "notebooks" / "me" if layout is _new_layout else root) / "cellmask-finetune-x"
    _files(mount, f"sartorius/{BRANCH}/last.pt", f"sartorius/{BRANCH}/config.yaml")
    run = inputs.resume_run("me/cellmask-finetune-x/3", "sartorius", BRANCH, root)
    assert run == mount / "sartorius" / BRANCH
    # an output folder or a run folder works as well
    assert inputs.resume_run(mount, "sartorius", BRANCH, root) == run
    assert inputs.resume_run(run, "sartorius", BRANCH, root) == run
    assert inputs.parse_kernel_ref("me/cellmask-finetune-x/3") == ("me", "cellmask-finetune-x", 3)
    assert inputs.parse_kernel_ref("/kaggle/input/x") is None


def test_a_continuation_without_its_output_says_what_to_attach(tmp_path: Path):
    root = tmp_path / "input"
    _new_layout(root)
    with pytest.raises(inputs.InputNotFound, match="attach it to this kernel as a kernel source") as err:
        inputs.resume_run("me/cellmask-finetune-x/3", "sartorius", BRANCH, root)
    assert "notebooks/me/cellmask-finetune-x" in str(err.value) and "datasets/" in str(err.value)
    mount = root / "notebooks" / "me" / "cellmask-finetune-x"
    _files(mount, "__notebook__.ipynb")  # attached, but its run holds no last.pt
    with pytest.raises(inputs.InputNotFound, match="last.pt"):
        inputs.resume_run("me/cellmask-finetune-x/3", "sartorius", BRANCH, root)


def test_on_kaggle_a_stage_gets_the_rest_of_the_session_as_its_budget():
    import time

    start = session.SESSION_START  # the process's start (a notebook's kernel: the session's)
    assert start <= time.time() and time.time() - start < 24 * 3600
    assert session.session_budget({"train": {}}, kaggle=False) is None
    assert session.session_budget({"train": {"max_hours": 2.0}}, kaggle=True) is None  # the config's
    assert session.session_budget({"train": {"deadline": start + 60}}, kaggle=True) is None
    budget = session.session_budget({"train": {}}, kaggle=True, now=start)
    assert budget["deadline"] == pytest.approx(start + 11.5 * 3600)  # a clock, not a count from now
    assert budget["hours_left"] == pytest.approx(11.5) and budget["reserve_minutes"] == 10.0
    later = session.session_budget({"train": {}}, kaggle=True, now=start + 3600)
    assert later["deadline"] == budget["deadline"] and later["hours_left"] == pytest.approx(10.5)
    assert session.session_budget({"train": {}}, kaggle=True, now=start + 13 * 3600)["hours_left"] == 0.0
