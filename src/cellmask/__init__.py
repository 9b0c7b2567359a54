"""cellmask: MDE-CellMask, a multi-detector ensemble for neuronal cell instance segmentation.

Importing the package is cheap: it pulls in no torch. Sub-packages are imported on use.
"""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("shsy5y", "cort", "astro")
"""Competition classes; label ``i + 1`` is ``CLASSES[i]`` (0 is background)."""

CLASS_TO_LABEL: dict[str, int] = {name: i + 1 for i, name in enumerate(CLASSES)}
