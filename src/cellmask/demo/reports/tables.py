"""What the demo prints and draws: the ablation table (synthetic and real scores side by side),
the truth-vs-prediction overlays, the one-screen summary."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cellmask.data.classes import CLASSES

__all__ = [
    "box_ap_per_class",
    "clean_json",
    "format_demo_table",
    "format_summary",
    "one_per_class",
    "save_comparison",
    "table_rows",
    "write_truth_csv",
]


def clean_json(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def box_ap_per_class(detections: Sequence[Mapping[str, Any]], records: Sequence[Any]) -> dict[str, float]:
    """COCO box AP50 of each competition class alone (NaN for a class without truth boxes).

    Args:
        detections: per record, ``boxes`` float ``[N, 4]`` xyxy pixels, ``scores`` ``[N]``,
            ``labels`` int ``[N]`` (1..3).
        records: the truth records (``boxes``, ``labels``), in the same order.
    """
    import numpy as np

    from cellmask.training.validation import coco_box_ap

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


def table_rows(val_rows: Sequence[Any], real_rows: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """One dict per ablation row: its name, whether it is the configured pipeline, the
    synthetic validation score overall and per class, and the real-image score (NaN without)."""
    real = {r.row.name: r for r in real_rows}
    out = []
    for res in val_rows:
        rec = {
            "row": res.row.name,
            "configured": res.row.configured,
            "baseline": res.row.baseline,
            "branches": res.settings["branches"],
            "tta": res.settings["tta"],
            "score": res.report.score,
            **{c: res.report.per_class.get(c, math.nan) for c in CLASSES},
            "instances": res.instances,
        }
        other = real.get(res.row.name)
        rec["real"] = other.report.score if other is not None else math.nan
        rec.update(
            {f"real_{c}": other.report.per_class.get(c, math.nan) if other else math.nan for c in CLASSES}
        )
        out.append(rec)
    return out


def _num(value: float) -> str:
    return "  -  " if value is None or math.isnan(value) else f"{value:.3f}"


def format_demo_table(
    rows: Sequence[Mapping[str, Any]], n_val: int, n_real: int, scored: str = "synthetic val"
) -> str:
    """The printed table: each row's score on the scored images (``scored``: their name; overall,
    per class) beside its score on the real fixture images (``*``: the pipeline as configured)."""
    width = max(len(r["row"]) for r in rows) + 2
    head = f"{'':{width}}  {scored + ', ' + str(n_val) + ' images':^34}  {'real, ' + str(n_real) + ' images':^14}"
    cols = f"{'row':{width}}  {'score':>6} " + " ".join(f"{c:>8}" for c in CLASSES) + f"  {'score':>6}"
    lines = [head, cols, "-" * len(cols)]
    for r in rows:
        name = r["row"] + (" *" if r["configured"] else "")
        lines.append(
            f"{name:{width}}  {_num(r['score']):>6} "
            + " ".join(f"{_num(r[c]):>8}" for c in CLASSES)
            + f"  {_num(r['real']):>6}"
        )
    return "\n".join(lines)


def one_per_class(records: Sequence[Any]) -> list[Any]:
    """The most crowded record of each cell type (in class order), for the overlay figure."""
    out = []
    for name in CLASSES:
        match = [r for r in records if r.cell_type == name]
        if match:
            out.append(max(match, key=len))
    return out or list(records[:1])


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


def _fmt_class_scores(per_class: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in per_class.items() if not math.isnan(value))


def format_summary(summary: Mapping[str, Any], table: str) -> str:
    """The one screen printed at the end of the demo."""
    t = summary["time_s"]
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total")
    sub = "valid (check_submission OK)" if summary["submission_ok"] else "INVALID"
    branches = "; ".join(
        f"{b['name']} ({b['run']}, {b['seconds']:.0f} s"
        + (f", val box AP50 {b['box_AP50']:.3f}" if b.get("box_AP50") is not None else "")
        + ")"
        for b in summary["branches"]
    )
    real = summary.get("real_score")
    held = summary.get("n_holdout", 0)
    scored = "held-out" if held else ("synthetic val" if summary["synthetic"] else "val")
    lines = [
        "",
        f"== cellmask demo summary (profile {summary['profile']})",
        f"data       {summary['data']}: {summary['n_train']} train / {summary['n_val']} val / "
        + (f"{held} held-out / " if held else "")
        + f"{summary['n_test']} test images"
        + (" (synthetic)" if summary["synthetic"] else ""),
        *(f"note       {n}" for n in summary.get("notes", ())),
        f"branches   {branches}",
        f"segmenter  {summary['segmenter']}: val mIoU on truth boxes {summary['segmenter_mIoU']:.3f}",
        "",
        table,
        "",
        f"ensemble   {scored} score {summary['score']:.3f} ({_fmt_class_scores(summary['score_per_class'])}); "
        f"best single branch {summary['best_branch_score']:.3f} ({summary['best_branch']})"
        + (
            f"; baseline {summary['baseline_score']:.3f}"
            if not math.isnan(summary.get("baseline_score", math.nan))
            else ""
        ),
    ]
    tuned = summary.get("tuned")
    if tuned:
        best = tuned["thresholds"]
        lines.append(
            "tuned      on the val fold: "
            + ", ".join(f"{k} {v:.2f}" for k, v in best["score_thresholds"].items())
            + f", mask {best['mask_threshold']:.2f} (val {tuned['val_default']:.3f} -> {tuned['val_score']:.3f})"
        )
    if real is not None and not math.isnan(real):
        lines.append(
            f"real       {summary['n_real']} real annotated images at 520x704: score {real:.3f} "
            f"({_fmt_class_scores(summary['real_per_class'])}): the sim-to-real gap of models trained "
            "minutes on synthetic data only"
        )
    lines += [
        f"submission {summary['submission']}: {summary['n_test']} test images, {sub}"
        if summary.get("submission")
        else "submission none (no test images)",
        f"figures    {', '.join(summary['figures'])}",
        f"time       {t['total'] / 60:.1f} min ({parts})",
    ]
    lines += [f"  submission problem: {p}" for p in summary.get("submission_problems", [])]
    return "\n".join(lines)
