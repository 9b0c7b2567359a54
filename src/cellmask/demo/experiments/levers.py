"""``make ablation-real`` (``cellmask demo --ablation --data DIR``): the levers of the real track,
each measured on the real held-out images of a finished ``make demo-real`` run.

One lever, one variant run beside the run it is compared with, at the ``cpu`` profile's budget
(same steps, same split, same segmenter). The variants (:func:`lever_stages`) are of branch 2,
Cascade R-CNN ResNeXt-101, unless said:

- **LIVECell pretraining**: branch 2 first trained on synthetic LIVECell images (the real
  LIVECell annotations are not here), then fine-tuned on the real images from those weights.
  Compared with branch 2 from scratch; the pretraining's steps come on top of the budget.
- **the paper's augmentations** (``base.yaml``'s ``augment``, read from it, on the same
  256x256 windows) against the ``cpu`` profile's flips only.
- **resize against windows**: whole images at half size (the ``demo`` profile's choice) against
  native-scale 256x256 windows; inference at the same half size.
- **Soft Teacher against its supervised twin**: the same Soft Teacher run (same init, crops,
  steps and schedule) with ``semi.unsup_weight`` 0, so only the unlabeled images' loss differs.

the LIVECell-pretrained branch 2 also in place of branch 2 in the four-branch ensemble; and,
without training, on the ``make demo-real`` run's four branches (TTA on):

- **the class vote before WBF against after it** (``predict.vote_before_wbf``);
- **thresholds tuned on the val fold against the paper's** (the demo's own tuning result).

The variants train into ``--out`` (default ``runs/levers_real``) from a composed data root: the
real root's files linked, plus a synthetic ``LIVECell_dataset_2021/`` for the pretraining. The
report (default ``benchmarks/REAL_LEVERS.md``) has one table, one row per arm, and a bar plot.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cellmask.data.classes import CLASSES
from cellmask.demo.plan import SEGMENTER, Stage, default_config_dir
from cellmask.demo.reports.levers import format_levers_md, format_levers_table, plot_levers, run_line

__all__ = [
    "LEVERS_LIVECELL",
    "LEVER_BASE",
    "compose_root",
    "lever_stages",
    "paper_augment",
    "run_levers",
]

LEVER_BASE = "cascade_rcnn_resnext101"
"""The branch the training levers vary (branch 2, the one LIVECell pretraining was measured on
in ``make ablation`` and the one Soft Teacher starts from)."""

SOFT_TEACHER = "soft_teacher_resnext101"

LEVERS_LIVECELL = 160
"""Synthetic LIVECell images written for the pretraining lever: with the ``cpu`` profile's 3
epochs of two 256x256 windows per step, about 200 steps (a fifth of a branch's fine-tuning)."""


def paper_augment(config_dir: Path | None = None) -> tuple[str, ...]:
    """``--set`` strings that restore ``base.yaml``'s (the paper's) augmentations on top of a
    profile, keeping the profile's ``crop`` and ``resize``."""
    import yaml

    from cellmask.config import load_config

    base = load_config((config_dir or default_config_dir()) / "base.yaml")["augment"]
    return tuple(
        f"augment.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in base.items()
        if k not in ("crop", "resize")
    )


def lever_stages(config_dir: Path | None = None) -> list[Stage]:
    """The variant runs, in the order they should start (the pretraining first)."""
    return [
        Stage(f"livecell/{LEVER_BASE}", LEVER_BASE, "pretrain", "livecell"),
        Stage(
            f"paper_augs/{LEVER_BASE}",
            LEVER_BASE,
            "variant",
            overrides=paper_augment(config_dir),
            label="Cascade R-CNN ResNeXt-101, the paper's augmentations",
        ),
        Stage(
            f"livecell_ft/{LEVER_BASE}",
            LEVER_BASE,
            "variant",
            init=f"livecell/{LEVER_BASE}",
            label="Cascade R-CNN ResNeXt-101, synthetic-LIVECell-pretrained",
        ),
        Stage(
            f"resize/{LEVER_BASE}",
            LEVER_BASE,
            "variant",
            overrides=("augment.crop=null", "model.transform.scale=0.5"),
            label="Cascade R-CNN ResNeXt-101, whole images at half size",
        ),
        Stage(
            f"supervised_twin/{SOFT_TEACHER}",
            SOFT_TEACHER,
            "variant",
            init=LEVER_BASE,
            overrides=("semi.unsup_weight=0",),
            label="Soft Teacher ResNeXt-101, unlabeled loss off (supervised twin)",
        ),
    ]


LEVERS: tuple[tuple[str, str, str], ...] = (
    ("synthetic-LIVECell pretraining", LEVER_BASE, f"livecell_ft/{LEVER_BASE}"),
    ("the paper's augmentations (vs flips only)", LEVER_BASE, f"paper_augs/{LEVER_BASE}"),
    ("whole images at half size (vs native 256x256 windows)", LEVER_BASE, f"resize/{LEVER_BASE}"),
    ("Soft Teacher (vs its supervised twin)", f"supervised_twin/{SOFT_TEACHER}", SOFT_TEACHER),
)
"""``(lever, run without it, run with it)``: a run name of ``--out`` (variants) or of the demo's run."""


def compose_root(real: Path, out: Path, n_livecell: int = LEVERS_LIVECELL) -> Path:
    """``out/data``: the real root's files and folders linked, plus a synthetic LIVECell dataset
    (written once into ``out/livecell_synth`` and linked as ``LIVECell_dataset_2021``)."""
    from cellmask.data.synthetic import write_dataset

    root = out / "data"
    root.mkdir(parents=True, exist_ok=True)
    for child in Path(real).resolve().iterdir():
        if child.name == "LIVECell_dataset_2021":
            continue
        link = root / child.name
        if not link.exists():
            link.symlink_to(child)
    synth = out / "livecell_synth"
    lc = synth / "LIVECell_dataset_2021"
    if not (lc / "annotations").is_dir():
        write_dataset(synth, n_train=0, n_unlabeled=0, n_test=0, n_livecell=n_livecell)
    link = root / "LIVECell_dataset_2021"
    if not link.exists():
        link.symlink_to(lc.resolve())
    return root


def _single_row(label: str) -> Any:
    from cellmask.evaluate import Row

    return Row(label, None, tta=False)


def run_levers(
    data: str | Path,
    demo_runs: str | Path = "runs/demo_real",
    out: str | Path = "runs/levers_real",
    md: str | Path = "benchmarks/REAL_LEVERS.md",
    profile: str = "cpu",
    device: str = "cpu",
    workers: int | None = None,
    quick: bool = False,
    progress: bool | None = None,
    command: str = "make ablation-real",
) -> dict[str, Any]:
    """Train the variants (reused when trained with today's configs), score every arm on the
    demo run's held-out fold, write ``md``.

    Args:
        data: the real competition root (``make demo-real``'s ``DATA``).
        demo_runs: the finished ``make demo-real`` run (its branches, segmenter, tuning).
        out: where the variants train.

    Returns:
        ``{"rows": [...], "md": path, "time_s": {...}}``.
    """
    from cellmask.demo.core import load_stage_configs
    from cellmask.demo.plan import QUICK_EPOCHS
    from cellmask.demo.reports.machine import machine_line
    from cellmask.demo.steps import existing_runs
    from cellmask.demo.training import default_workers, train_stages
    from cellmask.evaluate import Row, run_rows
    from cellmask.predict import Predictor
    from cellmask.training.split import competition_split

    start = time.perf_counter()
    progress = sys.stderr.isatty() if progress is None else progress
    data, demo_runs, out, md = Path(data), Path(demo_runs), Path(out), Path(md)
    segmenter = demo_runs / "segmenter"
    base_results = existing_runs([Stage(LEVER_BASE, LEVER_BASE), Stage("segmenter", SEGMENTER)], demo_runs)
    times: dict[str, float] = {}

    print(f"\n== levers 1/3: data root {out / 'data'} (the real images linked + synthetic LIVECell)")
    root = compose_root(data, out, 8 if quick else LEVERS_LIVECELL)
    stages = lever_stages()
    configs = load_stage_configs(stages, profile, default_config_dir())
    workers = default_workers() if workers is None else int(workers)
    print(f"\n== levers 2/3: training {len(stages)} runs ({workers} at a time) -> {out}")
    t = time.perf_counter()
    results = train_stages(
        stages, configs, root, out, workers=workers, epochs=QUICK_EPOCHS if quick else None,
        device=device, reuse=True, available={LEVER_BASE: base_results[LEVER_BASE]}, progress=progress,
    )  # fmt: skip
    times["training"] = time.perf_counter() - t

    split = competition_split(configs[f"paper_augs/{LEVER_BASE}"], root)
    records = list(split.holdout or split.val)[: 3 if quick else None]
    print(f"\n== levers 3/3: every arm on {len(records)} held-out images")
    t = time.perf_counter()
    cache = out / "cache"

    def run_dir(name: str) -> Path:
        return out / name if (out / name / "best.pt").is_file() else demo_runs / name

    scores: dict[str, Any] = {}
    for name in dict.fromkeys(n for _, a, b in LEVERS for n in (a, b)):
        pred = Predictor.from_runs([run_dir(name)], segmenter, device=device, cache=cache)
        scores[name] = run_rows(pred, records, [_single_row(name)], None, progress)[0]
    branches = _demo_branches(demo_runs)
    ensemble = Predictor.from_runs([demo_runs / b for b in branches], segmenter, device=device, cache=cache)
    tuned = _tuned_options(demo_runs)
    ens_rows = [
        Row("ensemble + TTA, class vote after WBF *"),
        Row("ensemble + TTA, class vote before WBF", options={"vote_before_wbf": True}),
        Row("ensemble + TTA, no class vote", options={"class_vote": False}),
    ]
    if tuned:
        ens_rows.append(Row("ensemble + TTA, thresholds tuned on the val fold", options=tuned))
    ens = run_rows(ensemble, records, ens_rows, None, progress)
    pretrained = Predictor.from_runs(  # the LIVECell lever carried into the ensemble
        [out / f"livecell_ft/{b}" if b == LEVER_BASE else demo_runs / b for b in branches],
        segmenter, device=device, cache=cache,
    )  # fmt: skip
    in_ensemble = run_rows(
        pretrained, records, [Row("ensemble + TTA, branch 2 LIVECell-pretrained")], None, progress
    )
    times["evaluate"] = time.perf_counter() - t

    rows = []
    for lever, without, with_ in LEVERS:
        rows.append(_arm(lever, "without", without, scores[without]))
        rows.append(_arm(lever, "with", with_, scores[with_]))
    carried = "synthetic-LIVECell pretraining of branch 2, in the ensemble"
    rows.append(_arm(carried, "without", "ensemble", ens[0]))
    rows.append(_arm(carried, "with", "ensemble, branch 2 from livecell_ft", in_ensemble[0]))
    vote = "the class vote before WBF (vs after)"
    rows.append(_arm(vote, "without", "ensemble", ens[0]))
    rows.append(_arm(vote, "with", "ensemble", ens[1]))
    rows.append(_arm("the class vote (vs none)", "without", "ensemble", ens[2]))
    rows.append(_arm("the class vote (vs none)", "with", "ensemble", ens[0]))
    if tuned:
        thr = "thresholds tuned on the val fold (vs the paper's)"
        rows.append(_arm(thr, "without", "ensemble", ens[0]))
        rows.append(_arm(thr, "with", "ensemble", ens[3]))
    times["total"] = time.perf_counter() - start
    info = {
        "command": command,
        "machine": machine_line(),
        "when": time.strftime("%Y-%m-%d"),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "n_holdout": len(records),
        "demo_runs": str(demo_runs),
        "runs": {name: run_line(r.out_dir) for name, r in results.items() if name != LEVER_BASE}
        | {str(demo_runs / n): run_line(demo_runs / n) for n in (LEVER_BASE, SOFT_TEACHER)},
        "minutes": times["total"] / 60,
    }
    md.parent.mkdir(parents=True, exist_ok=True)
    figure = plot_levers(rows, md.parent / "real" / "levers.png")
    md.write_text(format_levers_md(rows, info, figure.relative_to(md.parent)))
    summary = {"rows": rows, "md": str(md), "figure": str(figure), "time_s": times, "info": info}
    (out / "levers.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(format_levers_table(rows))
    print(f"wrote {md} and {figure} in {times['total'] / 60:.1f} min")
    return summary


def _demo_branches(demo_runs: Path) -> list[str]:
    from cellmask.demo.plan import BRANCHES

    return [b for b in BRANCHES if (demo_runs / b / "best.pt").is_file()]


def _tuned_options(demo_runs: Path) -> dict[str, Any] | None:
    """The thresholds ``make demo-real`` tuned on its val fold (its summary), or ``None``."""
    path = demo_runs / "summary.json"
    tuned = json.loads(path.read_text()).get("tuned") if path.is_file() else None
    return dict(tuned["thresholds"]) if tuned else None


def _arm(lever: str, arm: str, run: str, result: Any) -> dict[str, Any]:
    return {
        "lever": lever,
        "arm": arm,
        "run": run,
        "score": float(result.report.score),
        **{c: float(result.report.per_class.get(c, float("nan"))) for c in CLASSES},
        "instances": int(result.instances),
    }
