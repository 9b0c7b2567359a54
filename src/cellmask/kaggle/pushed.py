"""What this checkout last pushed to Kaggle: per dataset, the version number the push created and
the build stamp it carried (``build/kaggle/pushed.json``, written by ``make push-datasets``).

``make push``, ``make push-train`` and ``make submit`` wait until Kaggle serves those versions
(:func:`cellmask.kaggle.api.wait_for_datasets`), and warn when the checkout has changed since the
code it would run was pushed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PUSHED = Path("build") / "kaggle" / "pushed.json"


def read_pushed(root: str | Path = ".") -> dict[str, dict[str, Any]]:
    """``{dataset_id: {"version": N or None, "stamp": version string or None, "pushed": ISO time}}``
    (empty when nothing was pushed from this checkout, or the record is unreadable)."""
    path = Path(root) / PUSHED
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_pushed(root: str | Path, dataset_id: str, version: int | None, stamp: str | None) -> Path:
    """Add one push to the record (the dataset's earlier entry replaced)."""
    path = Path(root) / PUSHED
    data = read_pushed(root)
    data[dataset_id] = {"version": version, "stamp": stamp, "pushed": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def expected_versions(pushed: Mapping[str, Mapping[str, Any]], dataset_ids: list[str]) -> dict[str, int]:
    """The version each of ``dataset_ids`` must reach: the one its last push created, where known."""
    return {d: int(pushed[d]["version"]) for d in dataset_ids if (pushed.get(d) or {}).get("version")}
