"""Data layer: volumes with geometry, study records, manifests, importers, preprocessing and the phantom world."""

from .batch import BatchSummary, SkippedCase
from .manifest import MANIFEST_COLUMNS, Manifest, read_manifest, write_manifest
from .study import MASKS, SEQUENCES, Exam, LabelSource, Study, derive_label
from .volume import Volume, read_volume, write_volume

__all__ = [
    "BatchSummary",
    "SkippedCase",
    "MANIFEST_COLUMNS",
    "Manifest",
    "read_manifest",
    "write_manifest",
    "MASKS",
    "SEQUENCES",
    "Exam",
    "LabelSource",
    "Study",
    "derive_label",
    "Volume",
    "read_volume",
    "write_volume",
]
