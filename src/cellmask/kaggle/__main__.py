"""``python -m cellmask.kaggle COMMAND``: the work behind the Makefile's Kaggle targets.

::

    make notebooks-clean      notebooks-clean notebooks/*.ipynb
    make wheels               wheels            (pip download what Kaggle's image lacks + our wheel)
    make weights              weights [--runs RUN ...] [--segmenter RUN] [--predict-config FILE]
    make code-dataset         code-dataset
    make push-datasets        push-datasets [--message MSG]
    make push                 push              (the offline inference kernel)
    make push-train NB=..     push-train NB [--branch CONFIG] [--epochs N] [--resume-from OWNER/SLUG/N]
                              [--overrides KEY=VALUE ...] [--accelerator NAME]
    make pull-runs            pull-runs         (the training kernels' outputs into runs/)
    make pull-evaluation      pull-evaluation   (08's output: the ablation and tuned.predict.yaml)
    make submit               submit [--message MSG] [--version N]
    make data                 download-data [--dir data/sartorius] [--force]
                              (the competition zip, unpacked into a Kaggle-layout --data root)

``--dry-run`` (``DRY_RUN=1``) prints each ``kaggle`` command with its real arguments instead of
running it; it needs the user name (``KAGGLE_USERNAME`` or ``kaggle.json``) but neither the CLI
nor a key (``download-data`` not even the user name). Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cellmask.demo.plan import BRANCHES
from cellmask.errors import DataError
from cellmask.kaggle import api, data, packaging, pushed, weights, wheels
from cellmask.kaggle.api import KaggleCommandError, KaggleRunner, KaggleSetupError
from cellmask.kaggle.stamp import build_stamp


def default_message(root: Path) -> str:
    """``cellmask <git describe>`` of the checkout (``cellmask <version>`` outside git)."""
    proc = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    if proc.returncode == 0 and proc.stdout.strip():
        return f"cellmask {proc.stdout.strip()}"
    from cellmask import __version__

    return f"cellmask {__version__}"


RUN_FILES = r"(^|/)(best\.pt|config\.yaml|metrics\.csv|status\.json)$"
"""What ``make pull-runs`` downloads of each run (``kaggle kernels output --file-pattern``): the
weights, the resolved config, the curves and whether it finished; not ``last.pt`` (optimizer
state) nor the epoch checkpoints, about a tenth of the bytes."""


def _user(args: argparse.Namespace) -> str:
    user = api.kaggle_username()
    if not args.dry_run:
        api.check_kaggle_setup()
    return user


def cmd_notebooks_clean(args: argparse.Namespace, runner: KaggleRunner) -> int:
    from cellmask.kaggle.notebooks import notebook_problems, strip_file

    files = [Path(f) for f in args.files] or sorted((args.root / packaging.NOTEBOOK_DIR).glob("*.ipynb"))
    if args.check:
        problems = [p for f in files for p in notebook_problems(f)]
        print("\n".join(problems) or f"{len(files)} notebooks clean")
        return 1 if problems else 0
    changed = [f for f in files if strip_file(f)]
    print(f"cleaned {len(changed)} of {len(files)} notebooks" + "".join(f"\n  {f}" for f in changed))
    return 0


def cmd_wheels(args: argparse.Namespace, runner: KaggleRunner) -> int:
    out = Path(args.out or args.root / packaging.DATASETS_DIR / packaging.WHEELS)
    base = wheels.read_base_image(args.root / packaging.BASE_IMAGE)
    requirements = wheels.pinned(wheels.missing_distributions(base))
    print(f"Kaggle's image is assumed to have: {', '.join(sorted(base['provided']))}")
    print(
        f"downloading for Python {base['python']}: {', '.join(requirements) or 'nothing'}; building cellmask"
    )
    from cellmask.kaggle.stamp import stage_wheel_source

    stamp = build_stamp(args.root)
    source = args.root / packaging.BUILD_DIR / "wheel-src"
    commands = wheels.wheel_commands(out, base, requirements, source=source)
    print(f"cellmask {stamp.version}: built from a copy of the working tree ({source})")
    if args.dry_run:
        import shlex

        print("\n".join("$ " + shlex.join(c) for c in commands))
        return 0
    stage_wheel_source(args.root, stamp, source)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):  # two versions of one package would both install
        old.unlink()
    for command in commands:
        subprocess.run(command, check=True)
    print(f"{out}: {', '.join(sorted(p.name for p in out.glob('*.whl')))}")
    return 0


def cmd_weights(args: argparse.Namespace, runner: KaggleRunner) -> int:
    branches, segmenter = list(args.runs or []), args.segmenter
    if not branches or segmenter is None:
        found, found_seg = weights.discover_runs(args.runs_from)
        branches = branches or found
        segmenter = segmenter or found_seg
    if segmenter is None:
        raise DataError(f"no segmenter run under {args.runs_from}; give one with --segmenter (SEGMENTER=...)")
    out = Path(args.out or args.root / packaging.DATASETS_DIR / packaging.WEIGHTS)
    manifest = weights.collect_weights(
        branches, segmenter, args.predict_config, out, accept_unfinished=args.accept_unfinished
    )
    for name, entry in manifest["branches"].items():
        status = (entry.get("status") or {}).get("describe", "status unknown")
        print(
            f"branch    {name}: {entry['type']} from {entry['source']} (weight {entry['ensemble_weight']}; {status})"
        )
    seg_status = (manifest["segmenter"].get("status") or {}).get("describe", "status unknown")
    print(f"segmenter from {manifest['segmenter']['source']} ({seg_status})")
    print(f"predict config: {manifest['predict_config'] or 'none (the paper defaults)'}")
    print(f"-> {out}")
    return 0


def cmd_code_dataset(args: argparse.Namespace, runner: KaggleRunner) -> int:
    out = packaging.build_code_dataset(args.root)
    print(f"-> {out}")
    return 0


def cmd_push_datasets(args: argparse.Namespace, runner: KaggleRunner) -> int:
    """Version (or create) each dataset. A real run uploads nothing while a dataset folder is
    empty; a dry run previews every dataset's commands anyway, with a note saying what fills it."""
    user = _user(args)
    message = args.message or default_message(args.root)
    stamp = build_stamp(args.root)
    packaging.build_code_dataset(args.root, stamp=stamp)
    names = args.only or packaging.DATASET_NAMES
    _check_code_pair(args, runner, user, names, stamp.version)
    wheels_dir = args.root / packaging.DATASETS_DIR / packaging.WHEELS
    if packaging.WHEELS in names and any(wheels_dir.glob("*.whl")):  # the code pushed is the code run
        built = wheels.build_own_wheel(args.root, wheels_dir, stamp)
        runner.note(f"rebuilt {built.name} from the working tree")
    runner.note(f"cellmask {stamp.version}: the wheel and the code dataset carry this version")
    folders: dict[str, Path] = {}
    empty: dict[str, str] = {}
    for name in names:  # every folder first: a real run uploads nothing while one is empty
        try:
            folders[name] = packaging.stage_dataset(name, user, args.root)
        except DataError as exc:
            empty[name] = str(exc)
    if empty and not runner.dry_run:
        raise DataError("; ".join(empty.values()) + " (nothing was uploaded)")
    for name in names:
        if name in empty:  # dry run: what a run would do once the folder is filled
            runner.note(f"{empty[name]}; a real run stops here, once it is filled it runs:")
        folder = folders.get(name, args.root / packaging.BUILD_DIR / "datasets" / name)
        dataset_id = packaging.dataset_metadata(name, user, args.root)["id"]
        version = api.push_dataset(runner, dataset_id, folder, message)
        if not runner.dry_run:
            carries = stamp.version if name in (packaging.WHEELS, packaging.CODE) else None
            pushed.record_pushed(args.root, dataset_id, version, carries)
            runner.note(f"{dataset_id}: version {version or '(number not reported)'} is being created")
    runner.note(
        "make push / push-train / submit wait until Kaggle serves these versions "
        "(kaggle datasets status --format json: ready, current_version_number)"
    )
    return 0


