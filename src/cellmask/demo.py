"""``cellmask demo``: the whole pipeline on built-in synthetic data, on a CPU, in minutes.

What ``make demo`` runs::

    cellmask demo [--out runs/demo] [--data data/demo] [--profile demo|smoke] [--quick]

1. ``cellmask synth``: a small synthetic dataset in the Kaggle layout under ``--data``
   (256x352 images, so cells keep their native pixel size while images stay small);
2. trains one detector branch (``--detector``, default Faster R-CNN Swin-T) and the segmenter
   (UperNet Swin-T on truth boxes) on the competition split (``cellmask train``'s
   :func:`~cellmask.train.run_training`, ``--profile``'s numbers);
3. runs the inference pipeline (:mod:`cellmask.predict`) on the held-out validation images,
   writes their ``submission.csv`` and scores it against their truth with the competition
   metric (:func:`~cellmask.metric.score_files`, what ``cellmask score`` runs); then predicts the
   synthetic ``test/`` images into ``submissions/demo_submission.csv`` and validates it
   (:func:`~cellmask.submission.check_submission`);
4. prints a summary (box AP50 of the detector, segmenter mIoU on truth boxes, the pipeline's
   competition score per class and per threshold, time taken) and writes ``summary.json``,
   ``score.json`` and figures under ``--out``.

``--quick`` shrinks the dataset and trains each model one epoch: it checks the plumbing (tests),
not the score.

Budget (2-core CPU, no ImageNet weights): the detector trains ~470 steps (12 epochs of 77
images, batch 2, ~4.7 min), the segmenter ~160 steps (~1.7 min), inference ~20 s: about 7 min
in all. The demo profile caps epochs (``train.epochs: 12``), so the optimisation steps come
from the number of images: more images also generalise better than more epochs over fewer.
Faster R-CNN Swin-T is the default branch because it learned fastest: after 240 steps its
validation box AP50 was 0.37 where Cascade R-CNN ResNeXt (GroupNorm) had 0.24. LIVECell
pretraining (the paper's first stage) is left out: from scratch, a few synthetic LIVECell
images would cost minutes for no measurable gain here (``README``: the two-stage commands).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cellmask import CLASSES
from cellmask.config import PROFILES

log = logging.getLogger("cellmask.demo")

DETECTOR_CONFIG = "faster_rcnn_swin_t.yaml"
SEGMENTER_CONFIG = "segmenter_upernet_swin_t.yaml"

DATASETS: dict[str, dict[str, Any]] = {
    # 96 annotated images: ~77 train / ~19 val (train.val_fraction 0.2, grouped by sample)
    "demo": {"train": 96, "test": 3, "livecell": 0, "unlabeled": 0, "size": (256, 352)},
    "smoke": {"train": 12, "test": 2, "livecell": 0, "unlabeled": 0, "size": (128, 160)},
}
"""``cellmask synth`` arguments per profile (``--quick`` uses ``QUICK_DATASET``)."""

QUICK_DATASET: dict[str, Any] = {"train": 8, "test": 2, "livecell": 0, "unlabeled": 0, "size": (128, 160)}
QUICK_EPOCHS = 1

SUMMARY_KEYS = (
    "profile",
    "data",
    "n_train",
    "n_val",
    "n_test",
    "synthetic",
    "detector",
    "segmenter",
    "box_AP",
    "box_AP50",
    "box_AP50_per_class",
    "segmenter_mIoU",
    "score",
    "score_per_class",
    "score_per_threshold",
    "submission",
    "submission_ok",
    "figures",
    "time_s",
)
"""Keys of ``summary.json``."""


def default_config_dir() -> Path:
    """``configs/`` of the source tree (an editable install), else ``./configs``."""
    here = Path(__file__).resolve().parents[2] / "configs"
    return here if here.is_dir() else Path("configs")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The ``cellmask demo`` arguments."""
    p.add_argument(
        "--out", default="runs/demo", help="run directory: models, figures, scores (default runs/demo)"
    )
    p.add_argument(
        "--data", default="data/demo", help="where the synthetic dataset is written (default data/demo)"
    )
    p.add_argument("--profile", choices=PROFILES, default="demo", help="config profile (default demo)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny dataset, one epoch per model: checks the plumbing, not the score",
    )
    p.add_argument(
        "--detector",
        default=DETECTOR_CONFIG,
        help=f"detector config, a file or a name in configs/ (default {DETECTOR_CONFIG})",
    )
    p.add_argument(
        "--submission",
        default="submissions/demo_submission.csv",
        help="submission of the synthetic test images (default submissions/demo_submission.csv)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument(
        "--no-synth", action="store_true", help="use the dataset already at --data (any Kaggle-layout root)"
    )
    p.add_argument(
        "--skip-train", action="store_true", help="reuse the checkpoints already in --out (inference only)"
    )


