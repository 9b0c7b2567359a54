"""A Kaggle GPU plan for the paper profile: GPU hours per training kernel, computed from the
paper's epochs (the resolved ``paper`` configs), the data's image counts and a step time per
model, and how the kernels fit Kaggle's weekly GPU quota.

The step times are STATED, not measured (no GPU was lent when this was written): estimates for
one T4 at the paper's 540x720 input, batch 2, float16 autocast, from public mmdet / torchvision
throughput of the same architectures. ``benchmarks/gpu_check.sh`` measures the real ones on a
lent GPU: pass them with ``--step`` (``--step cascade_rcnn_resnext101=0.6``) to recompute.

    .venv/bin/python benchmarks/kaggle_plan.py [--ddp 2] [--quota 30] [--step NAME=SECONDS ...]

With ``--ddp 2`` (the notebooks' default on a T4 x2: one process per GPU, the batch of 2 split
1 + 1) a step of two images takes about ``DDP_STEP`` times the one-GPU step (each GPU carries
one image; the gradient all-reduce costs the rest).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cellmask.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LIVECELL_TRAIN = 3253 + 1564  # LIVECell's train + test splits (the paper trains on both)
LIVECELL_VAL_SUBSET = 200  # base.yaml val.max_images
LIVECELL_CELLS = 313  # mean cells per LIVECell image (the segmenter's crops)
COMPETITION = 606  # annotated competition images (the paper's count; 95% train)
COMPETITION_CELLS = 80  # mean cells per competition image
UNLABELED = 1972  # train_semi_supervised images
STEP_T4 = {  # seconds per optimiser step on one T4 at batch 2, float16: STATED estimates
    "faster_rcnn_swin_t": 0.45,
    "cascade_rcnn_resnext101": 0.75,
    "cascade_rcnn_resnest101": 0.80,
    "soft_teacher_resnext101": 1.10,  # student on 2 images + teacher on 1 + box jitter
    "segmenter_upernet_swin_t": 0.35,  # 128 crops of 128x128 per step
}
DDP_STEP = 0.55
"""One DDP step on two T4s (one image each) relative to one T4 with both images (stated)."""
VAL_S_PER_IMAGE = 0.25
"""Detection + COCO evaluation per validation image on a T4 (stated; the evaluation itself is
0.03 s per 313-cell image, benchmarks/bench_validation.py)."""


def stage_hours(images: int, epochs: int, step: float, ddp: int, val_images: int) -> float:
    """GPU hours of a detector stage: ``images / 2`` steps an epoch at ``step`` seconds (times
    :data:`DDP_STEP` on two GPUs), plus each epoch's validation."""
    steps = math.ceil(images / 2) * epochs
    per_step = step * (DDP_STEP if ddp > 1 else 1.0)
    return (steps * per_step + epochs * val_images * VAL_S_PER_IMAGE) / 3600.0


def plan(ddp: int, steps: dict[str, float]) -> list[tuple[str, str, float]]:
    """``(kernel, what it trains, GPU hours)`` of the paper profile's kernels 01-06."""

    def epochs(config: str) -> int:
        return int(load_config(ROOT / "configs" / f"{config}.yaml", "paper")["train"]["epochs"])

    rows = []
    for branch in STEP_T4:
        if branch.startswith("segmenter"):
            continue
        # 01: every branch's LIVECell stage is a supervised detector at batch 2 (Soft Teacher's as
        # its plain Faster R-CNN ResNeXt-101: the Cascade's step time less its two extra stages)
        step = steps["cascade_rcnn_resnext101"] * 0.8 if branch.startswith("soft") else steps[branch]
        hours = stage_hours(LIVECELL_TRAIN, 36, step, ddp, LIVECELL_VAL_SUBSET)
        rows.append((f"01 BRANCH={branch}", f"{LIVECELL_TRAIN} LIVECell images x 36 epochs", hours))
    train = round(COMPETITION * 0.95)
    for nb, branch in (
        ("02", "faster_rcnn_swin_t"),
        ("03", "cascade_rcnn_resnext101"),
        ("04", "cascade_rcnn_resnest101"),
    ):
        n = epochs(branch)
        hours = stage_hours(train, n, steps[branch], ddp, COMPETITION - train)
        rows.append((f"{nb} {branch}", f"{train} images x {n} epochs", hours))
    n = epochs("soft_teacher_resnext101")  # an epoch: one pass over the unlabeled stream (1:1 groups)
    groups = UNLABELED * n  # one group (1 labeled + 1 unlabeled image) per process and step
    hours = groups * steps["soft_teacher_resnext101"] * (DDP_STEP if ddp > 1 else 1.0) / 3600.0
    rows.append(("05 soft_teacher_resnext101", f"{UNLABELED} groups x {n} epochs", hours))
    seg = load_config(ROOT / "configs" / "segmenter_upernet_swin_t.yaml", "paper")
    chunk = int(seg["crops"]["chunk_size"])
    items = LIVECELL_TRAIN * math.ceil(LIVECELL_CELLS / chunk)
    seg_live = items / 2 * int(seg["train"]["epochs"]) * steps["segmenter_upernet_swin_t"]
    n_ft = epochs("segmenter_upernet_swin_t_finetune")
    seg_ft = train * math.ceil(COMPETITION_CELLS / chunk) / 2 * n_ft * steps["segmenter_upernet_swin_t"]
    factor = DDP_STEP if ddp > 1 else 1.0
    rows.append(
        (
            "06 segmenter (LIVECell + fine-tuning)",
            f"{items} LIVECell chunks x 5, then {n_ft} epochs",
            (seg_live + seg_ft) * factor / 3600.0,
        )
    )
    rows.append(("08 evaluate", "ablation + tuning on the val images", 0.5))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ddp", type=int, default=2, help="processes (GPUs) per kernel: 2 on a T4 x2 (default)")
    p.add_argument("--quota", type=float, default=30.0, help="GPU hours a week (default 30)")
    p.add_argument("--session", type=float, default=11.5, help="training hours per session (default 11.5)")
    p.add_argument("--step", nargs="*", default=[], metavar="NAME=SECONDS", help="measured step times")
    args = p.parse_args()
    steps = dict(STEP_T4)
    for item in args.step:
        name, value = item.split("=")
        steps[name] = float(value)
    rows = plan(args.ddp, steps)
    measured = sorted(n for n in steps if steps[n] != STEP_T4[n])
    print(
        f"step times: {'measured for ' + ', '.join(measured) if measured else 'STATED estimates (not measured)'}; "
        f"{'T4 x2, DDP' if args.ddp > 1 else 'one T4'}"
    )
    total = 0.0
    print(f"{'kernel':42s} {'what':44s} {'GPU h':>6s} {'sessions':>8s}")
    for kernel, what, hours in rows:
        total += hours
        print(f"{kernel:42s} {what:44s} {hours:6.1f} {math.ceil(hours / args.session):8d}")
    print(
        f"{'total':42s} {'':44s} {total:6.1f}   = {total / args.quota:.1f} weeks of a {args.quota:g} h quota"
    )


if __name__ == "__main__":
    main()
