"""The ``cellmask`` command line.

Each sub-command's arguments are declared here; its work is done by a function in the module
that owns it, imported only when that command runs (so ``cellmask score`` never imports torch).
Errors at a boundary (:class:`cellmask.errors.DataError`, missing files) print one line on
stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from cellmask.errors import DataError

# command name -> ("module:function", help, argument builder)
_Builder = Callable[[argparse.ArgumentParser], None]


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output root; receives the Kaggle competition layout")
    p.add_argument("--train", type=int, default=24, help="annotated training images (default 24)")
    p.add_argument("--unlabeled", type=int, default=6, help="train_semi_supervised images (default 6)")
    p.add_argument("--test", type=int, default=3, help="test images (default 3)")
    p.add_argument("--livecell", type=int, default=8, help="LIVECell images over train/val/test (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--size", default="520x704", help="image size HxW (default 520x704)")


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--truth", required=True, help="competition-style train.csv with the truth")
    p.add_argument("--pred", required=True, help="submission.csv (id,predicted) to score")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="submission.csv to check")
    p.add_argument("--images", required=True, help="folder of the test images the submission is for")


def _train_args(p: argparse.ArgumentParser) -> None:
    from cellmask.training.command import add_train_arguments

    add_train_arguments(p)


def _predict_args(p: argparse.ArgumentParser) -> None:
    from cellmask.predict.folder import add_predict_arguments

    add_predict_arguments(p)


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    from cellmask.evaluate.run import add_evaluate_arguments

    add_evaluate_arguments(p)


def _tune_args(p: argparse.ArgumentParser) -> None:
    from cellmask.evaluate.tune import add_tune_arguments

    add_tune_arguments(p)


def _demo_args(p: argparse.ArgumentParser) -> None:
    from cellmask.demo.command import add_demo_arguments

    add_demo_arguments(p)


COMMANDS: dict[str, tuple[str, str, _Builder]] = {
    "synth": (
        "cellmask.data.synthetic:cli_synth",
        "write a synthetic dataset in the exact Kaggle layout",
        _synth_args,
    ),
    "score": (
        "cellmask.metric:cli_score",
        "score a submission against a truth CSV with the competition metric",
        _score_args,
    ),
    "check-submission": (
        "cellmask.submission:cli_check_submission",
        "validate a submission.csv before uploading it",
        _check_args,
    ),
    "train": (
        "cellmask.training.command:cli_train",
        "train a model (LIVECell pretraining or competition fine-tuning)",
        _train_args,
    ),
    "predict": (
        "cellmask.predict.folder:cli_predict",
        "the ensemble on a folder of images: submission.csv (checked) + its resolved config",
        _predict_args,
    ),
    "evaluate": (
        "cellmask.evaluate.run:cli_evaluate",
        "score the ensemble on the validation split (per class, per IoU threshold; --ablation)",
        _evaluate_args,
    ),
    "tune": (
        "cellmask.evaluate.tune:cli_tune",
        "grid-search the per-class score thresholds and the mask threshold on the validation split",
        _tune_args,
    ),
    "demo": (
        "cellmask.demo.command:cli_demo",
        "the whole pipeline on synthetic data on a CPU: train, predict, score, submission",
        _demo_args,
    ),
}


# Commands that use no BLAS: their process start is part of what users wait for (scoring a
# submission), and OpenBLAS spends tens of milliseconds starting threads when numpy loads.
_NO_BLAS_COMMANDS = ("score", "check-submission")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of :data:`COMMANDS`.

    Args:
        command: when given, only that sub-command's arguments are declared (the others are
            listed by name), so running one command imports nothing another needs.
    """
    parser = argparse.ArgumentParser(prog="cellmask", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (target, help_text, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            add_arguments(p)
        p.set_defaults(_target=target)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    if args.command in _NO_BLAS_COMMANDS:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if not logging.getLogger().handlers:  # progress lines of train/demo; a caller's own config wins
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    module_name, func_name = args._target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(args) or 0)
    except (DataError, FileNotFoundError) as exc:
        print(f"cellmask {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
