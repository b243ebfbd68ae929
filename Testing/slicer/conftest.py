"""Make the Slicer module's helper package importable in plain pytest (Slicer puts the module folder on sys.path),
and share the session's tiny trained model (built by Testing/core/conftest.py's fixtures) with these tests."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "CCELLAPlusPlus"

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
# Real Qt without a display (PySide6's offscreen platform), set before any QApplication exists.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

# The tiny-model fixtures live in Testing/core/conftest.py; load that file under its own name and re-export them
# (a second conftest cannot be imported as "conftest"). Running Testing/slicer alone builds the model once.
_spec = importlib.util.spec_from_file_location("ccella_core_fixtures", REPO / "Testing" / "core" / "conftest.py")
_core = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_core)
data = _core.data
trained = _core.trained


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_generation(trained, tmp_path_factory):
    """One real generation (3 steps) by the child job with the tiny model: (events, out_dir, log, command)."""
    from conftest_helpers import run_tiny_generation

    return run_tiny_generation(trained, tmp_path_factory.mktemp("tiny_generation"))
