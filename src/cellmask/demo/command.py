"""``cellmask demo``'s arguments and handler: the demo (:func:`cellmask.demo.core.run_demo`), or
with ``--ablation`` its experiments (:mod:`cellmask.demo.experiments`)."""

from __future__ import annotations

import argparse
import sys

from cellmask.config import PROFILES, add_override_argument
from cellmask.demo.core import run_demo
from cellmask.demo.plan import BRANCHES


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The ``cellmask demo`` arguments."""
    p.add_argument(
        "--out",
        default=None,
        help="run directory: models, figures, scores (default runs/demo, runs/demo_livecell with --livecell)",
    )
    p.add_argument(
        "--data",
        default="data/demo",
        help="a Kaggle-layout root with train.csv + train/ (the real competition data: read as it is, "
        "profile cpu), or where the synthetic dataset is written (default data/demo)",
    )
    p.add_argument(
        "--livecell",
        action="store_true",
        help="the paper's two stages: pretrain every model but Soft Teacher on synthetic LIVECell "
        "images first, then fine-tune (about 1.5x the time)",
    )
    p.add_argument(
        "--profile",
        choices=PROFILES,
        default=None,
        help="config profile (default cpu for a competition root, demo for synthetic data)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny dataset, one epoch per model: checks the plumbing, not the score",
    )
    p.add_argument(
        "--branches",
        nargs="+",
        choices=BRANCHES,
        default=list(BRANCHES),
        metavar="NAME",
        help=f"detector branches to train and ensemble (default all: {', '.join(BRANCHES)})",
    )
    p.add_argument(
        "--submission",
        default="submissions/submission.csv",
        help="submission of the synthetic test images (default submissions/submission.csv)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="trainings at a time, each with cpu_count/N threads (default 2 with two or more cores)",
    )
    p.add_argument(
        "--no-synth",
        action="store_true",
        help="use the dataset already at --data (any Kaggle-layout root), even one cellmask synth wrote",
    )
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train and score the Cascade Mask R-CNN baseline too (default: on a competition root)",
    )
    p.add_argument(
        "--classifier",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the image-type classifier and let it pick each image's thresholds (default: on a "
        "competition root; not in the paper)",
    )
    add_override_argument(
        p, "override a config value of every run (repeatable), e.g. --set train.max_hours=0.2"
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="FILE",
        help="write the markdown report (make demo-real: benchmarks/REAL.md; figures in its folder's real/)",
    )
    train = p.add_mutually_exclusive_group()
    train.add_argument(
        "--skip-train", action="store_true", help="reuse the checkpoints already in --out (inference only)"
    )
    train.add_argument(
        "--reuse",
        action="store_true",
        help="train only the runs whose saved config differs from today's (or are missing)",
    )
    p.add_argument(
        "--real",
        default=None,
        metavar="DIR",
        help="real annotated images (train.csv + train/); default the test fixtures",
    )
    p.add_argument(
        "--predict-config", default=None, metavar="YAML", help="predict options (default the paper's)"
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="make ablation: add the Cascade Mask R-CNN baseline and LIVECell pretraining, write --ablation-md",
    )
    p.add_argument(
        "--ablation-md",
        default=None,
        metavar="FILE",
        help="the ablation's report (default benchmarks/ABLATION.md, figures in its folder's ablation/; "
        "with a competition root benchmarks/REAL_LEVERS.md)",
    )
    p.add_argument(
        "--from-runs",
        default="runs/demo_real",
        metavar="DIR",
        help="--ablation with a competition root: the make demo-real run the levers compare with "
        "(default runs/demo_real)",
    )


def _real_root(args: argparse.Namespace) -> bool:
    """``--data`` is a competition root (not a folder ``cellmask synth`` writes)."""
    from cellmask.demo.source import resolve_source

    return not resolve_source(args.data, False if args.no_synth else None).synthetic


def _command_line(fallback: str) -> str:
    """The ``cellmask demo ...`` command line this process runs (for the reports), or ``fallback``
    when it was not started that way."""
    return " ".join(["cellmask", *sys.argv[1:]]) if sys.argv[1:2] == ["demo"] else fallback


def cli_demo(args: argparse.Namespace) -> int:
    """Handler of ``cellmask demo``; returns 0, or 1 when the test submission is invalid."""
    root = _real_root(args)
    if args.out is None:
        args.out = (
            ("runs/levers_real" if root else "runs/demo")
            if args.ablation
            else "runs/demo_livecell"
            if args.livecell
            else "runs/demo_real"
            if root
            else "runs/demo"
        )
    if args.ablation and args.livecell:
        raise SystemExit("cellmask demo: --ablation trains its own LIVECell rows; drop --livecell")
    if args.ablation and root:
        from cellmask.demo.experiments.levers import run_levers

        run_levers(
            data=args.data,
            demo_runs=args.from_runs,
            out=args.out,
            md=args.ablation_md or "benchmarks/REAL_LEVERS.md",
            profile=args.profile or "cpu",
            device=args.device,
            workers=args.workers,
            quick=args.quick,
            command=_command_line("make ablation-real"),
        )
        return 0
    if args.ablation:
        from cellmask.demo.experiments.ablation import run_ablation

        run_ablation(
            out=args.out,
            data=args.data,
            profile=args.profile or "demo",
            md=args.ablation_md or "benchmarks/ABLATION.md",
            device=args.device,
            workers=args.workers,
            reuse=True,
            real=args.real,
            quick=args.quick,
            command="cellmask demo --ablation"
            + (f" --profile {args.profile}" if args.profile not in (None, "demo") else ""),
        )
        return 0
    summary = run_demo(
        out=args.out,
        data=args.data,
        profile=args.profile,
        quick=args.quick,
        branches=args.branches,
        submission=args.submission,
        device=args.device,
        synth=False if args.no_synth else None,
        train=not args.skip_train,
        workers=args.workers,
        reuse=args.reuse,
        real=args.real,
        predict_config=args.predict_config,
        livecell=args.livecell,
        baseline=args.baseline,
        classifier=args.classifier,
        report=args.report,
        overrides=args.overrides,
        command=_command_line("cellmask demo"),
    )
    return 0 if summary["submission_ok"] else 1
