"""Reading images from disk: the one place that turns a file into a uint8 gray array."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cellmask.errors import DataError


def read_image(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an 8-bit gray image (competition PNG or LIVECell TIFF).

    Args:
        path: image file.
        expected_size: ``(height, width)`` the caller knows the image must have (e.g. from
            ``train.csv``); a mismatch is an error rather than a silently misplaced mask.

    Returns:
        uint8 ``[H, W]``. Colour files are converted to gray; 16-bit files are scaled to 8 bits.

    Raises:
        FileNotFoundError: no such file.
        DataError: the file cannot be decoded, or its size differs from ``expected_size``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"{path}: cannot decode image (corrupt or not an image file)")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:
        image = (image / 257).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DataError(f"{path}: unsupported pixel type {image.dtype} (expected 8-bit gray)")
    if expected_size is not None and tuple(image.shape) != tuple(expected_size):
        raise DataError(
            f"{path}: image is {image.shape[0]}x{image.shape[1]} (HxW) but "
            f"{expected_size[0]}x{expected_size[1]} was expected"
        )
    return image


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image from its header, without decoding the pixels.

    Raises:
        FileNotFoundError: no such file.
        DataError: the header cannot be read.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot read image header ({exc})") from None
    return height, width
