"""Shared launcher of the Training/ wrappers: each script is `ccella <job>` for torchrun or PythonSlicer."""

from __future__ import annotations

import sys
from pathlib import Path


def run(job: str) -> None:
    # Let the scripts run from a checkout without installing the package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from CCELLACore.cli import main

    sys.exit(main([job, *sys.argv[1:]]))
