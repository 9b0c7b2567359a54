"""Everything after the detectors, for one image: class, thresholds, masks, overlaps, RLE.

:func:`finish_detections` turns (fused) detections into the image's final instances::

    class vote (option class_vote)        every box gets the image's class, or keeps its own
    per-class score thresholds            on the box scores, before any mask is made
    masks of the kept boxes               the segmenter (crop, segment, paste), or a model's own
    re-scoring (option rescore)           score x mean mask probability inside the mask
    overlap removal + minimum areas       higher score keeps contested pixels
    -> Instances                          windowed disjoint masks, one RLE row each

Masks stay in per-box windows end to end (:class:`~cellmask.models.segmenter.PastedMasks`
from the paste, :func:`~cellmask.predict.postprocess.remove_overlaps_windows`,
:func:`~cellmask.submission.window_to_rle`): no ``[N, H, W]`` stack is built for an image of
1000 cells.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cellmask.predict.postprocess import filter_by_score, min_area_for, remove_overlaps_windows
from cellmask.predict.tta import Detections

__all__ = [
    "Instances",
    "MaskFn",
    "ProbabilityStore",
    "finish_detections",
    "image_class",
    "own_masks",
    "segmenter_masks",
    "vote_entries",
]

MaskFn = Callable[[np.ndarray], tuple[np.ndarray, list[np.ndarray], np.ndarray]]
"""``keep indices [K] -> (offsets int64 [K, 2], K bool windows, confidences float32 [K])``."""


@dataclass
class Instances:
    """The final, disjoint instances of one image.

    Attributes:
        image_size: ``(H, W)``.
        boxes: float64 ``[N, 4]`` the (fused) detection boxes they came from, pixel xyxy.
        scores: float32 ``[N]`` descending (re-scored when that option is on).
        labels: int64 ``[N]``.
        offsets: int64 ``[N, 2]`` ``(row, col)`` of each window's top-left pixel.
        windows: ``N`` bool arrays, each instance's pixels from its offset.
    """

    image_size: tuple[int, int]
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    windows: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.windows)

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> Instances:
        return cls(
            (int(image_size[0]), int(image_size[1])),
            np.zeros((0, 4)),
            np.zeros(0, np.float32),
            np.zeros(0, np.int64),
            np.zeros((0, 2), np.int64),
            [],
        )

    def rles(self) -> list[str]:
        """One row-major RLE per instance (the submission's ``predicted`` values)."""
        from cellmask.submission import window_to_rle

        width = self.image_size[1]
        return [window_to_rle(w, o, width) for w, o in zip(self.windows, self.offsets, strict=True)]

    def areas(self) -> np.ndarray:
        """int64 ``[N]`` pixels per instance."""
        return np.array([int(np.count_nonzero(w)) for w in self.windows], dtype=np.int64)

    def dense(self) -> np.ndarray:
        """bool ``[N, H, W]`` (for small images and tests; 1 byte per pixel per instance)."""
        out = np.zeros((len(self), *self.image_size), dtype=bool)
        for i, (win, (y0, x0)) in enumerate(zip(self.windows, self.offsets, strict=True)):
            out[i, y0 : y0 + win.shape[0], x0 : x0 + win.shape[1]] = win
        return out

    def label_image(self) -> np.ndarray:
        """int32 ``[H, W]``: instance ``i`` painted as ``i + 1`` (0 background), for overlays."""
        out = np.zeros(self.image_size, dtype=np.int32)
        for i, (win, (y0, x0)) in enumerate(zip(self.windows, self.offsets, strict=True)):
            view = out[y0 : y0 + win.shape[0], x0 : x0 + win.shape[1]]
            view[win] = i + 1
        return out


def image_class(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    scores: Sequence[float] | np.ndarray | torch.Tensor,
    min_score: float = 0.25,
) -> int | None:
    """The image's cell type by a score-weighted majority vote of its detections.

    Each image holds one cell type. Detections scoring at least ``min_score`` vote with their
    score (all detections vote when none reaches it); the label with the largest summed score
    wins, ties going to the label with more votes, then to the lower label. Weighting by score
    and leaving out the many low-score boxes is what makes the vote robust: on the demo's
    validation images a plain count over every box picked the wrong type in 4 of 16 images
    (sparse astro images have many weak "cort" boxes), the weighted vote over boxes >= 0.25 in
    none.

    Returns:
        the winning label (1 shsy5y, 2 cort, 3 astro), or ``None`` without any detection.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    if labels.size == 0:
        return None
    voters = scores >= min_score
    if not voters.any():
        voters[:] = True
    votes, weights = labels[voters], scores[voters]
    candidates = np.unique(votes)  # ascending: the stable sort below leaves full ties to the lower label
    sums = np.array([weights[votes == c].sum() for c in candidates])
    counts = np.array([np.count_nonzero(votes == c) for c in candidates])
    best = np.lexsort((-counts, -sums))[0]  # the last key is the primary one
    return int(candidates[best])


def vote_entries(entries: Sequence[Detections], min_score: float = 0.25) -> list[Detections]:
    """Every entry relabelled to the class :func:`image_class` votes over all of them together
    (the class vote *before* WBF: ``predict.vote_before_wbf``). Boxes and scores are unchanged;
    without any detection the entries are returned as they are.

    Args:
        entries: one :class:`Detections` per (branch, view) of one image.
    """
    entries = list(entries)
    if not any(len(e) for e in entries):
        return entries
    label = image_class(
        np.concatenate([e.labels for e in entries]), np.concatenate([e.scores for e in entries]), min_score
    )
    return [Detections(e.boxes, e.scores, np.full(len(e), label, dtype=np.int64)) for e in entries]


def _select(
    dets: Detections, opts: Mapping[str, Any], image_label: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(kept indices, labels of all detections)`` after the class vote (or ``image_label``,
    the image-type classifier's, when given) and the thresholds."""
    labels = dets.labels
    if opts["class_vote"]:
        label = image_label or image_class(dets.labels, dets.scores, float(opts["vote_min_score"]))
        labels = np.full(len(dets), label, dtype=np.int64)
    thresholds = opts["score_thresholds"]
    if thresholds is None:
        return np.arange(len(dets)), labels
    return np.flatnonzero(filter_by_score(dets.scores, labels, thresholds)), labels


def finish_detections(
    dets: Detections,
    image_size: tuple[int, int],
    opts: Mapping[str, Any],
    masks_fn: MaskFn,
    image_label: int | None = None,
) -> Instances:
    """The steps after detection (module docstring) for one image.

    Args:
        dets: the image's (fused) detections, pixel boxes.
        image_size: ``(H, W)`` of the image.
        opts: a resolved ``predict`` section (:func:`~cellmask.predict.options.predict_config`).
        masks_fn: makes the masks of the kept boxes (:func:`segmenter_masks`, or a model's own).
        image_label: with ``class_vote``, the image's type (1-based) decided elsewhere (the
            image-type classifier) instead of the vote over ``dets``.

    Returns:
        the image's :class:`Instances` (possibly none).
    """
    size = (int(image_size[0]), int(image_size[1]))
    if len(dets) == 0:
        return Instances.empty(size)
    keep, labels = _select(dets, opts, image_label)
    if len(keep) == 0:
        return Instances.empty(size)
    offsets, windows, conf = masks_fn(keep)
    scores = dets.scores[keep]
    if opts["rescore"]:
        scores = (scores * np.asarray(conf, dtype=np.float32)).astype(np.float32)
    labels = labels[keep]
    out_windows, out_offsets, kept = remove_overlaps_windows(
        windows, offsets, scores, size, min_area_for(labels, opts["min_area"])
    )
    return Instances(size, dets.boxes[keep][kept], scores[kept], labels[kept], out_offsets, out_windows)


class ProbabilityStore:
    """Segmenter probabilities per box of one image, so that variants of the pipeline (ablation
    rows, tuning grid points) segment each box once.

    Keys are the exact box coordinates; values ``[1, S, S]`` crops kept on the CPU in ``dtype``
    (float32: exact; float16 halves the memory of a tuning grid). :meth:`clear` between images.
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self._probs: dict[bytes, torch.Tensor] = {}

    def clear(self) -> None:
        self._probs.clear()

    def __len__(self) -> int:
        return len(self._probs)

    def get(self, boxes: np.ndarray, compute: Callable[[np.ndarray], torch.Tensor]) -> torch.Tensor:
        """float32 ``[K, 1, S, S]`` probabilities of ``boxes`` ``[K, 4]``; ``compute`` is called
        once on the boxes not seen before."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        keys = [b.tobytes() for b in boxes]
        new: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self._probs and key not in new:
                new[key] = i
        if new:
            computed = compute(boxes[list(new.values())]).to("cpu", self.dtype)  # one copy
            for key, probs in zip(new, computed, strict=True):
                self._probs[key] = probs
        if not keys:
            return torch.zeros((0, 1, 1, 1))
        return torch.stack([self._probs[k] for k in keys]).float()


def segmenter_masks(
    segmenter: torch.nn.Module,
    image: torch.Tensor,
    boxes: np.ndarray,
    threshold: float | None = None,
    batch_size: int | None = None,
    amp: bool | torch.dtype = False,
    store: ProbabilityStore | None = None,
) -> MaskFn:
    """A :data:`MaskFn` that segments ``boxes[keep]`` with the segmentation module.

    Args:
        segmenter: a :class:`~cellmask.models.segmenter.Segmenter` (``predict_probs``,
            ``threshold``) in eval mode.
        image: float32 ``[3, H, W]`` in 0..1 on the segmenter's device.
        boxes: ``[K, 4]`` pixel boxes of every detection of the image.
        threshold: mask probability threshold (``None``: the segmenter's own).
        batch_size: crops per forward (``None``: the segmenter's own).
        store: reuse probabilities of boxes already segmented (ablation, tuning).
    """
    from cellmask.models.segmenter import paste_masks

    thr = float(segmenter.threshold if threshold is None else threshold)
    size = (int(image.shape[-2]), int(image.shape[-1]))

    def probs_of(sel: np.ndarray) -> torch.Tensor:
        b = torch.as_tensor(np.asarray(sel, dtype=np.float32), device=image.device).reshape(-1, 4)
        rois = torch.cat([torch.zeros((len(b), 1), device=image.device), b], 1)
        return segmenter.predict_probs(image[None], rois, batch_size, amp)

    def masks(keep: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        sel = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[keep]
        probs = probs_of(sel) if store is None else store.get(sel, probs_of).to(image.device)
        b = torch.as_tensor(sel, device=image.device)
        pasted, conf = paste_masks(probs, b, size, thr, dense=False)
        offsets, windows = _host_windows(pasted)
        return offsets, windows, conf.cpu().numpy().astype(np.float32)

    return masks


def _host_windows(pasted: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(offsets int64 [K, 2], K bool windows)`` of a
    :class:`~cellmask.models.segmenter.PastedMasks` as NumPy arrays: its offsets and all its
    windows cross to the host in one copy each (:meth:`PastedMasks.to`), never box by box."""
    host = pasted.to("cpu")
    offsets = host.offsets.numpy().astype(np.int64).reshape(-1, 2)
    return offsets, [w.numpy().astype(bool, copy=False) for w in host.windows]


def own_masks(masks: Any, image_size: Sequence[int], threshold: float = 0.5) -> MaskFn:
    """A :data:`MaskFn` over a model's own masks (the Cascade Mask R-CNN baseline).

    Args:
        masks: a :class:`~cellmask.models.segmenter.PastedMasks` (contract 7) or float
            ``[N, 1, H, W]`` probabilities (torchvision's convention), one per detection.
        threshold: for float masks: a pixel is in the mask where ``p >= threshold``.

    The confidence of each mask is the mean probability of its pixels (1 for binary masks).
    """
    if hasattr(masks, "windows") and hasattr(masks, "offsets"):
        offsets, windows = _host_windows(masks)

        def pasted(keep: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
            return offsets[keep], [windows[i] for i in keep], np.ones(len(keep), np.float32)

        return pasted
    probs = torch.as_tensor(masks).float().reshape(-1, *[int(s) for s in image_size]).cpu()

    def dense(keep: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        offsets, windows, conf = [], [], []
        for i in np.asarray(keep).tolist():
            p = probs[i].numpy()
            m = p >= threshold
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            if len(rows) == 0:
                offsets.append((0, 0))
                windows.append(np.zeros((0, 0), bool))
                conf.append(0.0)
                continue
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            offsets.append((y0, x0))
            windows.append(m[y0:y1, x0:x1])
            conf.append(float(p[m].mean()))
        return np.array(offsets, np.int64).reshape(-1, 2), windows, np.array(conf, np.float32)

    return dense
