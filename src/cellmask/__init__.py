"""cellmask: MDE-CellMask, a multi-detector ensemble for neuronal cell instance segmentation.

Importing the package is cheap: it pulls in no torch. Sub-packages are imported on use.
"""

from cellmask.data.classes import CLASS_TO_LABEL, CLASSES

__version__ = "0.1.0"

__all__ = ["CLASSES", "CLASS_TO_LABEL", "__version__"]
