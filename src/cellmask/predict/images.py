"""The images inference reads: a folder's listing and a gray-only read, with clear errors.

- An empty folder (no ``.png``/``.tif``/``.tiff``/``.jpg``/``.jpeg``) is an error naming it.
- An image that cannot be decoded is an error naming the file
  (:func:`cellmask.data.images.read_image`).
- A colour file is accepted only when it is gray in content: every pixel's channels within
  :data:`GRAY_TOLERANCE` levels of each other (a gray image saved as RGB, possibly through
  JPEG); anything else is an error naming the file, since the models only ever saw gray
  microscopy images and a silent conversion would hide a wrong input folder.
- Any size is accepted: the detectors resize their input, and the masks come back in the
  image's own pixels (the submission checker reads each image's size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellmask.errors import DataError

__all__ = ["GRAY_TOLERANCE", "list_image_records", "read_gray_image"]

GRAY_TOLERANCE = 2
"""Max difference (8-bit levels) between a colour pixel's channels for the image to count as gray."""

_GRAY_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "F"}


def list_image_records(image_dir: str | Path) -> list:
    """The images of a folder as records (``image_id`` = file stem, sizes from the headers).

    Raises:
        FileNotFoundError: no such folder. DataError: no image in it, or an unreadable header.
    """
    from cellmask.data.sartorius import IMAGE_SUFFIXES, list_images

    records = list_images(image_dir)
    if not records:
        raise DataError(f"{image_dir}: no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
    return records


def read_gray_image(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 ``[H, W]`` of a gray image file (see the module docstring for what is refused).

    Raises:
        FileNotFoundError: no such file.
        DataError: undecodable, a colour image, or a size other than ``expected_size``.
    """
    from PIL import Image, UnidentifiedImageError

    from cellmask.data.images import read_image

    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot decode image (corrupt or not an image file: {exc})") from None
    if mode not in _GRAY_MODES:
        _check_gray_content(path)
    return read_image(path, expected_size)


def _check_gray_content(path: Path) -> None:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"{path}: cannot decode image (corrupt or not an image file)")
    if image.ndim == 2:
        return
    channels = image[..., :3].astype(np.int32)
    spread = int((channels.max(axis=-1) - channels.min(axis=-1)).max()) if channels.shape[-1] > 1 else 0
    if spread > GRAY_TOLERANCE:
        raise DataError(
            f"{path}: is a colour image (channels differ by up to {spread} levels); the models take "
            "8-bit gray microscopy images like the competition's"
        )
