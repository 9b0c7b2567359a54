"""Reading, writing and checking ``submission.csv`` (columns ``id,predicted``).

One row per predicted instance, ``predicted`` a row-major 1-indexed RLE (see
:mod:`cellmask.data.rle`); an image without any instance still gets one row whose
``predicted`` is empty.
"""

from cellmask.submission.check import (
    IMAGE_EXTENSIONS,
    SubmissionReport,
    check_submission,
    cli_check_submission,
    inspect_submission,
)
from cellmask.submission.format import SUBMISSION_COLUMNS, read_submission
from cellmask.submission.write import (
    masks_to_submission_rows,
    window_to_rle,
    window_to_runs,
    write_submission,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SUBMISSION_COLUMNS",
    "SubmissionReport",
    "check_submission",
    "cli_check_submission",
    "inspect_submission",
    "masks_to_submission_rows",
    "read_submission",
    "window_to_rle",
    "window_to_runs",
    "write_submission",
]
