"""The competition's classes: label ``i + 1`` is ``CLASSES[i]`` (0 is background)."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("shsy5y", "cort", "astro")
"""Competition classes; label ``i + 1`` is ``CLASSES[i]`` (0 is background)."""

CLASS_TO_LABEL: dict[str, int] = {name: i + 1 for i, name in enumerate(CLASSES)}
"""Class name -> label id (1-based)."""
