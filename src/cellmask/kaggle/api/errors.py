"""The two errors of the Kaggle side: something to set up first, or a command that failed."""

from __future__ import annotations


class KaggleSetupError(RuntimeError):
    """The Kaggle CLI or the user's credentials are missing (the message says what to do)."""


class KaggleCommandError(RuntimeError):
    """A ``kaggle`` command failed, or a kernel run ended in error."""
