"""The ``kaggle`` command line, driven from Python: who the user is, and each command we run.

Every Kaggle action of the Makefile goes through :class:`KaggleRunner`, which either runs the
``kaggle`` CLI or, in dry-run mode (``DRY_RUN=1``), prints the exact command line instead.

- :mod:`~cellmask.kaggle.api.runner`: the user name, credentials, the CLI, :class:`KaggleRunner`;
- :mod:`~cellmask.kaggle.api.texts`: what the CLI (2.2.5) prints on error, read even at exit 0,
  and the accelerators it documents;
- :mod:`~cellmask.kaggle.api.kernels`: push, poll one version's run, submit;
- :mod:`~cellmask.kaggle.api.datasets`: status ("not found" told from "could not ask"), wait
  until ready, version or create.
"""

from __future__ import annotations

from cellmask.kaggle.api.datasets import (
    DATASET_FAILED,
    DATASET_MISSING,
    DATASET_PENDING,
    DATASET_READY,
    dataset_exists,
    dataset_status,
    dataset_version_status,
    parse_dataset_status,
    parse_status_json,
    push_dataset,
    wait_for_dataset,
    wait_for_datasets,
)
from cellmask.kaggle.api.errors import (
    KaggleCommandError,
    KaggleSetupError,
)
from cellmask.kaggle.api.kernels import (
    DONE,
    FAILED,
    kernel_ref,
    parse_push_version,
    parse_status,
    push_kernel,
    submit_kernel,
    wait_for_kernel,
)
from cellmask.kaggle.api.runner import (
    COMPETITION,
    SUBMISSION_FILE,
    KaggleRunner,
    check_kaggle_setup,
    config_dirs,
    find_kaggle_cli,
    kaggle_username,
)
from cellmask.kaggle.api.texts import (
    ACCELERATORS,
    DATASET_ERRORS,
    NOT_FOUND,
    PUSH_ERRORS,
    RETIRED_ACCELERATORS,
    SUBMIT_ERRORS,
    check_accelerator,
    error_lines,
    failure_reason,
    raise_on_cli_errors,
)

__all__ = [
    "ACCELERATORS",
    "COMPETITION",
    "DATASET_ERRORS",
    "DATASET_FAILED",
    "DATASET_MISSING",
    "DATASET_PENDING",
    "DATASET_READY",
    "DONE",
    "FAILED",
    "NOT_FOUND",
    "PUSH_ERRORS",
    "RETIRED_ACCELERATORS",
    "SUBMISSION_FILE",
    "SUBMIT_ERRORS",
    "KaggleCommandError",
    "KaggleRunner",
    "KaggleSetupError",
    "check_accelerator",
    "check_kaggle_setup",
    "config_dirs",
    "dataset_exists",
    "dataset_status",
    "dataset_version_status",
    "error_lines",
    "failure_reason",
    "find_kaggle_cli",
    "kaggle_username",
    "kernel_ref",
    "parse_dataset_status",
    "parse_push_version",
    "parse_status",
    "parse_status_json",
    "push_dataset",
    "push_kernel",
    "raise_on_cli_errors",
    "submit_kernel",
    "wait_for_dataset",
    "wait_for_datasets",
    "wait_for_kernel",
]