def _check_code_pair(
    args: argparse.Namespace, runner: KaggleRunner, user: str, names: Sequence[str], version: str
) -> None:
    """Pushing one of the wheels and code datasets without the other leaves a kernel with a wheel
    and configs from different checkouts (the kernels then stop): refuse, unless the other one
    on Kaggle already carries this version."""
    pair = (packaging.WHEELS, packaging.CODE)
    if all(n in names for n in pair) or not any(n in names for n in pair):
        return
    other = next(n for n in pair if n not in names)
    other_id = packaging.dataset_metadata(other, user, args.root)["id"]
    carried = (pushed.read_pushed(args.root).get(other_id) or {}).get("stamp")
    if carried == version:
        return
    problem = (
        f"{other_id} on Kaggle carries cellmask {carried or '(unknown: not pushed from here)'}, this push "
        f'{version}: a kernel attaching both would stop; push both (ONLY="cellmask-wheels cellmask-code")'
    )
    if runner.dry_run:
        runner.note(f"warning: {problem}")
        return
    raise DataError(problem)


def _push(
    spec: packaging.KernelSpec,
    args: argparse.Namespace,
    runner: KaggleRunner,
    user: str,
    wait_datasets: bool = False,
) -> int | None:
    """Stage and push ``spec`` (``--accelerator`` checked first); with ``wait_datasets``, first
    wait until Kaggle has processed each dataset its staged metadata attaches."""
    accelerator = api.check_accelerator(args.accelerator) if args.accelerator else None
    folder = packaging.stage_kernel(spec, user, args.root)
    where = "internet off" if not spec.enable_internet else "internet on"
    runner.note(
        f"{user}/{spec.slug}: {spec.notebook}.ipynb ({where}, GPU {'on' if spec.enable_gpu else 'off'}"
        + (f", accelerator {accelerator})" if accelerator else ")")
    )
    if wait_datasets:
        sources = packaging.read_json(folder / packaging.KERNEL_METADATA).get("dataset_sources", [])
        record = pushed.read_pushed(args.root)
        carried = {(record.get(s) or {}).get("stamp") for s in sources} - {None}
        now = build_stamp(args.root).version
        if carried and now not in carried:
            runner.note(
                f"warning: the checkout is cellmask {now}, the pushed code is {', '.join(sorted(carried))}: "
                "the kernel runs the pushed code (make push-datasets to push this one)"
            )
        versions = pushed.expected_versions(record, list(sources))
        api.wait_for_datasets(
            runner, sources, poll_s=args.poll, timeout_s=args.wait_hours * 3600, versions=versions
        )
    return api.push_kernel(runner, folder, accelerator)


