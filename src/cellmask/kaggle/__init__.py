"""The Kaggle side of cellmask: notebooks, kernels, datasets and submissions.

- :mod:`cellmask.kaggle.notebooks`: committed notebooks stay clean (no outputs, canonical
  metadata) and take their parameters from one tagged cell (``make notebooks-clean``).
- :mod:`cellmask.data.inputs`: what a kernel reads under ``/kaggle/input``, found by marker
  files in both layouts Kaggle mounts (``<slug>/``; ``competitions/``, ``datasets/<owner>/``,
  ``notebooks/<owner>/``), and the run a continuation resumes.
- :mod:`cellmask.kaggle.session`: what the notebooks call: paths on Kaggle and in a checkout,
  one training stage (on Kaggle within the session's 11.5 hours), small tables and figures.
- :mod:`cellmask.kaggle.packaging`: kernel folders, the weights / wheels / code datasets.
- :mod:`cellmask.kaggle.api`: the ``kaggle`` CLI (user name, credentials, dry runs, the error
  texts it prints at exit status 0, polling one kernel version, waiting for datasets).
- :mod:`cellmask.kaggle.data`: the competition data downloaded and unpacked (``make data``).
- ``python -m cellmask.kaggle``: the commands behind ``make wheels``, ``make weights``,
  ``make push-datasets``, ``make push``, ``make push-train``, ``make submit`` and ``make data``.

Nothing here imports torch at module level, and nothing needs the ``kaggle`` CLI until a
command really runs it.
"""

from cellmask.kaggle.api import (
    COMPETITION,
    KaggleCommandError,
    KaggleRunner,
    KaggleSetupError,
    kaggle_username,
)
from cellmask.kaggle.packaging import DATASET_NAMES, INFERENCE_NOTEBOOK, KernelSpec, kernel_spec

__all__ = [
    "COMPETITION",
    "DATASET_NAMES",
    "INFERENCE_NOTEBOOK",
    "KaggleCommandError",
    "KaggleRunner",
    "KaggleSetupError",
    "KernelSpec",
    "kaggle_username",
    "kernel_spec",
]
