"""Training augmentation of instance crops: box jitter, flips and 90-degree rotations.

:func:`jitter_boxes` scales each side (``scale`` range) and shifts the centre (``shift`` x size)
of every truth box, so the segmenter learns to cope with detector boxes that are a bit off; the
image *and* the target are cropped at the jittered box. :func:`dihedral` / :func:`random_dihedral`
apply horizontal/vertical flips and rotations by multiples of 90 degrees to crops and targets
alike (the paper's segmenter augmentations are flips and rotations).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["dihedral", "jitter_boxes", "random_dihedral"]


def jitter_boxes(
    boxes: torch.Tensor,
    scale: Sequence[float] = (0.8, 1.2),
    shift: float = 0.1,
    p: float = 1.0,
    image_size: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Randomly rescale and shift boxes (each with probability ``p``).

    Width and height are multiplied by independent factors from ``U(scale[0], scale[1])`` and the
    centre moves by ``U(-shift, shift)`` times the (original) width and height. With
    ``image_size = (H, W)`` the result is clipped to the image, as detector boxes are; a box never
    gets thinner than one pixel.

    Returns:
        float32 ``[K, 4]`` (a new tensor).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    k = len(boxes)
    if k == 0:
        return boxes.clone()
    r = torch.rand((k, 5), generator=generator)
    lo, hi = float(scale[0]), float(scale[1])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    on = r[:, 4] < p
    sw = torch.where(on, lo + (hi - lo) * r[:, 0], 1.0)
    sh = torch.where(on, lo + (hi - lo) * r[:, 1], 1.0)
    dx = torch.where(on, (2 * r[:, 2] - 1) * shift * w, 0.0)
    dy = torch.where(on, (2 * r[:, 3] - 1) * shift * h, 0.0)
    cx, cy, w, h = cx + dx, cy + dy, w * sw, h * sh
    out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    if image_size is not None:
        height, width = image_size
        out[:, 0::2] = out[:, 0::2].clamp(0, width)
        out[:, 1::2] = out[:, 1::2].clamp(0, height)
        # keep at least one pixel, inside the image
        for a, b, limit in ((0, 2, width), (1, 3, height)):
            thin = out[:, b] - out[:, a] < 1
            mid = ((out[:, a] + out[:, b]) / 2).clamp(0.5, limit - 0.5)
            out[thin, a] = mid[thin] - 0.5
            out[thin, b] = mid[thin] + 0.5
    return out


def dihedral(x: torch.Tensor, k: int = 0, hflip: bool = False, vflip: bool = False) -> torch.Tensor:
    """Flip (horizontal, then vertical) and then rotate by ``k x 90`` degrees counter-clockwise.

    Acts on the last two dimensions (``torch.rot90(x, k, dims=(-2, -1))`` for the rotation).
    """
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    if k % 4:
        x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x


def random_dihedral(
    *tensors: torch.Tensor,
    hflip: float = 0.5,
    vflip: float = 0.5,
    rot90: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """Draw one flip/rotation per instance and apply it to every tensor alike.

    Args:
        tensors: ``[K, ..., S, S]`` tensors (e.g. crops and their targets), same ``K``, square.
        hflip, vflip: flip probabilities; rot90: rotate by ``k x 90``, ``k`` uniform in 0..3.

    Returns:
        the transformed tensors (new tensors; the inputs are untouched).
    """
    k = len(tensors[0])
    r = torch.rand((k, 3), generator=generator)
    hf, vf = r[:, 0] < hflip, r[:, 1] < vflip
    rot = (r[:, 2] * 4).long().clamp(max=3) if rot90 else torch.zeros(k, dtype=torch.long)
    code = hf.long() + 2 * vf.long() + 4 * rot
    outs = [t.clone() for t in tensors]
    for c in torch.unique(code).tolist():
        if c == 0:
            continue
        sel = torch.nonzero(code == c, as_tuple=True)[0]
        for src, dst in zip(tensors, outs, strict=True):
            dst[sel] = dihedral(src[sel], k=c // 4, hflip=bool(c & 1), vflip=bool(c & 2))
    return tuple(outs)
