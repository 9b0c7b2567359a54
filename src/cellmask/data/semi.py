"""Soft Teacher's data: weak/strong views of unlabeled images, and labeled + unlabeled batches.

Views
-----
Each unlabeled image gives two views built from the *original* image:

- a **weak** view for the teacher: flips and a scale (<= 1) about the image centre. The
  teacher's view is whole: the image shrinks inside its canvas, never zooms past it, because a
  cell the teacher cannot see is a negative at full weight for the student wherever the strong
  view shows it, and a cell the canvas cuts becomes a truncated pseudo-box
  (:func:`semi_data_config` rejects a weak view that would cut the image);
- a **strong** view for the student: flips, scale jitter and a shift (a crop or a pad of the
  scaled content), then brightness/contrast, Gaussian blur (the ``cellmask.data.transforms``
  ops, same keys as ``augment:``) and cutout (1-5 square patches filled with ``fill``).

Every view keeps the image's canvas size ``H x W`` (the detector's own transform resizes every
input to ``model.transform.min_size``, so a scale jitter must move content *within* the canvas to
have any effect). The geometry of a view is one 3x3 matrix ``A`` (float64) mapping pixel-edge
coordinates ``(x, y, 1)`` of the original image to those of the view (contract 8: a pixel
``i`` spans ``[i, i + 1]``). Teacher boxes in the weak view map onto the strong view with
``A_strong @ inv(A_weak)`` (:func:`relative_matrix`, :func:`transform_boxes`); flips, scales
and shifts keep boxes axis-aligned, so the mapping is exact.

Batches
-------
:class:`SemiDataset` item ``g`` is one *group*: ``ratio[0]`` labeled images
(:class:`~cellmask.data.datasets.DetectionDataset` items) and ``ratio[1]`` unlabeled ones
(:class:`TwoViewDataset` items); ``train.batch_size`` groups make a step. One epoch is one pass
over the longer stream (``ceil(n / ratio)``), the shorter one cycling. :func:`collate_semi`
batches groups into the dict ``SoftTeacher.training_step`` takes.

Config (``semi:`` section; keys and defaults in :data:`DEFAULT_SEMI_DATA`)::

    semi:
      unlabeled_dir: null       # default <data root>/train_semi_supervised/ (relative: to the root)
      ratio: [1, 1]             # labeled : unlabeled images per group (paper 1:1)
      epoch_length: null        # groups per epoch (null: one pass over the longer stream)
      crop: null                # [H, W]: both views of an unlabeled image come from one random
                                # window of it at native resolution (as augment.crop for labeled)
      weak: {hflip: 0.5, vflip: 0.5, scale: [0.8, 1.0], shift: 0.0, fill: 0}   # whole image
      strong:
        hflip: 0.5
        vflip: 0.5
        scale: [0.8, 1.2]       # factor drawn uniformly from this range
        shift: 0.1              # translation drawn from [-shift, shift] x (W, H)
        fill: 0                 # gray value of uncovered canvas and of cutout patches
        brightness_contrast: {p: 0.8, brightness: 0.3, contrast: 0.3}
        gaussian_blur: {p: 0.5, kernel: 5, sigma: [0.1, 2.0]}
        erase: {p: 0.7, count: [1, 5], size: [0.05, 0.2]}   # square side: fraction of min(H, W)

Every random draw comes from torch's RNG (reproducible under ``torch.manual_seed`` and the
engine's per-epoch loader seeding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from cellmask.config import deep_merge
from cellmask.data.augment import Crop
from cellmask.data.datasets import UnlabeledDataset, image_to_tensor
from cellmask.data.records import ImageRecord
from cellmask.data.transforms import build_transforms
from cellmask.errors import DataError

__all__ = [
    "DEFAULT_SEMI_DATA",
    "SemiDataset",
    "TwoViewDataset",
    "collate_semi",
    "erase_patches",
    "load_unlabeled",
    "relative_matrix",
    "sample_view",
    "semi_data_config",
    "transform_boxes",
    "view_matrix",
    "warp_image",
]

_VIEW_KEYS = {"hflip", "vflip", "scale", "shift", "fill"}
DEFAULT_SEMI_DATA: dict[str, Any] = {
    "unlabeled_dir": None,
    "ratio": [1, 1],
    "epoch_length": None,
    "crop": None,
    "weak": {"hflip": 0.5, "vflip": 0.5, "scale": [0.8, 1.0], "shift": 0.0, "fill": 0},
    "strong": {
        "hflip": 0.5,
        "vflip": 0.5,
        "scale": [0.8, 1.2],
        "shift": 0.1,
        "fill": 0,
        "brightness_contrast": {"p": 0.8, "brightness": 0.3, "contrast": 0.3},
        "gaussian_blur": {"p": 0.5, "kernel": 5, "sigma": [0.1, 2.0]},
        "erase": {"p": 0.7, "count": [1, 5], "size": [0.05, 0.2]},
    },
}
"""The data keys of the ``semi:`` section (the model's keys live in ``cellmask.models.soft_teacher``)."""


def semi_data_config(semi_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The data keys of a ``semi:`` section merged over :data:`DEFAULT_SEMI_DATA` (others dropped).

    Raises:
        ValueError: an unknown key inside ``weak``/``strong``/``erase``, a weak view that does
            not keep the whole image on its canvas (largest scale ``s`` and shift ``d`` must
            satisfy ``(1 - s) / 2 >= d``), or a ratio that is not two integers >= 1.
    """
    given = {k: v for k, v in (semi_cfg or {}).items() if k in DEFAULT_SEMI_DATA}
    cfg = deep_merge(DEFAULT_SEMI_DATA, given)
    for view in ("weak", "strong"):
        known = _VIEW_KEYS | (
            {"brightness_contrast", "gaussian_blur", "erase"} if view == "strong" else set()
        )
        unknown = sorted(set(cfg[view]) - known)
        if unknown:
            raise ValueError(f"semi.{view}: unknown key(s) {unknown}; expected {sorted(known)}")
    lo, hi = _scale_range(cfg["weak"].get("scale"))
    shift = float(cfg["weak"].get("shift") or 0.0)
    if (1.0 - hi) / 2.0 < shift - 1e-12:
        raise ValueError(
            f"semi.weak must keep the teacher's view whole (scale <= 1 and shift <= (1 - scale) / 2), "
            f"got scale [{lo}, {hi}] and shift {shift}: the teacher would miss cells at the borders "
            "that the strong view shows"
        )
    erase = cfg["strong"].get("erase") or {}
    unknown = sorted(set(erase) - {"p", "count", "size"})
    if unknown:
        raise ValueError(f"semi.strong.erase: unknown key(s) {unknown}; expected ['count', 'p', 'size']")
    ratio = cfg["ratio"]
    if not isinstance(ratio, Sequence) or len(ratio) != 2 or any(int(r) < 1 for r in ratio):
        raise ValueError(
            f"semi.ratio must be [labeled, unlabeled] images per group, both >= 1, got {ratio!r}"
        )
    cfg["ratio"] = [int(r) for r in ratio]
    return cfg


# --------------------------------------------------------------------------------------------
# geometry: 3x3 matrices on pixel-edge coordinates


def view_matrix(
    height: int,
    width: int,
    hflip: bool = False,
    vflip: bool = False,
    scale: float = 1.0,
    shift: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """The 3x3 float64 matrix of a view: original pixel-edge ``(x, y, 1)`` -> the view's.

    The view flips (about the centre), scales by ``scale`` about the image centre and then
    translates by ``shift = (dx, dy)`` pixels, on a canvas of the same ``height x width``.
    ``scale > 1`` with a shift crops the scaled image; ``scale < 1`` pads it.
    """
    cx, cy = width / 2.0, height / 2.0
    sx = -scale if hflip else scale
    sy = -scale if vflip else scale
    return np.array(
        [[sx, 0.0, cx + shift[0] - sx * cx], [0.0, sy, cy + shift[1] - sy * cy], [0.0, 0.0, 1.0]],
        dtype=np.float64,
    )


def relative_matrix(
    from_matrix: torch.Tensor | np.ndarray, to_matrix: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """``to @ inv(from)``: coordinates of the ``from`` view -> the ``to`` view (both of one image).

    Accepts ``[3, 3]`` or batched ``[B, 3, 3]``; computed in float64, returned float64.
    """
    a = torch.as_tensor(from_matrix, dtype=torch.float64)
    b = torch.as_tensor(to_matrix, dtype=torch.float64, device=a.device)
    return b @ torch.linalg.inv(a)


def transform_boxes(
    boxes: torch.Tensor, matrix: torch.Tensor | np.ndarray, clip_to: tuple[int, int] | None = None
) -> torch.Tensor:
    """Map xyxy boxes through a 3x3 matrix: the four corners, then their min/max.

    Exact for axis-aligned maps (flips, scales, shifts); for a rotation it gives the box of the
    rotated box. Computed in float32 with autocast off (contract 9).

    Args:
        boxes: ``[N, 4]`` xyxy (any float dtype, any device).
        matrix: ``[3, 3]`` mapping ``(x, y, 1)`` of the boxes' frame to the target frame.
        clip_to: ``(H, W)`` of the target canvas: coordinates clamped to ``[0, W] x [0, H]``.

    Returns:
        float32 ``[N, 4]`` on ``boxes``' device.
    """
    device = boxes.device
    with torch.autocast(device_type=device.type, enabled=False):
        b = boxes.reshape(-1, 4).to(torch.float32)
        m = torch.as_tensor(matrix, device=device).to(torch.float32)
        xs = b[:, [0, 2, 0, 2]]
        ys = b[:, [1, 1, 3, 3]]
        tx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        ty = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        out = torch.stack([tx.amin(1), ty.amin(1), tx.amax(1), ty.amax(1)], dim=1)
        if clip_to is not None:
            height, width = clip_to
            out[:, 0::2] = out[:, 0::2].clamp(0, float(width))
            out[:, 1::2] = out[:, 1::2].clamp(0, float(height))
    return out


def warp_image(image: np.ndarray, matrix: np.ndarray, fill: float = 0) -> np.ndarray:
    """Warp an ``[H, W]`` (or ``[H, W, C]``) image by a view matrix onto a canvas of the same size.

    The matrix works on pixel edges; OpenCV samples pixel centres, so the map given to
    ``cv2.warpAffine`` is ``T(-0.5) @ matrix @ T(0.5)``. Bilinear, uncovered pixels ``fill``.
    """
    height, width = image.shape[:2]
    centre = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    back = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    m = back @ np.asarray(matrix, dtype=np.float64) @ centre
    return cv2.warpAffine(
        np.ascontiguousarray(image),
        m[:2],
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=float(fill),
    )


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _scale_range(value: Any) -> tuple[float, float]:
    """A view's ``scale``: ``[lo, hi]``, a scalar ``r`` (``[1 - r, 1 + r]``) or null (1)."""
    if value is None:
        return 1.0, 1.0
    if np.isscalar(value):
        return 1.0 - float(value), 1.0 + float(value)
    return float(value[0]), float(value[1])


def sample_view(view_cfg: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Draw a view matrix from a ``weak``/``strong`` section (torch RNG): flips with their
    probabilities, scale from ``[lo, hi]``, shift from ``[-shift, shift] x (W, H)``."""
    hflip = float(torch.rand(())) < float(view_cfg.get("hflip") or 0.0)
    vflip = float(torch.rand(())) < float(view_cfg.get("vflip") or 0.0)
    scale = _uniform(*_scale_range(view_cfg.get("scale")))
    shift = float(view_cfg.get("shift") or 0.0)
    dx = _uniform(-shift, shift) * width
    dy = _uniform(-shift, shift) * height
    return view_matrix(height, width, hflip, vflip, scale, (dx, dy))


def erase_patches(
    image: torch.Tensor,
    count: Sequence[int] = (1, 5),
    size: Sequence[float] = (0.05, 0.2),
    fill: float = 0,
) -> torch.Tensor:
    """Cutout: fill ``randint(count)`` square patches (side ``U(size) x min(H, W)``, anywhere
    inside the image) with ``fill``; torch RNG. ``image`` ``[C, H, W]``; returns a new tensor."""
    out = image.clone()
    height, width = out.shape[-2:]
    n = int(torch.randint(int(count[0]), int(count[1]) + 1, ()))
    for _ in range(n):
        side = max(1, round(_uniform(float(size[0]), float(size[1])) * min(height, width)))
        y0 = int(torch.randint(0, max(height - side, 0) + 1, ()))
        x0 = int(torch.randint(0, max(width - side, 0) + 1, ()))
        out[..., y0 : y0 + side, x0 : x0 + side] = fill
    return out


# --------------------------------------------------------------------------------------------
# datasets


def load_unlabeled(data_root: str | Path, unlabeled_dir: str | Path | None = None) -> list[ImageRecord]:
    """The unlabeled images' records: ``unlabeled_dir`` (relative: to ``data_root``), by default
    ``<data_root>/train_semi_supervised/``.

    Raises:
        DataError: the folder is missing or holds no image (one message naming the folder).
    """
    from cellmask.data.sartorius import IMAGE_SUFFIXES, list_images
    from cellmask.paths import CompetitionLayout

    root = Path(data_root)
    if unlabeled_dir is None:
        folder = CompetitionLayout(root).semi_supervised_dir
    else:
        folder = Path(unlabeled_dir)
        folder = folder if folder.is_absolute() else root / folder
    if not folder.is_dir():
        raise DataError(
            f"{folder}: no such folder of unlabeled images (Soft Teacher reads semi.unlabeled_dir, "
            "default <data root>/train_semi_supervised/)"
        )
    records = list_images(folder)
    if not records:
        raise DataError(
            f"{folder}: no unlabeled images ({', '.join(IMAGE_SUFFIXES)}) for Soft Teacher's unlabeled stream"
        )
    return records


class TwoViewDataset(UnlabeledDataset):
    """Unlabeled images as a weak and a strong view with the matrices of both.

    Items: ``{"weak": float32 [3, H, W], "strong": float32 [3, H, W], "weak_matrix": float64
    [3, 3], "strong_matrix": float64 [3, 3], "index": int}`` (images in ``0..1``, as the
    detectors take them; matrices map original pixel edges to each view's). With ``crop`` the
    original is a random ``crop`` window of the image (``H x W`` then its size), drawn once for
    both views.

    Args:
        records: unlabeled records (:func:`load_unlabeled`).
        weak, strong: the ``semi.weak`` / ``semi.strong`` sections (merged over the defaults
            by :func:`semi_data_config`).
        image_cache: keep decoded images in memory (per process).
        crop: ``(H, W)`` of the window (``semi.crop``), or ``None`` for whole images.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        weak: Mapping[str, Any] | None = None,
        strong: Mapping[str, Any] | None = None,
        image_cache: bool = False,
        crop: Sequence[int] | None = None,
    ) -> None:
        super().__init__(records, transforms=None, image_cache=image_cache)
        self.crop = None if crop is None else Crop((int(crop[0]), int(crop[1])))
        defaults = semi_data_config({"weak": weak or {}, "strong": strong or {}})
        self.weak = defaults["weak"]
        self.strong = defaults["strong"]
        photometric = {
            "hflip": 0,
            "vflip": 0,
            "shift_scale_rotate": None,
            "median_blur": None,
            "brightness_contrast": self.strong.get("brightness_contrast"),
            "gaussian_blur": self.strong.get("gaussian_blur"),
        }
        self.photometric = build_transforms(photometric, train=True)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        image = self.source.read(index)
        if self.crop is not None:  # one window: both views (and their matrices) are of it
            image = self.crop.image(torch.from_numpy(image)[None], self.crop.draw())[0].numpy()
        height, width = image.shape[:2]
        weak_m = sample_view(self.weak, height, width)
        strong_m = sample_view(self.strong, height, width)
        weak = warp_image(image, weak_m, self.weak.get("fill", 0))
        strong = tv_tensors.Image(
            torch.from_numpy(warp_image(image, strong_m, self.strong.get("fill", 0)))[None]
        )
        strong = self.photometric(strong).as_subclass(torch.Tensor)
        erase = self.strong.get("erase")
        if erase and float(torch.rand(())) < float(erase.get("p", 1.0)):
            strong = erase_patches(strong, erase["count"], erase["size"], self.strong.get("fill", 0))
        return {
            "weak": image_to_tensor(weak),
            "strong": image_to_tensor(strong),
            "weak_matrix": torch.from_numpy(weak_m),
            "strong_matrix": torch.from_numpy(strong_m),
            "index": int(index),
        }


class SemiDataset(Dataset):
    """Groups of ``ratio[0]`` labeled and ``ratio[1]`` unlabeled items (see the module doc).

    Group ``g`` holds labeled items ``(g * ratio[0] + j) % n_labeled`` and unlabeled items
    ``(g * ratio[1] + j) % n_unlabeled``: one epoch (``len``, by default ``max(ceil(n_labeled /
    ratio[0]), ceil(n_unlabeled / ratio[1]))``) sees every image of the longer stream once and
    cycles the shorter one; the sampler shuffles the groups.
    """

    def __init__(
        self,
        labeled: Dataset,
        unlabeled: Dataset,
        ratio: Sequence[int] = (1, 1),
        epoch_length: int | None = None,
    ) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled
        self.ratio = (int(ratio[0]), int(ratio[1]))
        if min(self.ratio) < 1:
            raise ValueError(f"ratio must be two integers >= 1, got {ratio!r}")
        n_lab, n_unl = len(labeled), len(unlabeled)  # type: ignore[arg-type]
        if n_lab == 0 or n_unl == 0:
            raise DataError(f"Soft Teacher needs labeled and unlabeled images, got {n_lab} and {n_unl}")
        self.n_labeled, self.n_unlabeled = n_lab, n_unl
        natural = max(math.ceil(n_lab / self.ratio[0]), math.ceil(n_unl / self.ratio[1]))
        self.length = int(epoch_length) if epoch_length else natural

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, group: int) -> dict[str, list[Any]]:
        r_lab, r_unl = self.ratio
        return {
            "labeled": [self.labeled[(group * r_lab + j) % self.n_labeled] for j in range(r_lab)],
            "unlabeled": [self.unlabeled[(group * r_unl + j) % self.n_unlabeled] for j in range(r_unl)],
        }


def collate_semi(groups: Sequence[Mapping[str, list[Any]]]) -> dict[str, Any]:
    """Groups -> the training batch of ``SoftTeacher.training_step``::

    {"labeled": ([image [3, H, W]], [target]),
     "weak": [image], "strong": [image],
     "weak_matrix": float64 [B, 3, 3], "strong_matrix": float64 [B, 3, 3],
     "unlabeled_index": int64 [B]}
    """
    labeled = [item for g in groups for item in g["labeled"]]
    views = [item for g in groups for item in g["unlabeled"]]
    images = [image for image, _ in labeled]
    targets = [target for _, target in labeled]
    empty = torch.zeros((0, 3, 3), dtype=torch.float64)
    return {
        "labeled": (images, targets),
        "weak": [v["weak"] for v in views],
        "strong": [v["strong"] for v in views],
        "weak_matrix": torch.stack([v["weak_matrix"] for v in views]) if views else empty,
        "strong_matrix": torch.stack([v["strong_matrix"] for v in views]) if views else empty,
        "unlabeled_index": torch.tensor([v["index"] for v in views], dtype=torch.int64),
    }
