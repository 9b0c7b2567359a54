"""Benchmark: ``cellmask score`` against the "label image + np.histogram2d" metric.

The label-image method is the one most public Sartorius notebooks use: decode each instance
into one ``H x W`` label image per image (truth and prediction), count intersections with
``np.histogram2d`` of the two label images, get unions from the areas. It is re-implemented
here (:func:`histogram2d_score`), on the fast side of what notebooks do: the CSVs are read
with the ``csv`` module (no pandas import), and each run is painted straight into the label
image (no full-size mask per instance). It is only exact when no two masks of one side
overlap, so the benchmark's truth has its overlaps resolved first (the real train.csv has
some; the last output line shows what they do to it), and the predictions are made
non-overlapping, as post-processed predictions are.

Both run end to end, each in a fresh ``python`` process (start-up, imports, CSV reading, RLE
decoding included), on the same files, in the same run, taking turns; the best of
``--repeats`` runs counts, after one untimed warm-up (byte-code cached under the temp folder
even where PYTHONDONTWRITEBYTECODE is set, as an installed package has it):

    .venv/bin/python benchmarks/bench_metric.py [--copies 20] [--repeats 5]

The inputs are the 6 real fixture images (2 per class), replicated ``--copies`` times under new
ids, with seeded perturbed predictions (dropped, shifted, dilated, eroded cells and false
positives). The process exits 1 if the two scores differ by more than 1e-6.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REAL_CSV = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sartorius_real" / "train.csv"
TRUTH_HEADER = ["id", "annotation", "width", "height", "cell_type"]


# ----------------------------------------------------------------------------------------------
# The label image + np.histogram2d method (the baseline), self-contained
# ----------------------------------------------------------------------------------------------


def simple_decode_into(label: np.ndarray, rle: str, value: int) -> None:
    """Paint one RLE into a flat label image, run by run (later instances win)."""
    tokens = rle.split()
    starts = np.asarray(tokens[0::2], dtype=int) - 1
    lengths = np.asarray(tokens[1::2], dtype=int)
    for start, length in zip(starts, lengths, strict=True):
        label[start : start + length] = value


def label_image(rles: list[str], height: int, width: int) -> np.ndarray:
    label = np.zeros(height * width, dtype=np.int32)
    for i, rle in enumerate(rles):
        simple_decode_into(label, rle, i + 1)
    return label


def histogram2d_iou(truth: np.ndarray, pred: np.ndarray, n_truth: int, n_pred: int) -> np.ndarray:
    """IoU ``[T, P]`` from two flat label images (0 = background)."""
    edges_t = np.arange(n_truth + 2) - 0.5
    edges_p = np.arange(n_pred + 2) - 0.5
    inter = np.histogram2d(truth, pred, bins=(edges_t, edges_p))[0]
    area_t = np.histogram(truth, bins=edges_t)[0]
    area_p = np.histogram(pred, bins=edges_p)[0]
    union = area_t[:, None] + area_p[None, :] - inter
    with np.errstate(invalid="ignore"):  # 0/0 for an instance hidden under later ones
        return inter[1:, 1:] / union[1:, 1:]


def precision_at(iou: np.ndarray, t: float) -> float:
    n_t, n_p = iou.shape
    if n_t == 0 and n_p == 0:
        return 1.0
    matches = iou > t
    tp = int((matches.sum(axis=1) == 1).sum())
    fn = int((matches.sum(axis=1) == 0).sum())
    fp = int((matches.sum(axis=0) == 0).sum())
    return tp / (tp + fp + fn) if tp + fp + fn else 0.0


def histogram2d_score(truth_csv: Path, pred_csv: Path) -> float:
    """The whole baseline: read both CSVs, score every truth image, return the mean."""
    truth: dict[str, list[str]] = defaultdict(list)
    sizes: dict[str, tuple[int, int]] = {}
    with truth_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            sizes[row["id"]] = (int(row["height"]), int(row["width"]))
            if row["annotation"]:
                truth[row["id"]].append(row["annotation"])
    pred: dict[str, list[str]] = defaultdict(list)
    with pred_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["predicted"]:
                pred[row["id"]].append(row["predicted"])
    thresholds = np.arange(50, 100, 5) / 100
    scores = []
    for image_id, (h, w) in sizes.items():
        t_rles, p_rles = truth[image_id], pred[image_id]
        iou = histogram2d_iou(label_image(t_rles, h, w), label_image(p_rles, h, w), len(t_rles), len(p_rles))
        scores.append(np.mean([precision_at(iou, t) for t in thresholds]))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def rle_pixels(rle: str) -> np.ndarray:
    """Flat pixel indices (int64, sorted) of an RLE."""
    values = np.array(rle.split(), dtype=np.int64)
    starts, lengths = values[0::2] - 1, values[1::2]
    before = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum())) + np.repeat(starts - before, lengths)


def pixels_rle(pix: np.ndarray) -> str:
    """RLE of sorted, unique flat pixel indices."""
    breaks = np.flatnonzero(np.diff(pix) != 1)
    starts = np.concatenate([pix[:1], pix[breaks + 1]])
    ends = np.concatenate([pix[breaks], pix[-1:]]) + 1
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2], pairs[1::2] = starts + 1, ends - starts
    return " ".join(map(str, pairs.tolist()))


def resolve_overlaps(instances: list[np.ndarray], n_pixels: int) -> list[np.ndarray]:
    """Make pixel sets disjoint (a later instance wins a shared pixel); drop emptied ones."""
    label = np.zeros(n_pixels, dtype=np.int32)
    for i, pix in enumerate(instances):
        label[pix] = i + 1
    owned = [pix[label[pix] == i + 1] for i, pix in enumerate(instances)]
    return [pix for pix in owned if len(pix)]


def _shift(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(m)
    h, w = m.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = m[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def perturb(
    instances: list[np.ndarray], height: int, width: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Seeded imperfect predictions: drop, shift, dilate or erode cells; add false positives.

    Works on a padded crop around each cell; returns disjoint pixel sets.
    """
    out = []
    for pix in instances:
        action = rng.integers(6)
        if action == 0:
            continue  # a missed cell
        ys, xs = pix // width, pix % width
        y0, x0 = max(int(ys.min()) - 4, 0), max(int(xs.min()) - 4, 0)
        y1, x1 = min(int(ys.max()) + 5, height), min(int(xs.max()) + 5, width)
        crop = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        crop[ys - y0, xs - x0] = True
        near = [_shift(crop, 1, 0), _shift(crop, -1, 0), _shift(crop, 0, 1), _shift(crop, 0, -1)]
        if action == 1:
            crop = _shift(crop, int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
        elif action == 2:
            crop = crop | near[0] | near[1] | near[2] | near[3]
        elif action == 3:
            crop = crop & near[0] & near[1] & near[2] & near[3]
        cy, cx = np.nonzero(crop)
        if len(cy):
            out.append((cy + y0) * width + (cx + x0))
    for _ in range(max(len(instances) // 10, 1)):  # false positives: discs anywhere
        cy, cx, r = (
            int(rng.integers(10, height - 10)),
            int(rng.integers(10, width - 10)),
            int(rng.integers(4, 10)),
        )
        yy, xx = np.mgrid[cy - r : cy + r + 1, cx - r : cx + r + 1]
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        out.append(yy[inside] * width + xx[inside])
    return resolve_overlaps(out, height * width)


def write_inputs(out_dir: Path, copies: int, seed: int = 0) -> tuple[Path, Path, int]:
    """Write ``truth.csv`` and ``submission.csv`` (``\\n`` line ends, as Kaggle's files have);
    returns their paths and the image count."""
    images: dict[str, dict] = {}
    with REAL_CSV.open(newline="") as f:
        for row in csv.DictReader(f):
            img = images.setdefault(
                row["id"],
                {"h": int(row["height"]), "w": int(row["width"]), "cell": row["cell_type"], "pix": []},
            )
            img["pix"].append(rle_pixels(row["annotation"]))
    for img in images.values():  # the label-image method needs disjoint truth masks
        img["pix"] = resolve_overlaps(img["pix"], img["h"] * img["w"])
    rng = np.random.default_rng(seed)
    truth_rows, pred_rows = [], []
    for k in range(copies):
        for image_id, img in images.items():
            new_id = f"{image_id}{k:03d}"
            truth_rows += [[new_id, pixels_rle(p), img["w"], img["h"], img["cell"]] for p in img["pix"]]
            preds = [pixels_rle(p) for p in perturb(img["pix"], img["h"], img["w"], rng)]
            pred_rows += [[new_id, r] for r in preds] or [[new_id, ""]]
    truth_csv, pred_csv = out_dir / "truth.csv", out_dir / "submission.csv"
    for path, header, rows in (
        (truth_csv, TRUTH_HEADER, truth_rows),
        (pred_csv, ["id", "predicted"], pred_rows),
    ):
        with path.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    return truth_csv, pred_csv, copies * len(images)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def timed(commands: dict[str, list[str]], repeats: int, env: dict[str, str]) -> dict[str, tuple[float, str]]:
    """Best wall time of ``repeats`` runs of each command (a fresh process each; the commands
    take turns, so a busy machine slows them alike) and the last stdout of each."""
    best = {name: float("inf") for name in commands}
    out = dict.fromkeys(commands, "")
    for _ in range(repeats):
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            best[name] = min(best[name], time.perf_counter() - t0)
            out[name] = proc.stdout
    return {name: (best[name], out[name]) for name in commands}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20, help="copies of the 6 real images (default 20)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per method; the best counts (default 5)"
    )
    parser.add_argument("--histogram2d", nargs=2, metavar=("TRUTH", "PRED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.histogram2d:  # the baseline's own process
        print(json.dumps({"score": histogram2d_score(Path(args.histogram2d[0]), Path(args.histogram2d[1]))}))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        truth_csv, pred_csv, n_images = write_inputs(Path(tmp), args.copies)
        # Both processes run as an installed package would: byte-code cached after a first,
        # untimed run (in the temp folder, not the source tree), whatever PYTHONDONTWRITEBYTECODE.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        commands = {
            "ours": [
                sys.executable,
                "-m",
                "cellmask.cli",
                "score",
                "--truth",
                str(truth_csv),
                "--pred",
                str(pred_csv),
                "--json",
            ],
            "histogram2d": [
                sys.executable,
                str(Path(__file__).resolve()),
                "--histogram2d",
                str(truth_csv),
                str(pred_csv),
            ],
            "start-up": [sys.executable, "-c", "import numpy"],
        }
        timed(commands, 1, env)  # warm-up: byte-code, file cache
        results = timed(commands, args.repeats, env)
        # The label image keeps one instance per pixel: on the real train.csv, whose truth masks
        # overlap (and one is duplicated), it is not exact any more.
        self_pred = Path(tmp) / "self.csv"
        with REAL_CSV.open(newline="") as f, self_pred.open("w", newline="") as g:
            writer = csv.writer(g, lineterminator="\n")
            writer.writerow(["id", "predicted"])
            writer.writerows([row["id"], row["annotation"]] for row in csv.DictReader(f))
        from cellmask.metric import score_files  # here, not at the top: the baseline must not import it

        raw_ours = score_files(REAL_CSV, self_pred).score
        raw_base = histogram2d_score(REAL_CSV, self_pred)
    (t_ours, out_ours), (t_base, out_base) = results["ours"], results["histogram2d"]
    s_ours, s_base = json.loads(out_ours)["score"], json.loads(out_base)["score"]
    same = abs(s_ours - s_base) <= 1e-6
    print(f"python + numpy start-up alone: {results['start-up'][0]:.2f} s (best of {args.repeats})")
    print(
        f"metric: ours {t_ours:.2f} s, histogram2d {t_base:.2f} s, speed-up {t_base / t_ours:.1f}x "
        f"({n_images} images, score {s_ours:.6f} ours, {s_base:.6f} histogram2d"
        f"{', equal' if same else ', DIFFERENT'})"
    )
    print(
        f"real train.csv (overlapping truth masks) against itself: ours {raw_ours:.6f}, "
        f"histogram2d {raw_base:.6f}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
