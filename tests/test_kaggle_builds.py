"""The code you pushed is the code that runs: every push rebuilds cellmask's wheel from the working
tree with a version that carries the commit (and a dirty flag and digest); the code dataset
carries the same stamp; a kernel prints it and stops when the two differ."""

from __future__ import annotations

import json
import zipfile

import pytest
from conftest import copy_checkout, run_make

import cellmask
from cellmask.kaggle import session
from cellmask.kaggle.stamp import BuildStamp, build_stamp, read_stamp, set_version, source_digest

MARKER = "# marker: pushed-code-is-run-code\n"


def test_the_stamp_carries_the_commit_a_dirty_flag_and_a_digest(tmp_path):
    clean = BuildStamp("0.1.0", "abc1234", False, "0123456789")
    assert clean.version == "0.1.0+gabc1234"
    assert BuildStamp("0.1.0", "abc1234", True, "0123456789").version == "0.1.0+gabc1234.dirty.0123456789"
    root = copy_checkout(tmp_path)  # no .git: never clean
    stamp = build_stamp(root)
    assert stamp.commit == "nogit" and stamp.dirty and stamp.base == "0.1.0"
    before = source_digest(root)
    (root / "configs" / "base.yaml").write_text((root / "configs" / "base.yaml").read_text() + MARKER)
    assert source_digest(root) != before  # two dirty builds are told apart
    (root / "README.md").write_text("docs change nothing the wheel does\n")
    assert source_digest(root) == build_stamp(root).digest
    init = tmp_path / "__init__.py"
    init.write_text('"""x"""\n\n__version__ = "0.1.0"\n')
    set_version(init, stamp.version)
    assert f'__version__ = "{stamp.version}"' in init.read_text()


@pytest.mark.slow
def test_push_datasets_stages_a_wheel_built_from_the_working_tree(tmp_path):
    """The issue's check: a marker line appended to a source file is in the staged wheel, whose
    version is the code dataset's; the stale cellmask wheel is gone, the dependencies stay."""
    root = copy_checkout(tmp_path, datasets_built=False)
    wheels = root / "datasets" / "cellmask-wheels"
    (wheels / "cellmask-0.1.0-py3-none-any.whl").write_bytes(b"stale")  # what an older push left
    (wheels / "timm-1.0.9-py3-none-any.whl").write_bytes(b"a dependency")
    config_py = root / "src" / "cellmask" / "config.py"
    config_py.write_text(config_py.read_text() + MARKER)
    proc = run_make(
        root,
        tmp_path,
        "push-datasets",
        "DRY_RUN=1",
        "ONLY=cellmask-wheels cellmask-code",
        KAGGLE_USERNAME="someone",
    )
    assert proc.returncode == 0, proc.stderr
    staged = root / "build" / "kaggle" / "datasets"
    stamp = read_stamp(staged / "cellmask-code")
    built = sorted((staged / "cellmask-wheels").glob("cellmask-*.whl"))
    assert [w.name for w in built] == [f"cellmask-{stamp['version']}-py3-none-any.whl"]
    assert (staged / "cellmask-wheels" / "timm-1.0.9-py3-none-any.whl").is_file()
    with zipfile.ZipFile(built[0]) as whl:
        assert MARKER in whl.read("cellmask/config.py").decode()
        assert f'__version__ = "{stamp["version"]}"' in whl.read("cellmask/__init__.py").decode()
    code_init = (staged / "cellmask-code" / "src" / "cellmask" / "__init__.py").read_text()
    assert f'__version__ = "{stamp["version"]}"' in code_init
    assert f"cellmask {stamp['version']}: the wheel and the code dataset carry this version" in proc.stdout
    assert (
        '__version__ = "0.1.0"' in (root / "src" / "cellmask" / "__init__.py").read_text()
    )  # checkout untouched


def _code_dataset(input_root, version: str):
    code = input_root / "datasets" / "someone" / "cellmask-code"
    (code / "configs").mkdir(parents=True)
    (code / "src" / "cellmask").mkdir(parents=True)
    (code / "cellmask-build.json").write_text(json.dumps({"version": version}))
    return code


def test_a_kernel_stops_when_its_wheel_and_code_dataset_differ(tmp_path, capsys):
    other = tmp_path / "other"
    _code_dataset(other, "0.1.0+gdeadbee")
    with pytest.raises(
        RuntimeError, match=r"installed here is .* but the cellmask-code dataset .* is 0\.1\.0\+gdeadbee"
    ):
        session.check_code_version(other)
    same = tmp_path / "same"
    _code_dataset(same, cellmask.__version__)
    assert session.check_code_version(same).startswith(f"cellmask {cellmask.__version__}; code dataset")
    assert (
        session.check_code_version(tmp_path / "no_inputs") == f"cellmask {cellmask.__version__}"
    )  # a checkout
    assert f"cellmask {cellmask.__version__}" in capsys.readouterr().out