def cmd_push(args: argparse.Namespace, runner: KaggleRunner) -> int:
    """Push the inference kernel once the datasets it attaches are ready on Kaggle."""
    spec = packaging.kernel_spec(packaging.INFERENCE_NOTEBOOK, root=args.root)
    _push(spec, args, runner, _user(args), wait_datasets=True)
    return 0


def cmd_push_train(args: argparse.Namespace, runner: KaggleRunner) -> int:
    """Push a training notebook (01: one branch) with the run's EPOCHS / OVERRIDES / RESUME_FROM;
    a continuation attaches the version it continues (:func:`packaging.with_run_options`)."""
    notebook = Path(args.notebook).stem  # NB=notebooks/02_....ipynb works too
    if notebook == packaging.PRETRAIN_NOTEBOOK and not args.branch:
        raise ValueError(
            f"{notebook} pretrains one branch per kernel: usage: make push-train NB={notebook} "
            f"BRANCH=<one of {', '.join(BRANCHES)}> [EPOCHS=N] [RESUME_FROM=owner/slug/N]"
        )
    spec = packaging.kernel_spec(notebook, args.branch, root=args.root)
    spec = packaging.with_run_options(
        spec, args.epochs, args.resume_from, args.overrides or (), extend=args.extend
    )
    if spec.sources:
        runner.note(f"continues {', '.join(spec.sources)}: attached as a kernel source (pinned version)")
    _push(spec, args, runner, _user(args), wait_datasets=True)
    return 0


