"""Writing a synthetic dataset in the competition's layout (and LIVECell's COCO files), and
``cellmask synth``.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cellmask.data.sartorius import TRAIN_COLUMNS
from cellmask.data.synthetic.cells import Instance
from cellmask.data.synthetic.render import synth_image
from cellmask.data.synthetic.styles import COMPETITION_TYPES, LIVECELL_TYPES
from cellmask.errors import DataError

__all__ = ["cli_synth", "parse_size", "write_dataset", "written_by_synth"]

_MIN_SIZE = 32
_COCO_DESCRIPTION = "cellmask synthetic LIVECell stand-in"

_SAMPLE_PREFIX = {
    "shsy5y": ("shsy5y[diff]",),
    "cort": ("cort[oka-high]", "cort[oka-low]", "cort[pre-treat]", "cort[debris]"),
    "astro": ("astros[cereb]", "astro[hippo]"),
}


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"HxW"`` (e.g. ``"520x704"``) into ``(height, width)``.

    Raises:
        DataError: not two positive integers joined by ``x``, or a side below 32 pixels.
    """
    parts = str(text).lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise DataError(f"--size must be HxW with two integers, e.g. 520x704; got {text!r}")
    height, width = int(parts[0]), int(parts[1])
    if height < _MIN_SIZE or width < _MIN_SIZE:
        raise DataError(f"--size {text!r}: height and width must be at least {_MIN_SIZE} pixels")
    return height, width


