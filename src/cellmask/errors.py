"""Errors raised at the package's boundaries (files, CSV rows, checkpoints, configs)."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message names the file and, where there is one, the row or id."""