def cmd_pull_runs(args: argparse.Namespace, runner: KaggleRunner) -> int:
    user = _user(args)
    out = Path(args.out)
    for notebook in packaging.list_notebooks(args.root):
        spec = packaging.kernel_spec(notebook, root=args.root)
        if packaging.writes_competition_runs(spec):
            runner.run(
                ["kernels", "output", f"{user}/{spec.slug}", "-p", str(out), "--file-pattern", RUN_FILES]
            )
    runner.note(f"then: make weights (reads {out / 'sartorius'})")
    return 0


def cmd_pull_evaluation(args: argparse.Namespace, runner: KaggleRunner) -> int:
    user = _user(args)
    spec = packaging.kernel_spec(packaging.EVALUATE_NOTEBOOK, root=args.root)
    out = Path(args.out)
    runner.run(["kernels", "output", f"{user}/{spec.slug}", "-p", str(out)])
    tuned = out / "evaluate" / "tune" / "tuned.predict.yaml"
    runner.note(f"then: make weights PREDICT_CONFIG={tuned} (and make push-datasets ONLY=cellmask-weights)")
    return 0


def cmd_submit(args: argparse.Namespace, runner: KaggleRunner) -> int:
    """Push 07 once its datasets are ready, wait for that version's run (``USER/SLUG/N``), submit
    it; with ``--version``, submit that version without pushing."""
    user = _user(args)
    spec = packaging.kernel_spec(packaging.INFERENCE_NOTEBOOK, root=args.root)
    kernel_id = f"{user}/{spec.slug}"
    version: int | str | None = args.version
    if version is None:
        version = _push(spec, args, runner, user, wait_datasets=True)
        if version is None and not runner.dry_run:
            raise KaggleCommandError(
                "the push printed no version number, so its run cannot be told from an earlier one; "
                f"when it is complete (kaggle kernels status {kernel_id}), submit it with VERSION=N"
            )
        if runner.dry_run:
            version = "VERSION_OF_THE_PUSH"
            runner.note(f"{version}: the number `kaggle kernels push` prints")
        api.wait_for_kernel(runner, kernel_id, poll_s=args.poll, version=version)
    api.submit_kernel(runner, kernel_id, version, args.message or default_message(args.root))
    return 0


def cmd_download_data(args: argparse.Namespace, runner: KaggleRunner) -> int:
    data.download_data(runner, args.dir, force=args.force)
    return 0


