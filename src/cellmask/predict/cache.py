"""The optional detection cache (``--cache DIR``): raw detections per branch, view and image.

Detection is the expensive stage; fusion, thresholds, masks and scoring are cheap by
comparison. With a cache, ``evaluate``/``tune``/``--ablation`` re-run only the cheap stages::

    DIR/<branch name>-<key>/<image id>.npz      boxes/scores/labels of each view

``key`` hashes the branch's checkpoint (resolved path, size, mtime: :meth:`RunSpec.fingerprint`),
its model config and the autocast setting, so a retrained or edited run is never served stale
detections; each file also records the image file's size and mtime and is ignored when the
image changed. Views are stored one by one: detections made with TTA serve a run without it.
Branches built from in-memory models (no run) are not cached.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellmask.predict.tta import Detections

__all__ = ["DetectionCache", "ImageKey"]


@dataclass(frozen=True)
class ImageKey:
    """Identifies an image file's content for the cache: its id, size in bytes and mtime."""

    image_id: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, image_id: str, path: str | Path) -> ImageKey:
        stat = Path(path).stat()
        return cls(str(image_id), int(stat.st_size), int(stat.st_mtime_ns))

    def stamp(self) -> str:
        return json.dumps([self.image_id, self.size, self.mtime_ns])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "branch"


class DetectionCache:
    """Raw (per-view) detections on disk. ``root=None`` disables it (every lookup misses)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def branch_key(name: str, fingerprint: str, amp: Any) -> str:
        """``<name>-<hash>`` of a branch's checkpoint fingerprint and autocast setting (``False``,
        or its dtype's name)."""
        setting = amp if isinstance(amp, bool) else str(amp)
        digest = hashlib.sha1(json.dumps([fingerprint, setting]).encode()).hexdigest()[:12]
        return f"{_slug(name)}-{digest}"

    def _file(self, branch_key: str, image: ImageKey) -> Path:
        assert self.root is not None
        return (
            self.root
            / branch_key
            / f"{_slug(image.image_id)}-{hashlib.sha1(image.image_id.encode()).hexdigest()[:8]}.npz"
        )

    def load(
        self, branch_key: str | None, image: ImageKey | None, views: Sequence[str]
    ) -> list[Detections] | None:
        """The cached detections of ``views`` (in that order), or ``None`` (a miss)."""
        if self.root is None or branch_key is None or image is None:
            return None
        path = self._file(branch_key, image)
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["image"]) != image.stamp() or any(f"{v}_boxes" not in data for v in views):
                    self.misses += 1
                    return None
                out = [
                    Detections(data[f"{v}_boxes"], data[f"{v}_scores"], data[f"{v}_labels"]) for v in views
                ]
        except (OSError, KeyError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return out

    def save(
        self, branch_key: str | None, image: ImageKey | None, views: Sequence[str], dets: Sequence[Detections]
    ) -> None:
        """Store ``dets`` (one per view), keeping views cached before for the same image."""
        if self.root is None or branch_key is None or image is None:
            return
        path = self._file(branch_key, image)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        try:
            with np.load(path, allow_pickle=False) as old:
                if str(old["image"]) == image.stamp():
                    arrays = {k: old[k] for k in old.files}
        except (OSError, KeyError, ValueError):
            pass
        for view, det in zip(views, dets, strict=True):
            arrays[f"{view}_boxes"], arrays[f"{view}_scores"] = det.boxes, det.scores
            arrays[f"{view}_labels"] = det.labels
        arrays["image"] = np.array(image.stamp())
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
