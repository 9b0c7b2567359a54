"""What the Kaggle CLI (2.2.5) prints, fed through `cellmask.kaggle.api` and `python -m cellmask.kaggle`.

The texts are tests/fixtures/kaggle_cli/*.json (README.md there says where in the CLI's source each
comes from). A fake ``kaggle`` executable replays them, exit status included, so the real
:class:`~cellmask.kaggle.api.KaggleRunner` reads them as it reads the CLI. Nothing here needs the
real CLI, credentials or a network.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import copy_checkout, run_make

from cellmask.kaggle import api
from cellmask.kaggle.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kaggle_cli"
KERNEL = "someone/cellmask-inference"
WEIGHTS = "someone/cellmask-weights"

FAKE_KAGGLE = r"""
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
home = Path(os.environ["FAKE_KAGGLE_DIR"])
with open(home / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\n")
plan = json.loads((home / "plan.json").read_text())
key = next((k for k in (" ".join(args[:3]), " ".join(args[:2])) if k in plan), None)
if key is None:
    sys.exit(f"fake kaggle: no case planned for {args}")
state = json.loads((home / "state.json").read_text()) if (home / "state.json").exists() else {}
n = state[key] = state.get(key, 0) + 1
(home / "state.json").write_text(json.dumps(state))
case = plan[key][min(n, len(plan[key])) - 1]
if isinstance(case, str):
    case = json.loads((Path(os.environ["FAKE_KAGGLE_FIXTURES"]) / f"{case}.json").read_text())
sys.stdout.write(case["stdout"])
sys.stderr.write(case["stderr"])
sys.exit(case["exit"])
"""


def fixture(name: str) -> dict:
    """One case of tests/fixtures/kaggle_cli."""
    return json.loads((FIXTURES / f"{name}.json").read_text())


@dataclass
class FakeCli:
    """A ``kaggle`` executable that answers each command with the planned fixture cases."""

    home: Path
    exe: Path

    def plan(self, exact: dict[str, list] | None = None, **cases: list[str | dict]) -> None:
        """Cases per command, keyed ``kernels_push`` (``kernels push``), or by the first three
        words in ``exact`` (``{"datasets status someone/cellmask-weights": [...]}``, tried first).
        Each call takes the next case, the last one repeats; a case is a fixture name or
        ``{"stdout", "stderr", "exit"}``."""
        plan = {key.replace("_", " ", 1): value for key, value in cases.items()} | (exact or {})
        (self.home / "plan.json").write_text(json.dumps(plan))
        (self.home / "state.json").unlink(missing_ok=True)

    def calls(self) -> list[list[str]]:
        log = self.home / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def runner(self, dry_run: bool = False) -> api.KaggleRunner:
        return api.KaggleRunner(dry_run=dry_run, out=io.StringIO(), executable=str(self.exe))


@pytest.fixture
def cli(tmp_path, monkeypatch) -> FakeCli:
    """The fake CLI, also what ``python -m cellmask.kaggle`` finds; credentials in the environment."""
    home = tmp_path / "fake_kaggle"
    home.mkdir()
    exe = home / "kaggle"
    exe.write_text(f"#!{sys.executable}\n{FAKE_KAGGLE}")
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_KAGGLE_DIR", str(home))
    monkeypatch.setenv("FAKE_KAGGLE_FIXTURES", str(FIXTURES))
    monkeypatch.setattr(api.runner, "find_kaggle_cli", lambda: str(exe))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KAGGLE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    return FakeCli(home, exe)


@pytest.fixture
def checkout(tmp_path) -> Path:
    """The parts of the checkout the Kaggle commands read, as before `make wheels` / `make weights`."""
    return copy_checkout(tmp_path, datasets_built=False)


def _fill_datasets(root: Path) -> None:
    """What `make weights` and `make wheels` would have written."""
    (root / "datasets" / "cellmask-weights" / "segmenter").mkdir()
    (root / "datasets" / "cellmask-weights" / "segmenter" / "best.pt").write_bytes(b"w")
    (root / "datasets" / "cellmask-wheels" / "cellmask-0.1.0-py3-none-any.whl").write_bytes(b"w")


# ------------------------------------------------------------------------------ the texts themselves


def test_every_fixture_names_its_command_and_source():
    cases = sorted(FIXTURES.glob("*.json"))
    assert len(cases) > 30
    readme = (FIXTURES / "README.md").read_text()
    assert "2.2.5" in readme and "Apache License 2.0" in readme
    for path in cases:
        if path.name == "accelerators.json":
            continue
        case = json.loads(path.read_text())
        assert set(case) >= {"command", "exit", "stdout", "stderr", "source"}, path.name
        assert case["source"].startswith("kaggle/") and case["exit"] in (0, 1, 2), path.name
        assert case["exit"] != 2 or "argparse" in case["source"], path.name  # 2: a usage error only
        assert "_".join(case["command"][:2]) in path.stem, path.name


def test_the_errors_the_issue_names_come_with_exit_status_0():
    for name in (
        "kernels_push_error",
        "kernels_push_invalid_kernel_sources",
        "datasets_version_error",
        "datasets_create_slug_in_use",
    ):
        assert fixture(name)["exit"] == 0, name


# ------------------------------------------------------------------------------ accelerators


def test_accelerators_are_the_ones_kaggle_2_2_5_documents():
    documented = fixture("accelerators")
    assert list(api.ACCELERATORS) == documented["available"]
    assert set(api.RETIRED_ACCELERATORS) == set(documented["retired"])
    for name, instead in api.RETIRED_ACCELERATORS.items():  # the same replacement the CLI names
        assert instead.split(" (")[0].split(",")[0] in documented["retired"][name]
    assert "NvidiaTeslaT4" in documented["help"] and "TpuV5E8" in documented["help"]


def test_check_accelerator():
    assert api.check_accelerator("nvidiateslat4") == "NvidiaTeslaT4"
    assert api.check_accelerator(" NvidiaH100 ") == "NvidiaH100"
    with pytest.raises(ValueError, match=r"NvidiaTeslaP100 is retired: .*default GPU \(NvidiaTeslaT4\)"):
        api.check_accelerator("NvidiaTeslaP100")
    with pytest.raises(
        ValueError, match=r"unknown accelerator 'T4 x1'; kaggle 2.2.5 documents NvidiaTeslaT4"
    ):
        api.check_accelerator("T4 x1")


# ------------------------------------------------------------------------------ kernels push


@pytest.mark.parametrize(
    ("case", "quoted"),
    [
        ("kernels_push_error", "Kernel push error: Notebook not found"),
        ("kernels_push_error_no_result", "Kernel push error: see previous output"),
        ("kernels_push_invalid_dataset_sources", "not valid dataset sources"),
        ("kernels_push_invalid_competition_sources", "not valid competition sources"),
        ("kernels_push_invalid_kernel_sources", "not valid kernel sources"),
        ("kernels_push_http_403", "access denied (HTTP 403)"),
        ("kernels_push_invalid_folder", "Invalid folder"),
    ],
)
def test_push_kernel_fails_loudly(cli, case, quoted):
    cli.plan(kernels_push=[case])
    with pytest.raises(api.KaggleCommandError, match="kernels push") as err:
        api.push_kernel(cli.runner(), "build/kaggle/kernels/cellmask-inference")
    assert quoted in str(err.value)


def test_push_kernel_names_what_to_do_about_invalid_sources(cli):
    cli.plan(kernels_push=["kernels_push_invalid_dataset_sources"])
    with pytest.raises(api.KaggleCommandError) as err:
        api.push_kernel(cli.runner(), "k")
    assert "['someone/cellmask-weights']" in str(err.value) and "make push-datasets" in str(err.value)


def test_push_kernel_returns_the_version_and_passes_the_accelerator(cli):
    cli.plan(kernels_push=["kernels_push_ok", "kernels_push_invalid_tags"])
    runner = cli.runner()
    assert api.push_kernel(runner, "k", accelerator="nvidial4") == 7
    assert cli.calls() == [["kernels", "push", "-p", "k", "--accelerator", "NvidiaL4"]]
    assert api.push_kernel(runner, "k") == 8  # invalid tags: pushed, with a warning
    assert "warning: The following are not valid tags" in runner.out.getvalue()
    with pytest.raises(ValueError, match="retired"):
        api.push_kernel(runner, "k", accelerator="NvidiaTeslaP100")
    assert len(cli.calls()) == 2


# ------------------------------------------------------------------------------ kernels status


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("kernels_status_queued", "queued"),
        ("kernels_status_running", "running"),
        ("kernels_status_complete", "complete"),
        ("kernels_status_error", "error"),
        ("kernels_status_cancel_acknowledged", "cancel_acknowledged"),
    ],
)
def test_parse_status_of_the_cli(case, status):
    assert api.parse_status(fixture(case)["stdout"]) == status


def test_wait_for_kernel_polls_the_pushed_version(cli):
    cli.plan(kernels_status=["kernels_status_queued", "kernels_status_running", "kernels_status_complete"])
    slept: list[float] = []
    assert api.wait_for_kernel(cli.runner(), KERNEL, poll_s=5, sleep=slept.append, version=7) == "complete"
    assert cli.calls() == [["kernels", "status", f"{KERNEL}/7"]] * 3
    assert slept == [5, 5]
    assert api.kernel_ref(KERNEL) == KERNEL and api.kernel_ref(KERNEL, "VERSION") == f"{KERNEL}/VERSION"


def test_wait_for_kernel_reports_the_failed_version(cli):
    cli.plan(kernels_status=["kernels_status_error"])
    with pytest.raises(api.KaggleCommandError) as err:
        api.wait_for_kernel(cli.runner(), KERNEL, sleep=lambda s: None, version=7)
    assert "ended with status error: Your notebook tried to allocate more memory" in str(err.value)
    assert f"kaggle kernels output {KERNEL}/7" in str(err.value)
    cli.plan(kernels_status=["kernels_status_denied"])
    with pytest.raises(api.KaggleCommandError, match=r"access denied \(HTTP 403\).*Cannot access kernel"):
        api.wait_for_kernel(cli.runner(), KERNEL, sleep=lambda s: None, version=7)


def test_wait_for_kernel_dry_run_prints_the_versioned_status_once():
    runner = api.KaggleRunner(dry_run=True, out=io.StringIO())
    assert api.wait_for_kernel(runner, KERNEL, poll_s=60, version="VERSION_OF_THE_PUSH") == "complete"
    lines = runner.out.getvalue().splitlines()
    assert lines == [
        f"$ kaggle kernels status {KERNEL}/VERSION_OF_THE_PUSH",
        "# (repeated every 60 s until the status is complete)",
    ]


# ------------------------------------------------------------------------------ datasets status


def test_every_status_the_cli_can_print_is_known():
    # kagglesdk 0.1.38 DatabundleVersionStatus, lower case (kaggle 2.2.5 KaggleApi.dataset_status)
    names = "not_yet_persisted blobs_received blobs_decompressed blobs_copied_to_sds individual_blobs_compressed ready failed deleted reprocessing"
    for name in names.split():
        assert api.parse_dataset_status(name) == name
        assert name == api.DATASET_READY or name in api.DATASET_FAILED or name in api.DATASET_PENDING
    assert api.parse_dataset_status(fixture("datasets_status_ready_outdated_cli")["stdout"]) == "ready"
    with pytest.raises(api.KaggleCommandError, match="could not read a dataset status"):
        api.parse_dataset_status("ok")


@pytest.mark.parametrize(
    ("case", "exists"),
    [
        ("datasets_status_ready", True),
        ("datasets_status_blobs_received", True),
        ("datasets_status_failed", True),
        ("datasets_status_ready_outdated_cli", True),
        ("datasets_status_not_found", False),
    ],
)
def test_dataset_exists_from_an_answer(cli, case, exists):
    cli.plan(datasets_status=[case])
    assert api.dataset_exists(cli.runner(), WEIGHTS) is exists


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("datasets_status_unauthorized", "authentication failed"),
        ("datasets_status_forbidden", r"access denied \(HTTP 403\)"),
        ("datasets_status_rate_limited", r"rate limited \(HTTP 429\)"),
        ("datasets_status_server_error", r"a server error \(HTTP 5xx\)"),
        ({"stdout": "ok\n", "stderr": "", "exit": 0}, "could not read a dataset status from: 'ok'"),
        ({"stdout": "", "stderr": "Traceback ...\nKeyError: 'x'\n", "exit": 1}, "exit 1: Traceback"),
    ],
)
def test_dataset_exists_raises_when_it_could_not_ask(cli, case, reason):
    cli.plan(datasets_status=[case])
    with pytest.raises(api.KaggleCommandError, match=f"could not ask Kaggle .* {WEIGHTS}.*{reason}") as err:
        api.dataset_exists(cli.runner(), WEIGHTS)
    assert "nothing was created or uploaded" in str(err.value)


def test_wait_for_dataset_until_ready(cli):
    cli.plan(
        datasets_status=[
            "datasets_status_not_yet_persisted",
            "datasets_status_blobs_received",
            "datasets_status_ready",
        ]
    )
    slept: list[float] = []
    runner = cli.runner()
    assert api.wait_for_dataset(runner, WEIGHTS, poll_s=30, sleep=slept.append) == "ready"
    assert slept == [30, 30] and cli.calls() == [["datasets", "status", WEIGHTS, "--format", "json"]] * 3
    assert f"{WEIGHTS}: its latest version blobs_received (0 min)" in runner.out.getvalue()


def test_wait_for_dataset_until_the_pushed_version_is_live(cli):
    # ready is not enough: Kaggle still serves version 3 while the pushed version 4 is processed
    cli.plan(
        datasets_status=[
            "datasets_status_json_ready_v3",
            "datasets_status_json_blobs_received_v4",
            "datasets_status_json_ready_v4",
        ]
    )
    slept: list[float] = []
    runner = cli.runner()
    assert api.wait_for_dataset(runner, WEIGHTS, poll_s=30, sleep=slept.append, version=4) == "ready"
    assert slept == [30, 30] and len(cli.calls()) == 3
    out = runner.out.getvalue()
    assert f"{WEIGHTS}: version 3 ready" in out and f"{WEIGHTS}: version 4 blobs_received" in out
    # without a version pushed from here: the newest, processed, is live at once
    cli.plan(datasets_status=["datasets_status_json_ready_v3"])
    assert api.wait_for_dataset(cli.runner(), WEIGHTS, poll_s=30, sleep=slept.append) == "ready"
    # a bounded wait, with what Kaggle serves and what was pushed in its message
    cli.plan(datasets_status=["datasets_status_json_ready_v3"])
    with pytest.raises(
        api.KaggleCommandError, match=r"still serves version 3 \(ready\) after 1 min, not version 4"
    ):
        api.wait_for_dataset(cli.runner(), WEIGHTS, poll_s=30, timeout_s=60, sleep=lambda s: None, version=4)


def test_dataset_version_status_from_an_older_cli(cli):
    # kaggle < 2.2.5 has no --format: its plain status is asked, the version number is unknown
    cli.plan(datasets_status=["datasets_status_json_unsupported", "datasets_status_ready"])
    assert api.dataset_version_status(cli.runner(), WEIGHTS) == ("ready", None)
    assert cli.calls() == [
        ["datasets", "status", WEIGHTS, "--format", "json"],
        ["datasets", "status", WEIGHTS],
    ]
    assert api.parse_status_json('Warning: outdated\n{"status": "ready", "current_version_number": 7}') == (
        "ready",
        7,
    )


@pytest.mark.parametrize(
    ("cases", "message"),
    [
        (["datasets_status_blobs_received", "datasets_status_failed"], "latest version is failed"),
        (["datasets_status_deleted"], "latest version is deleted"),
        (["datasets_status_not_found"], "does not exist on Kaggle; run `make push-datasets` first"),
        (["datasets_status_rate_limited"], "could not ask Kaggle"),
        (
            ["datasets_status_blobs_received"],
            r"still serves its latest version \(blobs_received\) after 1 min",
        ),
    ],
)
def test_wait_for_dataset_stops(cli, cases, message):
    cli.plan(datasets_status=cases)
    slept: list[float] = []
    with pytest.raises(api.KaggleCommandError, match=message):
        api.wait_for_dataset(cli.runner(), WEIGHTS, poll_s=30, timeout_s=60, sleep=slept.append)
    assert sum(slept) <= 60


def test_wait_for_dataset_dry_run():
    runner = api.KaggleRunner(dry_run=True, out=io.StringIO())
    api.wait_for_datasets(runner, [WEIGHTS], poll_s=30)
    assert runner.out.getvalue().splitlines() == [
        f"$ kaggle datasets status {WEIGHTS} --format json",
        "# (repeated every 30 s until the newest version is ready)",
    ]
    runner = api.KaggleRunner(dry_run=True, out=io.StringIO())
    api.wait_for_datasets(runner, [WEIGHTS], poll_s=30, versions={WEIGHTS: 5})
    assert (
        "# (repeated every 30 s until the current version is 5 or newer and ready)" in runner.out.getvalue()
    )


# ------------------------------------------------------------------------------ datasets version / create


@pytest.mark.parametrize(
    ("status", "upload", "quoted"),
    [
        (
            "datasets_status_ready",
            "datasets_version_error",
            "Dataset version creation error: Dataset not found",
        ),
        (
            "datasets_status_ready",
            "datasets_version_error_no_result",
            "Dataset version creation error: See previous output",
        ),
        ("datasets_status_ready", "datasets_version_invalid_tags", "not valid tags"),
        ("datasets_status_ready", "datasets_version_upload_failed", "Upload unsuccessful: segmenter.zip"),
        (
            "datasets_status_not_found",
            "datasets_create_slug_in_use",
            'Dataset creation error: The requested slug "cellmask-wheels"',
        ),
    ],
)
def test_push_dataset_fails_loudly(cli, status, upload, quoted):
    cli.plan(datasets_status=[status], datasets_version=[upload], datasets_create=[upload])
    with pytest.raises(api.KaggleCommandError) as err:
        api.push_dataset(cli.runner(), WEIGHTS, "folder", "v2")
    assert quoted in str(err.value)


def test_push_dataset_versions_or_creates(cli):
    cli.plan(datasets_status=["datasets_status_ready"], datasets_version=["datasets_version_ok"])
    api.push_dataset(cli.runner(), WEIGHTS, "folder", "v2")
    cli.plan(datasets_status=["datasets_status_not_found"], datasets_create=["datasets_create_ok"])
    runner = cli.runner()
    api.push_dataset(runner, WEIGHTS, "folder", "v2")
    assert [c[1] for c in cli.calls()] == ["status", "version", "status", "create"]
    assert "warning" not in runner.out.getvalue()


def test_push_dataset_never_creates_when_it_could_not_ask(cli):
    for case in (
        "datasets_status_unauthorized",
        "datasets_status_rate_limited",
        "datasets_status_server_error",
    ):
        cli.plan(datasets_status=[case], datasets_create=["datasets_create_ok"])
        with pytest.raises(api.KaggleCommandError, match="could not ask"):
            api.push_dataset(cli.runner(), WEIGHTS, "folder", "v2")
    assert {c[1] for c in cli.calls()} == {"status"}


# ------------------------------------------------------------------------------ competitions submit


def test_submit_kernel_reads_the_answer(cli):
    cli.plan(competitions_submit=["competitions_submit_ok"])
    api.submit_kernel(cli.runner(), KERNEL, 7, "v1")
    for case in ("competitions_submit_not_found", "competitions_submit_upload_failed"):
        cli.plan(competitions_submit=[case])
        with pytest.raises(api.KaggleCommandError, match="Could not"):
            api.submit_kernel(cli.runner(), KERNEL, 7, "v1")
    old_cli = {**fixture("competitions_submit_upload_failed"), "exit": 0}  # before 2.2.5: exit 0
    cli.plan(competitions_submit=[old_cli])
    with pytest.raises(api.KaggleCommandError, match="reported an error .*Could not submit to competition"):
        api.submit_kernel(cli.runner(), KERNEL, 7, "v1")


# ------------------------------------------------------------------------------ the commands


def test_submit_waits_for_the_datasets_then_polls_the_pushed_version(checkout, cli):
    cli.plan(
        {f"datasets status {WEIGHTS}": ["datasets_status_blobs_received", "datasets_status_ready"]},
        datasets_status=["datasets_status_ready"],
        kernels_push=["kernels_push_ok"],
        kernels_status=["kernels_status_queued", "kernels_status_running", "kernels_status_complete"],
        competitions_submit=["competitions_submit_ok"],
    )
    args = [
        "--root",
        str(checkout),
        "submit",
        "--poll",
        "0",
        "--accelerator",
        "NvidiaTeslaT4",
        "--message",
        "m",
    ]
    assert main(args) == 0
    folder = str(checkout / "build" / "kaggle" / "kernels" / "cellmask-inference")
    assert cli.calls() == [
        ["datasets", "status", WEIGHTS, "--format", "json"],
        ["datasets", "status", WEIGHTS, "--format", "json"],  # blobs_received, then ready
        ["datasets", "status", "someone/cellmask-wheels", "--format", "json"],
        ["datasets", "status", "someone/cellmask-code", "--format", "json"],
        ["kernels", "push", "-p", folder, "--accelerator", "NvidiaTeslaT4"],
        *[["kernels", "status", f"{KERNEL}/7"]] * 3,
        [
            "competitions",
            "submit",
            api.COMPETITION,
            "-f",
            "submission.csv",
            "-k",
            KERNEL,
            "-v",
            "7",
            "-m",
            "m",
        ],
    ]


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (
            {"datasets_status": ["datasets_status_not_found"]},
            "someone/cellmask-weights does not exist on Kaggle",
        ),
        ({"datasets_status": ["datasets_status_failed"]}, "latest version is failed"),
        (
            {
                "datasets_status": ["datasets_status_ready"],
                "kernels_push": ["kernels_push_invalid_dataset_sources"],
            },
            "not valid dataset sources",
        ),
        (
            {"datasets_status": ["datasets_status_ready"], "kernels_push": ["kernels_push_error"]},
            "Kernel push error",
        ),
    ],
)
def test_push_stops_before_or_at_the_push(checkout, cli, capsys, plan, message):
    cli.plan(**plan)
    assert main(["--root", str(checkout), "push", "--poll", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cellmask kaggle push: error:") and message in err and err.count("\n") == 0


def test_accelerator_on_push_and_push_train(checkout, cli, capsys):
    cli.plan(kernels_push=["kernels_push_ok"], datasets_status=["datasets_status_json_ready_v3"])
    assert (
        main(
            [
                "--root",
                str(checkout),
                "push-train",
                "02_finetune_faster_rcnn_swin_t",
                "--accelerator",
                "tpuv5e8",
            ]
        )
        == 0
    )
    assert cli.calls() == [  # push-train waits for the datasets it attaches too
        ["datasets", "status", "someone/cellmask-wheels", "--format", "json"],
        ["datasets", "status", "someone/cellmask-code", "--format", "json"],
        ["kernels", "push", "-p", str(checkout / "build" / "kaggle" / "kernels" / "cellmask-finetune-faster-rcnn-swin-t"),
         "--accelerator", "TpuV5E8"],
    ]  # fmt: skip
    assert main(["--root", str(checkout), "push", "--accelerator", "GPU P100"]) == 2
    assert "unknown accelerator 'GPU P100'" in capsys.readouterr().err
    assert main(["--root", str(checkout), "submit", "--accelerator", "NvidiaTeslaP100"]) == 2
    assert "retired" in capsys.readouterr().err
    assert len(cli.calls()) == 3


def test_push_datasets_stops_before_uploading_when_it_could_not_ask(checkout, cli, capsys):
    _fill_datasets(checkout)
    cli.plan(datasets_status=["datasets_status_server_error"], datasets_create=["datasets_create_ok"])
    assert main(["--root", str(checkout), "push-datasets"]) == 2
    assert "could not ask Kaggle" in capsys.readouterr().err
    assert cli.calls() == [["datasets", "status", WEIGHTS, "--format", "json"]]


def test_push_datasets_real_run_uploads_nothing_while_a_folder_is_empty(checkout, cli, capsys):
    cli.plan(datasets_status=["datasets_status_ready"], datasets_version=["datasets_version_ok"])
    assert main(["--root", str(checkout), "push-datasets"]) == 2
    err = capsys.readouterr().err
    assert (
        "run `make weights` first" in err
        and "run `make wheels` first" in err
        and "nothing was uploaded" in err
    )
    assert cli.calls() == []


# ------------------------------------------------------------------------------ DRY_RUN through make


def _make(checkout: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run_make(checkout, tmp_path, *args, **env)


def _commands(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("$ ")]


def test_make_submit_dry_run_shows_the_waits_and_the_polled_version(checkout, tmp_path):
    proc = _make(
        checkout, tmp_path, "submit", "DRY_RUN=1", "ACCELERATOR=NvidiaTeslaT4", KAGGLE_USERNAME="someone"
    )
    assert proc.returncode == 0, proc.stderr
    commands = _commands(proc)
    assert commands[:5] == [
        "$ kaggle datasets status someone/cellmask-weights --format json",
        "$ kaggle datasets status someone/cellmask-wheels --format json",
        "$ kaggle datasets status someone/cellmask-code --format json",
        "$ kaggle kernels push -p build/kaggle/kernels/cellmask-inference --accelerator NvidiaTeslaT4",
        "$ kaggle kernels status someone/cellmask-inference/VERSION_OF_THE_PUSH",
    ]
    assert commands[5].startswith(
        "$ kaggle competitions submit sartorius-cell-instance-segmentation -f submission.csv "
        "-k someone/cellmask-inference -v VERSION_OF_THE_PUSH -m "
    )
    assert len(commands) == 6
    assert "# (repeated every 60 s until the newest version is ready)" in proc.stdout
    assert "# VERSION_OF_THE_PUSH: the number `kaggle kernels push` prints" in proc.stdout

    proc = _make(checkout, tmp_path, "push", "DRY_RUN=1", "ACCELERATOR=T4", KAGGLE_USERNAME="someone")
    assert proc.returncode != 0 and "unknown accelerator 'T4'" in proc.stderr
    proc = _make(
        checkout, tmp_path, "push-train", "NB=02_finetune_faster_rcnn_swin_t", "DRY_RUN=1", "ACCELERATOR=NvidiaL4",
        KAGGLE_USERNAME="someone",
    )  # fmt: skip
    assert _commands(proc) == [
        "$ kaggle datasets status someone/cellmask-wheels --format json",
        "$ kaggle datasets status someone/cellmask-code --format json",
        "$ kaggle kernels push -p build/kaggle/kernels/cellmask-finetune-faster-rcnn-swin-t --accelerator NvidiaL4",
    ]


def test_make_push_datasets_dry_run_previews_every_dataset_before_make_weights(checkout, tmp_path):
    assert not (checkout / "datasets" / "cellmask-weights" / "segmenter").exists()
    proc = _make(checkout, tmp_path, "push-datasets", "DRY_RUN=1", "MSG=v2", KAGGLE_USERNAME="someone")
    assert proc.returncode == 0, proc.stderr
    commands = _commands(proc)
    for name in ("cellmask-weights", "cellmask-wheels", "cellmask-code"):
        assert f"$ kaggle datasets status someone/{name} --format json" in commands
        assert f"$ kaggle datasets version -p build/kaggle/datasets/{name} -r zip -m v2" in commands
    assert len(commands) == 6
    assert (
        "# datasets/cellmask-weights: nothing to upload yet; run `make weights` first; a real run stops here"
        in proc.stdout
    )
    assert "run `make wheels` first" in proc.stdout and "make code-dataset" not in proc.stdout
