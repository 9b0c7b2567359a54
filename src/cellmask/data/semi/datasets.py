"""Soft Teacher's datasets: unlabeled images as weak/strong view pairs (:class:`TwoViewDataset`),
labeled + unlabeled groups (:class:`SemiDataset`) and their batches (:func:`collate_semi`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from cellmask.data.augment import Crop
from cellmask.data.datasets import UnlabeledDataset, image_to_tensor
from cellmask.data.records import ImageRecord
from cellmask.data.semi.config import semi_data_config
from cellmask.data.semi.pipelines import draw_view, render_view
from cellmask.data.semi.views import erase_patches
from cellmask.data.transforms import build_transforms
from cellmask.errors import DataError


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

    A view is drawn by :func:`~cellmask.data.semi.pipelines.draw_view` and rendered by one warp
    (:func:`~cellmask.data.semi.pipelines.render_view`: with [22]'s colour op before or after it);
    the strong view then takes the ``brightness_contrast``/``gaussian_blur`` ops (where set) and
    cutout (``erase``: ``shape: image`` on the resized image's frame, ``square`` on the canvas).

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
        weak_draw = draw_view(self.weak, height, width)
        strong_draw = draw_view(self.strong, height, width)
        weak = render_view(image, weak_draw, self.weak.get("fill", 0))
        fill = self.strong.get("fill", 0)
        strong = tv_tensors.Image(torch.from_numpy(render_view(image, strong_draw, fill))[None])
        strong = self.photometric(strong).as_subclass(torch.Tensor)
        erase = self.strong.get("erase")
        if erase and float(torch.rand(())) < float(erase.get("p", 1.0)):
            shape = erase.get("shape", "square")
            strong = erase_patches(strong, erase["count"], erase["size"], fill, shape, strong_draw.frame)
        return {
            "weak": image_to_tensor(weak),
            "strong": image_to_tensor(strong),
            "weak_matrix": torch.from_numpy(weak_draw.matrix),
            "strong_matrix": torch.from_numpy(strong_draw.matrix),
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
