"""Backbone features of every exam of a manifest, cached on disk so that a long run resumes where it stopped.

Cache layout (``--cache DIR``, default ``<out>/feature_cache``)::

    DIR/<backbone kind>-<sha256[:16]>/<case folder>-<paths hash>.npz   one file per exam: features and fingerprint

The fingerprint covers the backbone's weights hash and settings and each input file's path, size and modification
time; an entry whose fingerprint differs is recomputed, and so is one that cannot be read (cut short, corrupt).
Entries are written atomically, one per exam, so an interrupted run keeps every exam it finished and never finds
half an entry of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from ..data.preprocess import case_folder_name
from ..data.study import Study
from ..errors import DataError
from ..fileio import atomic_path, remove_orphaned_temporaries
from .backbones import Backbone

__all__ = ["FEATURE_VERSION", "study_fingerprint", "exam_features"]

logger = logging.getLogger("CCELLACore")

#: Bump when the features change for the same inputs and backbone (invalidates caches).
FEATURE_VERSION = 1


def study_fingerprint(study: Study, salt: str) -> str:
    """Hash of the study's image files (path, size, mtime) and ``salt`` (backbone hash and settings)."""
    parts = [salt, str(FEATURE_VERSION)]
    for name, path in sorted(study.images.items()):
        stat = Path(path).stat() if Path(path).is_file() else None
        parts.append(f"{name}:{Path(path).resolve()}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}")
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


def _entry_name(study: Study) -> str:
    """``<case folder>-<hash of its image paths>.npz``: two manifests may reuse a case id for other files."""
    paths = "\n".join(f"{k}:{Path(v).resolve()}" for k, v in sorted(study.images.items()))
    return f"{case_folder_name(study.case_id)}-{hashlib.sha256(paths.encode('utf-8')).hexdigest()[:12]}.npz"


def _read_entry(path: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["__fingerprint__"]) != fingerprint:
                return None
            return {k: np.asarray(data[k]) for k in data.files if k != "__fingerprint__"}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # missing, cut short or corrupt: recompute
        return None


def exam_features(backbone: Backbone, studies: list[Study], cache_dir: str | Path | None, *,
                  progress: bool = True, desc: str = "features") -> tuple[list[dict[str, np.ndarray]], list[dict]]:
    """Features of each study (cached), in order; studies that cannot be read are skipped and reported.

    Returns:
        ``(features, skipped)``: per usable study a dict key -> (k, d) float32 matrix (see :class:`Backbone`), and
        ``{"case_id", "reason"}`` per skipped study. ``features[i]["__case__"]`` holds the case id.
    """
    from tqdm.auto import tqdm

    salt = json.dumps({"sha256": backbone.weights_sha256, "settings": backbone.settings}, sort_keys=True)
    folder = None if cache_dir is None else Path(cache_dir) / f"{backbone.kind}-{backbone.weights_sha256[:16]}"
    if folder is not None:
        remove_orphaned_temporaries(folder)  # of a run killed mid-write; never those of a live one sharing the cache
    features, skipped = [], []
    for study in tqdm(studies, desc=desc, unit="exam", disable=not progress):
        fingerprint = study_fingerprint(study, salt)
        entry_path = None if folder is None else folder / _entry_name(study)
        entry = None if entry_path is None or not entry_path.is_file() else _read_entry(entry_path, fingerprint)
        if entry is None:
            try:
                entry = backbone.extract(study.load(masks=False))
            except DataError as exc:
                logger.warning("features: skipped case %s: %s", study.case_id, exc.reason)
                skipped.append({"case_id": study.case_id, "reason": exc.reason})
                continue
            if entry_path is not None:
                with atomic_path(entry_path, suffix=".npz") as tmp:
                    np.savez(tmp, __fingerprint__=np.asarray(fingerprint), **entry)
        features.append({**entry, "__case__": study.case_id})
    return features, skipped
