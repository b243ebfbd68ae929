"""Make the Slicer module's helper package importable in plain pytest (Slicer puts the module folder on sys.path).
The session's tiny trained model (``data``, ``trained``) comes from Testing/conftest.py, shared with Testing/core."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "CCELLAPlusPlus"

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

# slicer-core's package imports every module of each folder named ``slicer`` on sys.path, this one included: imported
# first from conftest_helpers (via CCELLAPlusPlusLib.jobs), it would import conftest_helpers again half-way through
# and fail on a circular import (this file's tests run alone). Imported here first, before any helper, it does not.
import slicer  # noqa: E402,F401
# Real Qt without a display (PySide6's offscreen platform), set before any QApplication exists.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_generation(trained, tmp_path_factory):
    """One real generation (3 steps) by the child job with the tiny model: (events, out_dir, log, command)."""
    from conftest_helpers import run_tiny_generation

    return run_tiny_generation(trained, tmp_path_factory.mktemp("tiny_generation"))