# --------------------------------------------------------------------------------------------
# pieces


def _config_path(name: str | Path, config_dir: Path) -> Path:
    """A config file: ``name`` itself if it exists or has a folder, else ``config_dir/name[.yaml]``."""
    path = Path(name)
    if path.is_file() or path.parent != Path():
        return path
    return config_dir / (path.name if path.suffix else f"{path.name}.yaml")


def _clean(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def box_ap_per_class(detections: Sequence[Mapping[str, Any]], records: Sequence[Any]) -> dict[str, float]:
    """COCO box AP50 of each competition class alone (NaN for a class without truth boxes)."""
    import numpy as np

    from cellmask.coco_eval import coco_box_ap

    out = {}
    for label, name in enumerate(CLASSES, start=1):
        preds, truths = [], []
        for det, record in zip(detections, records, strict=True):
            keep = np.asarray(det["labels"]) == label
            preds.append({k: np.asarray(det[k])[keep] for k in ("boxes", "scores", "labels")})
            mine = np.asarray(record.labels) == label
            truths.append(
                {"boxes": np.asarray(record.boxes)[mine], "labels": np.asarray(record.labels)[mine]}
            )
        out[name] = coco_box_ap(preds, truths)["AP50"]
    return out


def write_truth_csv(train_csv: str | Path, image_ids: Sequence[str], out: str | Path) -> Path:
    """The rows of ``train_csv`` whose id is in ``image_ids`` (header kept): a truth file for
    ``cellmask score``."""
    wanted = set(image_ids)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Path(train_csv).open(newline="") as src, out.open("w", newline="") as dst:
        reader = csv.reader(src)
        writer = csv.writer(dst, lineterminator="\n")
        header = next(reader)
        writer.writerow(header)
        id_col = header.index("id")
        writer.writerows(row for row in reader if row and row[id_col] in wanted)
    return out


def save_comparison(
    path: str | Path,
    records: Sequence[Any],
    predictions: Mapping[str, Sequence[str]],
    per_image: Mapping[str, float] | None = None,
) -> Path:
    """One row per record: the image with its truth instances | with the predicted instances."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cellmask.data.images import read_image
    from cellmask.data.rle import rles_to_masks
    from cellmask.plot import overlay_instances

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = records[0].height, records[0].width
    scale = max(1.0, 440 / w)  # small images are drawn larger
    fig = Figure(figsize=(2 * w * scale / 100, len(records) * (h * scale + 30) / 100), dpi=100)
    FigureCanvasAgg(fig)
    for row, record in enumerate(records):
        image = read_image(record.path, (record.height, record.width))
        truth = rles_to_masks(record.rles(), record.height, record.width)
        pred = rles_to_masks(list(predictions.get(record.image_id, [])), record.height, record.width)
        score = f", score {per_image[record.image_id]:.3f}" if per_image else ""
        for col, (masks, title) in enumerate(
            (
                (truth, f"{record.image_id} ({record.cell_type}): truth, {len(truth)} cells"),
                (pred, f"prediction, {len(pred)} cells{score}"),
            )
        ):
            ax = fig.add_subplot(len(records), 2, 2 * row + col + 1)
            overlay_instances(image, masks, ax=ax, alpha=0.4)
            ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / len(records) / 2.5, wspace=0.02)
    fig.savefig(path, dpi=100)
    return path


def _one_per_class(records: Sequence[Any]) -> list[Any]:
    """The most crowded record of each cell type (in class order), for the overlay figure."""
    out = []
    for name in CLASSES:
        match = [r for r in records if r.cell_type == name]
        if match:
            out.append(max(match, key=len))
    return out or list(records[:1])


def _fmt_class_scores(per_class: Mapping[str, float], counts: Mapping[str, int]) -> str:
    return ", ".join(
        f"{name} {value:.3f} ({counts.get(name, 0)} img)"
        for name, value in per_class.items()
        if not math.isnan(value)
    )


# --------------------------------------------------------------------------------------------
# the demo


def run_demo(
    out: str | Path = "runs/demo",
    data: str | Path = "data/demo",
    profile: str = "demo",
    quick: bool = False,
    detector: str | Path = DETECTOR_CONFIG,
    submission: str | Path = "submissions/demo_submission.csv",
    device: str = "cpu",
    synth: bool = True,
    train: bool = True,
    config_dir: str | Path | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the summary (keys :data:`SUMMARY_KEYS`).

    ``progress``: tqdm bars during inference (``None``: when stderr is a terminal).

    Raises:
        FileNotFoundError: ``train=False`` and a checkpoint is missing (the message names it).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cellmask.coco_eval import coco_box_ap
    from cellmask.config import load_config
    from cellmask.data.sartorius import list_images
    from cellmask.data.synthetic import write_dataset
    from cellmask.metric import format_report, plot_per_threshold, score_files
    from cellmask.models.segmenter import evaluate_segmenter
    from cellmask.paths import CompetitionLayout
    from cellmask.predict import Predictor, config_path_for, model_name, save_predict_config
    from cellmask.submission import check_submission, write_submission
    from cellmask.train import load_split, run_training

    t_start = time.perf_counter()
    if progress is None:
        progress = sys.stderr.isatty()
    times: dict[str, float] = {}
    out, data = Path(out), Path(data)
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    layout = CompetitionLayout(data)
    det_dir, seg_dir = out / "detector", out / "segmenter"
    epochs = QUICK_EPOCHS if quick else None

    det_cfg = load_config(_config_path(detector, config_dir), profile=profile)
    seg_cfg = load_config(config_dir / SEGMENTER_CONFIG, profile=profile)
    det_name, seg_name = model_name(det_cfg), model_name(seg_cfg)

    # 1. data
    if synth:
        spec = QUICK_DATASET if quick else DATASETS.get(profile, DATASETS["demo"])
        _banner(f"1/4 synthetic dataset -> {data}")
        t = time.perf_counter()
        counts = write_dataset(
            data,
            n_train=spec["train"],
            n_unlabeled=spec["unlabeled"],
            n_test=spec["test"],
            n_livecell=spec["livecell"],
            size=spec["size"],
        )
        times["synth"] = time.perf_counter() - t
        print(
            f"wrote {counts['train']} train images ({counts['instances']} instances) and "
            f"{counts['test']} test images of {spec['size'][0]}x{spec['size'][1]} in {times['synth']:.1f} s"
        )
    train_records, val_records, _ = load_split(det_cfg, data, "sartorius")
    seg_split = load_split(seg_cfg, data, "sartorius")[1]
    if [r.image_id for r in seg_split] != [r.image_id for r in val_records]:
        log.warning("the segmenter's validation split differs from the detector's (train.val_fraction/seed)")

    # 2. training
    det_ckpt, seg_ckpt = det_dir / "best.pt", seg_dir / "best.pt"
    if train:
        _banner(f"2/4 training the detector ({det_name}, profile {profile}) -> {det_dir}")
        t = time.perf_counter()
        run_training(det_cfg, data, "sartorius", det_dir, epochs=epochs, device=device)
        times["detector"] = time.perf_counter() - t
        _banner(f"2/4 training the segmenter ({seg_name}, profile {profile}) -> {seg_dir}")
        t = time.perf_counter()
        run_training(seg_cfg, data, "sartorius", seg_dir, epochs=epochs, device=device)
        times["segmenter"] = time.perf_counter() - t
    for ckpt in (det_ckpt, seg_ckpt):  # inference reads the runs; name a missing checkpoint itself
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt}: no such checkpoint (train first, or drop --skip-train)")
    predictor = Predictor.from_runs([det_dir], seg_dir, device=device)

    # 3. inference: validation images (scored), then test images (submission)
    _banner(f"3/4 inference on {len(val_records)} validation images, scored with the competition metric")
    t = time.perf_counter()
    fused: dict[str, Any] = {}
    val_pred = predictor.predict_records(val_records, progress=progress, detections=fused)
    detections = {
        k: {"boxes": d.boxes.astype("float32"), "scores": d.scores, "labels": d.labels}
        for k, d in fused.items()
    }
    val_detections = [detections[r.image_id] for r in val_records]
    box_ap = coco_box_ap(val_detections, val_records, num_classes=len(CLASSES) + 1)
    box_ap50_per_class = box_ap_per_class(val_detections, val_records)
    miou = evaluate_segmenter(predictor.segmenter, val_records, device)
    val_ids = [r.image_id for r in val_records]
    truth_csv = write_truth_csv(layout.train_csv, val_ids, out / "val_truth.csv")
    val_csv = write_submission(out / "val_submission.csv", val_pred, image_ids=val_ids)
    report = score_files(truth_csv, val_csv)
    (out / "score.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(format_report(report))
    print(f"(re-score: cellmask score --truth {truth_csv} --pred {val_csv})")

    test_records = list_images(layout.test_dir)
    test_pred = predictor.predict_records(test_records, progress=progress)
    sub_path = write_submission(submission, test_pred, image_ids=[r.image_id for r in test_records])
    save_predict_config(predictor.options, config_path_for(sub_path), predictor.describe_runs())
    problems = check_submission(sub_path, layout.test_dir)
    times["inference"] = time.perf_counter() - t

    # 4. figures and summary
    _banner("4/4 figures and summary")
    figures = [det_dir / "metrics.png", seg_dir / "metrics.png"]
    figures.append(
        save_comparison(out / "overlay_val.png", _one_per_class(val_records), val_pred, report.per_image)
    )
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = plot_per_threshold(
        report, ax=fig.add_subplot(), label=f"{det_name} + {seg_name}: {report.score:.3f}"
    )
    ax.set_title(f"demo pipeline on {report.n_images} validation images")
    fig.savefig(out / "score_per_threshold.png", dpi=100)
    figures.append(out / "score_per_threshold.png")

    times["total"] = time.perf_counter() - t_start
    summary = {
        "profile": profile + (" (quick)" if quick else ""),
        "data": str(data),
        "n_train": len(train_records),
        "n_val": len(val_records),
        "n_test": len(test_records),
        "synthetic": synth,
        "detector": det_name,
        "segmenter": seg_name,
        "box_AP": box_ap["AP"],
        "box_AP50": box_ap["AP50"],
        "box_AP50_per_class": box_ap50_per_class,
        "segmenter_mIoU": miou["mIoU"],
        "score": report.score,
        "score_per_class": report.per_class,
        "score_per_threshold": report.per_threshold,
        "submission": str(sub_path),
        "submission_ok": not problems,
        "submission_problems": problems,
        "figures": [str(f) for f in figures if Path(f).is_file()],
        "time_s": {k: round(v, 1) for k, v in times.items()},
    }
    (out / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")
    _print_summary(summary, report)
    return summary


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _print_summary(summary: Mapping[str, Any], report: Any) -> None:
    t = summary["time_s"]
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total")
    sub = "valid (check_submission OK)" if summary["submission_ok"] else "INVALID"
    lines = [
        "",
        f"== cellmask demo summary (profile {summary['profile']})",
        f"data       {summary['data']}: {summary['n_train']} train / {summary['n_val']} val / "
        f"{summary['n_test']} test images" + (" (synthetic)" if summary["synthetic"] else ""),
        f"detector   {summary['detector']}: val box AP50 {summary['box_AP50']:.3f} (AP {summary['box_AP']:.3f}); "
        + "AP50 per class: "
        + ", ".join(f"{k} {v:.3f}" for k, v in summary["box_AP50_per_class"].items() if not math.isnan(v)),
        f"segmenter  {summary['segmenter']}: val mIoU on truth boxes {summary['segmenter_mIoU']:.3f}",
        f"pipeline   val competition score {summary['score']:.3f}: "
        + _fmt_class_scores(report.per_class, report.class_counts),
        f"submission {summary['submission']}: {summary['n_test']} test images, {sub}",
        f"figures    {', '.join(summary['figures'])}",
        f"time       {t['total'] / 60:.1f} min ({parts})",
    ]
    print("\n".join(lines))
    for problem in summary.get("submission_problems", []):
        print(f"  submission problem: {problem}")


def cli_demo(args: argparse.Namespace) -> int:
    """Handler of ``cellmask demo``; returns 0, or 1 when the test submission is invalid."""
    summary = run_demo(
        out=args.out,
        data=args.data,
        profile=args.profile,
        quick=args.quick,
        detector=args.detector,
        submission=args.submission,
        device=args.device,
        synth=not args.no_synth,
        train=not args.skip_train,
    )
    return 0 if summary["submission_ok"] else 1
