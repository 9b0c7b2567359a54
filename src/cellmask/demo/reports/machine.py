"""The machine line of every report: CPU model, cores, torch and Python versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_line() -> str:
    """The CPU's model name, cores, torch and Python versions (the reports' machine line)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"