def _image_ids(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct 12-character lowercase hex ids."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        for v in rng.integers(0, 1 << 48, size=n - len(ids), dtype=np.int64):
            s = f"{int(v):012x}"
            if s not in seen:
                seen.add(s)
                ids.append(s)
    return ids


def _train_meta(rng: np.random.Generator, cell_type: str, index: int, previous: list[dict]) -> dict:
    """Plausible plate metadata; about a third of the images share a well with an earlier one,
    and every seventh image (the 4th, 11th, ...) has an empty ``sample_id`` (as some real rows do)."""
    same = [m for m in previous if m["cell_type"] == cell_type and m["sample_id"]]
    if same and rng.random() < 0.35:
        base = dict(same[int(rng.integers(len(same)))])
    else:
        prefix = _SAMPLE_PREFIX[cell_type][int(rng.integers(len(_SAMPLE_PREFIX[cell_type])))]
        well = f"{'ABCDEFGH'[int(rng.integers(8))]}{int(rng.integers(1, 13))}-{int(rng.integers(1, 5))}"
        vessel = int(rng.integers(300, 800))
        date = np.datetime64("2019-06-01") + int(rng.integers(0, 540))
        base = {
            "sample_id": f"{prefix}_{well}_Vessel-{vessel}_Ph_{int(rng.integers(1, 5))}",
            "sample_date": str(date),
        }
    minutes = int(rng.integers(1, 48)) * 30
    hours, mins = divmod(minutes, 60)
    meta = {
        "cell_type": cell_type,
        "plate_time": f"{hours:02d}h{mins:02d}m00s",
        "sample_date": base["sample_date"],
        "sample_id": base["sample_id"] if index % 7 != 3 else "",
        "elapsed_timedelta": f"{hours // 24} days {hours % 24:02d}:{mins:02d}:00",
    }
    previous.append({**meta, "sample_id": base["sample_id"]})
    return meta


def _livecell_splits(n: int) -> list[str]:
    """Split names for ``n`` LIVECell images: about 70/10/20 %, each split non-empty once ``n >= 3``."""
    if n <= 0:
        return []
    if n < 3:
        return ["train", "val"][:n]
    n_val = max(1, round(0.1 * n))
    n_test = max(1, round(0.2 * n))
    return ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test


def _livecell_name(rng: np.random.Generator, cell_type: str) -> str:
    well = f"{'ABCDEFGH'[int(rng.integers(8))]}{int(rng.integers(1, 13))}"
    hours = int(rng.integers(0, 25)) * 4
    return f"{cell_type}_Phase_{well}_{int(rng.integers(1, 5))}_{hours // 24:02d}d{hours % 24:02d}h00m_{int(rng.integers(1, 5))}.tif"


def _write_image(path: Path, image: np.ndarray) -> None:
    """Write a uint8 ``[H, W]`` image (PNG or TIFF by suffix)."""
    if not cv2.imwrite(str(path), image):
        raise DataError(f"{path}: could not write image")


def _progress(total: int) -> Any:
    """A tqdm bar over images (silent when stderr is not a terminal), or ``None`` without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="cellmask synth", unit="img", disable=None, file=sys.stderr)


@dataclass(frozen=True)
class _Layout:
    """Where every part of the competition layout lives under one root."""

    root: Path

    @property
    def folders(self) -> dict[str, Path]:
        lc = self.root / "LIVECell_dataset_2021"
        return {
            "train": self.root / "train",
            "unlabeled": self.root / "train_semi_supervised",
            "test": self.root / "test",
            "lc_train": lc / "images" / "livecell_train_val_images",
            "lc_val": lc / "images" / "livecell_train_val_images",
            "lc_test": lc / "images" / "livecell_test_images",
            "lc_ann": lc / "annotations" / "LIVECell",
        }

    def coco(self, split: str) -> Path:
        return self.folders["lc_ann"] / f"livecell_coco_{split}.json"


def written_by_synth(root: Path) -> bool:
    """True when ``root`` holds a dataset :func:`write_dataset` wrote (its LIVECell COCO file
    carries our description, even with no LIVECell image)."""
    try:
        coco = _Layout(Path(root)).coco("train")
        return json.loads(coco.read_text())["info"]["description"] == _COCO_DESCRIPTION
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _prepare(layout: _Layout) -> None:
    """Create the folders; clear the images of an earlier synthetic run so the layout stays exact.

    Raises:
        DataError: the root is a file, or it already holds images that ``cellmask synth`` did
            not write (e.g. the real competition data): those are never deleted.
    """
    root = layout.root
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: exists and is not a folder")
    stale = [
        p
        for d in set(layout.folders.values())
        if d.is_dir()
        for p in d.iterdir()
        if p.is_file() and p.suffix.lower() in (".png", ".tif", ".json")
    ]
    if stale:
        if not written_by_synth(root):
            raise DataError(
                f"{root}: already holds image or annotation files not written by `cellmask synth`; "
                "choose an empty or new folder"
            )
        for p in stale:
            p.unlink()
    for d in layout.folders.values():
        d.mkdir(parents=True, exist_ok=True)


def _write_train(layout: _Layout, ids: list[str], seed: int, size: tuple[int, int], bar: Any) -> int:
    """Annotated images and ``train.csv``; cell types cycle shsy5y, cort, astro. Returns #instances."""
    height, width = size
    meta_rng = np.random.default_rng([seed, 98])
    previous: list[dict] = []
    n_instances = 0
    with (layout.root / "train.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(TRAIN_COLUMNS)
        for i, image_id in enumerate(ids):
            cell_type = COMPETITION_TYPES[i % 3]
            sample = synth_image(cell_type, height, width, np.random.default_rng([seed, 0, i]))
            meta = _train_meta(meta_rng, cell_type, i, previous)
            _write_image(layout.folders["train"] / f"{image_id}.png", sample.image)
            tail = [width, height, cell_type, *(meta[k] for k in TRAIN_COLUMNS[5:])]
            writer.writerows([image_id, rle, *tail] for rle in sample.rles())
            n_instances += len(sample)
            if bar is not None:
                bar.update()
    return n_instances


def _write_unannotated(
    folder: Path,
    ids: list[str],
    types: tuple[str, ...],
    stream: int,
    seed: int,
    size: tuple[int, int],
    bar: Any,
) -> None:
    """Images without annotations (``train_semi_supervised/``, ``test/``), types cycling ``types``."""
    for i, image_id in enumerate(ids):
        sample = synth_image(types[i % len(types)], *size, np.random.default_rng([seed, stream, i]))
        _write_image(folder / f"{image_id}.png", sample.image)
        if bar is not None:
            bar.update()


def _coco_annotation(ann_id: int, image_id: int, inst: Instance) -> dict | None:
    """One LIVECell-style COCO annotation (polygons, xywh box in pixel edges); ``None`` if degenerate."""
    polygons = inst.polygons()
    if not polygons:
        return None
    x0, y0, x1, y1 = (float(v) for v in inst.box())
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "segmentation": polygons,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": float(inst.area),
        "iscrowd": 0,
    }


def _write_livecell(layout: _Layout, n: int, seed: int, size: tuple[int, int], bar: Any) -> int:
    """LIVECell images (types cycle over :data:`LIVECELL_TYPES`) and the three COCO files, with
    ``annotations`` a dict keyed by the id as a string, as LIVECell ships them. Returns #instances."""
    name_rng = np.random.default_rng([seed, 97])
    coco: dict[str, dict] = {s: {"images": [], "annotations": {}} for s in ("train", "val", "test")}
    used: set[str] = set()
    ann_id = 1
    for i, split in enumerate(_livecell_splits(n)):
        cell_type = LIVECELL_TYPES[i % len(LIVECELL_TYPES)]
        name = _livecell_name(name_rng, cell_type)
        while name in used:
            name = _livecell_name(name_rng, cell_type)
        used.add(name)
        sample = synth_image(cell_type, *size, np.random.default_rng([seed, 3, i]))
        _write_image(layout.folders[f"lc_{split}"] / name, sample.image)
        image_id = i + 1
        coco[split]["images"].append({"id": image_id, "file_name": name, "width": size[1], "height": size[0]})
        for inst in sample.instances:
            ann = _coco_annotation(ann_id, image_id, inst)
            if ann is not None:
                coco[split]["annotations"][str(ann_id)] = ann
                ann_id += 1
        if bar is not None:
            bar.update()
    for split, data in coco.items():
        doc = {
            "info": {"description": _COCO_DESCRIPTION, "version": "1.0"},
            "licenses": [],
            "images": data["images"],
            "annotations": data["annotations"],
            "categories": [{"id": 1, "name": "cell", "supercategory": "cell"}],
        }
        layout.coco(split).write_text(json.dumps(doc, separators=(",", ":")))
    return ann_id - 1


def write_dataset(
    out: str | Path,
    n_train: int = 24,
    n_unlabeled: int = 6,
    n_test: int = 3,
    n_livecell: int = 8,
    seed: int = 0,
    size: tuple[int, int] = (520, 704),
) -> dict[str, int]:
    """Write a synthetic dataset in the competition's layout under ``out`` (see module docstring).

    Each image has its own random stream derived from ``(seed, split, index)``, so asking for
    more test images does not change the training images. Re-running into the same folder
    replaces the earlier synthetic dataset; a folder holding other data is refused.

    Returns:
        counts: ``{"train", "instances", "unlabeled", "test", "livecell", "livecell_instances"}``.

    Raises:
        DataError: a negative count, a bad size, or an output folder that holds other data.
    """
    counts = {"train": n_train, "unlabeled": n_unlabeled, "test": n_test, "livecell": n_livecell}
    for name, n in counts.items():
        if n < 0:
            raise DataError(f"--{name} must be >= 0, got {n}")
    if min(size) < _MIN_SIZE:
        raise DataError(f"image size {size[0]}x{size[1]} is too small: both sides must be >= {_MIN_SIZE}")
    layout = _Layout(Path(out))
    _prepare(layout)
    ids = _image_ids(np.random.default_rng([seed, 99]), n_train + n_unlabeled + n_test)
    train_ids, unl_ids, test_ids = (
        ids[:n_train],
        ids[n_train : n_train + n_unlabeled],
        ids[n_train + n_unlabeled :],
    )
    bar = _progress(sum(counts.values()))
    try:
        counts["instances"] = _write_train(layout, train_ids, seed, size, bar)
        # Unlabeled and test images mix the types in other orders than train.
        _write_unannotated(
            layout.folders["unlabeled"], unl_ids, ("cort", "astro", "shsy5y"), 1, seed, size, bar
        )
        _write_unannotated(layout.folders["test"], test_ids, ("astro", "shsy5y", "cort"), 2, seed, size, bar)
        with (layout.root / "sample_submission.csv").open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["id", "predicted"])
            writer.writerows([image_id, ""] for image_id in test_ids)
        counts["livecell_instances"] = _write_livecell(layout, n_livecell, seed, size, bar)
    finally:
        if bar is not None:
            bar.close()
    return counts


def cli_synth(args) -> int:
    """``cellmask synth OUT [--train N] [--unlabeled N] [--test N] [--livecell N] [--seed S] [--size HxW]``."""
    size = parse_size(args.size)
    counts = write_dataset(
        args.out,
        n_train=args.train,
        n_unlabeled=args.unlabeled,
        n_test=args.test,
        n_livecell=args.livecell,
        seed=args.seed,
        size=size,
    )
    print(
        f"wrote {counts['train']} train images ({counts['instances']} instances), "
        f"{counts['unlabeled']} unlabeled, {counts['test']} test, {counts['livecell']} LIVECell images "
        f"({counts['livecell_instances']} instances) to {args.out}"
    )
    return 0