COMMANDS = {
    "notebooks-clean": cmd_notebooks_clean,
    "wheels": cmd_wheels,
    "weights": cmd_weights,
    "code-dataset": cmd_code_dataset,
    "push-datasets": cmd_push_datasets,
    "push": cmd_push,
    "push-train": cmd_push_train,
    "pull-runs": cmd_pull_runs,
    "pull-evaluation": cmd_pull_evaluation,
    "submit": cmd_submit,
    "download-data": cmd_download_data,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cellmask.kaggle", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="print each kaggle command instead of running it")
    p.add_argument("--root", type=Path, default=Path("."), help="the checkout (default: .)")
    p.add_argument(
        "--wait-hours", type=float, default=2.0,
        help="push/push-train/submit: how long to wait for the datasets' pushed versions (default 2)",
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("notebooks-clean", help="strip outputs and metadata from notebooks")
    s.add_argument("files", nargs="*", help="default: notebooks/*.ipynb")
    s.add_argument("--check", action="store_true", help="only list problems (exit 1 if any)")
    s = sub.add_parser("wheels", help="the wheels dataset: what Kaggle's image lacks + cellmask")
    s.add_argument("--out", default=None)
    s = sub.add_parser("weights", help="the weights dataset from run directories")
    s.add_argument(
        "--runs", nargs="*", default=None, help="detector run directories (default: found under --from)"
    )
    s.add_argument("--segmenter", default=None, help="the segmenter run (default: the one under --from)")
    s.add_argument("--predict-config", default=None, help="the tuned predict config (cellmask tune)")
    s.add_argument(
        "--accept-unfinished",
        action="store_true",
        help="pack runs that did not finish (cut, never continued)",
    )
    s.add_argument(
        "--from", dest="runs_from", type=Path, default=Path("runs/sartorius"), help="default runs/sartorius"
    )
    s.add_argument("--out", default=None)
    sub.add_parser("code-dataset", help="the code dataset: configs, sources, notebooks")
    s = sub.add_parser("push-datasets", help="version (or create) the three datasets on Kaggle")
    s.add_argument("--message", default=None)
    s.add_argument("--only", nargs="*", choices=packaging.DATASET_NAMES, default=None)
    acc_help = f"kaggle kernels push --accelerator; kaggle 2.2.5 documents {', '.join(api.ACCELERATORS)}"
    s = sub.add_parser(
        "push", help="push the offline inference kernel (07_inference) once its datasets are ready"
    )
    s.add_argument("--accelerator", default=None, help=acc_help)
    s.add_argument(
        "--poll", type=float, default=30.0, help="seconds between dataset status checks (default 30)"
    )
    s = sub.add_parser("push-train", help="push a training notebook as a kernel, once its datasets are live")
    s.add_argument(
        "--poll", type=float, default=30.0, help="seconds between dataset status checks (default 30)"
    )
    s.add_argument("notebook", help="e.g. 02_finetune_faster_rcnn_swin_t")
    s.add_argument("--branch", default=None, help="01_pretrain_livecell (required there): one branch config")
    s.add_argument("--epochs", type=int, default=None, help="the notebook's EPOCHS (default: the config's)")
    s.add_argument(
        "--resume-from", default=None, metavar="OWNER/SLUG/N",
        help="continue the run of that kernel version (attached pinned; its last.pt resumed)",
    )  # fmt: skip
    s.add_argument(
        "--overrides", nargs="*", default=None, metavar="KEY=VALUE", help="the notebook's OVERRIDES"
    )
    s.add_argument(
        "--extend", action="store_true", help="with --resume-from and --epochs: a longer schedule (EXTEND)"
    )
    s.add_argument("--accelerator", default=None, help=acc_help)
    s = sub.add_parser("pull-runs", help="download the training kernels' outputs (their runs)")
    s.add_argument("--out", default="runs", help="default runs/ (then make weights reads runs/sartorius)")
    s = sub.add_parser("pull-evaluation", help="download 08's output (ablation, tuned.predict.yaml)")
    s.add_argument("--out", default="runs", help="default runs/ (the tuned config: runs/evaluate/tune/)")
    s = sub.add_parser(
        "submit", help="push 07 once its datasets are ready, wait for that run, submit its output"
    )
    s.add_argument("--message", default=None, help="default: cellmask <git describe>")
    s.add_argument("--version", default=None, help="submit this kernel version (no push)")
    s.add_argument("--poll", type=float, default=60.0, help="seconds between status checks (default 60)")
    s.add_argument("--accelerator", default=None, help=acc_help)
    s = sub.add_parser("download-data", help="download and unpack the competition data (make data)")
    s.add_argument(
        "--dir", type=Path, default=data.DEFAULT_DIR, help=f"where to unpack it (default {data.DEFAULT_DIR})"
    )
    s.add_argument("--force", action="store_true", help="download again into a folder that has the data")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runner = KaggleRunner(dry_run=args.dry_run)
    if not args.dry_run:  # dry runs print the plain `kaggle ...` a user would type
        runner.executable = api.runner.find_kaggle_cli() or "kaggle"
    try:
        return COMMANDS[args.command](args, runner)
    except (KaggleSetupError, KaggleCommandError, DataError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"cellmask kaggle {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(
            f"cellmask kaggle {args.command}: error: `{' '.join(map(str, exc.cmd))}` failed", file=sys.stderr
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
