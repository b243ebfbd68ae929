"""Importers of real-data layouts (authors' JSON, PI-CAI, Prostate158, the project manifest).

The implementation lives in :mod:`CCELLACore.data.layouts`; this package re-exports it and holds the
``ccella import`` job (:mod:`.cli`).
"""

from __future__ import annotations

from ..layouts import LAYOUTS, detect_layout, export_layout, import_layout

__all__ = ["LAYOUTS", "detect_layout", "import_layout", "export_layout"]
