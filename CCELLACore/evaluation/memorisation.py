"""Memorisation audit: is any synthetic exam a near copy of a training exam?

1. **Shared space.** Every exam (real or synthetic, any grid) becomes one vector: each sequence resampled
   (linearly, by voxel index) onto ``THUMBNAIL_SHAPE`` over its whole field of view, z-scored, concatenated. Then
   every dimension is standardised by the training exams' mean and standard deviation, so that what all exams share
   (the pelvis, the mean gland) does not count as similarity. Similarity = Pearson correlation r of two vectors;
   distance = 1 - r. No weights file is needed, so ``ccella synthesize --audit`` can always run it.
2. **Nearest training exam** of each synthetic exam (the training exams are the real manifest's ``train`` split,
   or all its exams when no split is assigned).
3. **Yardstick**: the same nearest distance for real exams that were not trained on (the other splits), or, when
   there are none, for each training exam to the others (leave one patient out). Independent exams are never
   closer than this distribution's low end.
4. **Possible copies**: synthetic exams whose nearest distance is below ``ratio`` (default 0.5) times the
   yardstick's 1st percentile. A copy of a training exam has distance ~0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.study import SEQUENCES, Exam, Study
from ..errors import CCELLAError, DataError

__all__ = ["THUMBNAIL_SHAPE", "exam_vector", "study_vectors", "nearest", "audit", "audit_manifests", "write_audit"]

#: Voxel shape every sequence is resampled to for the audit (X, Y, Z).
THUMBNAIL_SHAPE = (32, 32, 16)


def exam_vector(exam: Exam, sequences: tuple[str, ...] = SEQUENCES, shape: tuple[int, int, int] = THUMBNAIL_SHAPE
                ) -> np.ndarray:
    """The exam in the shared space, before the training standardisation: (len(sequences) * prod(shape),)."""
    from scipy.ndimage import zoom

    parts = []
    for name in sequences:
        if name not in exam.volumes:
            raise DataError(exam.case_id, f"no {name} image for the memorisation audit")
        array = np.asarray(exam.volumes[name].array, np.float32)
        small = zoom(array, [t / s for t, s in zip(shape, array.shape)], order=1, grid_mode=True, mode="nearest")
        small = small[tuple(slice(0, t) for t in shape)]
        parts.append(((small - small.mean()) / max(float(small.std()), 1e-6)).ravel())
    return np.concatenate(parts)


def study_vectors(studies: list[Study], *, progress: bool = False, desc: str = "audit"
                  ) -> tuple[list[Study], np.ndarray, list[dict]]:
    """Vectors of the studies that can be read (all three sequences), the studies they belong to, the skipped."""
    from tqdm.auto import tqdm

    kept, vectors, skipped = [], [], []
    for study in tqdm(studies, desc=desc, unit="exam", disable=not progress):
        try:
            vectors.append(exam_vector(study.load(masks=False)))
            kept.append(study)
        except DataError as exc:
            skipped.append({"case_id": study.case_id, "reason": exc.reason})
    return kept, np.asarray(vectors, np.float64).reshape(len(vectors), -1), skipped


def _standardise_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest(queries: np.ndarray, train: np.ndarray, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index of and distance (1 - Pearson r) to the nearest training row of each query row.

    Args:
        exclude: optional boolean (n_queries, n_train): pairs that may not be each other's neighbour.
    """
    r = _standardise_rows(queries) @ _standardise_rows(train).T
    if exclude is not None:
        r = np.where(exclude, -np.inf, r)
    index = np.argmax(r, axis=1)
    return index, 1.0 - r[np.arange(len(r)), index]


def audit(train: tuple[list[Study], np.ndarray], held_out: tuple[list[Study], np.ndarray],
          synthetic: tuple[list[Study], np.ndarray], *, ratio: float = 0.5) -> dict:
    """Run the audit on vectors from :func:`study_vectors` (see the module docstring).

    Returns:
        ``{"space", "threshold", "ratio", "yardstick": {...}, "synthetic": [per exam], "possible_copies": [...]}``;
        per synthetic exam its case id, the nearest training case id, the distance and ``possible_copy``.
    """
    (train_studies, t), (_, h), (syn_studies, s) = train, held_out, synthetic
    if len(t) < 2:
        raise CCELLAError(f"the memorisation audit needs at least 2 training exams, got {len(t)}")
    mean, std = t.mean(axis=0), np.maximum(t.std(axis=0), 1e-6)
    t, h, s = (t - mean) / std, (h - mean) / std if len(h) else h, (s - mean) / std if len(s) else s
    if len(h) >= 2:
        _, yard = nearest(h, t)
        yard_kind = "held-out real exams to their nearest training exam"
    else:
        patients = np.asarray([st.patient_id for st in train_studies])
        _, yard = nearest(t, t, exclude=patients[:, None] == patients[None, :])
        yard_kind = "each training exam to its nearest other training patient (leave one patient out)"
    low = float(np.percentile(yard, 1))
    threshold = ratio * low
    records = []
    if len(s):
        index, dist = nearest(s, t)
        for study, i, d in zip(syn_studies, index, dist):
            records.append({"case_id": study.case_id, "nearest_train_case": train_studies[int(i)].case_id,
                            "distance": float(d), "correlation": float(1 - d), "possible_copy": bool(d < threshold)})
    return {
        "space": f"voxels resampled to {'x'.join(map(str, THUMBNAIL_SHAPE))} per sequence ({', '.join(SEQUENCES)}), "
                 "z-scored, standardised by the training exams; distance = 1 - Pearson r",
        "ratio": ratio, "threshold": threshold, "n_train": len(t),
        "yardstick": {"kind": yard_kind, "n": int(len(yard)), "min": float(yard.min()), "p1": low,
                      "median": float(np.median(yard)), "distances": [float(x) for x in yard]},
        "synthetic": records,
        "possible_copies": [r for r in records if r["possible_copy"]],
    }


def audit_manifests(real_manifest: str | Path, synthetic_manifest: str | Path, *, ratio: float = 0.5,
                    progress: bool = True) -> dict:
    """:func:`audit` of a synthetic manifest against a real one (training exams: its ``train`` split, or all)."""
    from ..data.manifest import read_manifest

    real = read_manifest(real_manifest).studies
    trained = [s for s in real if s.split == "train"] or real
    held = [s for s in real if s.split != "train"] if len(trained) < len(real) else []
    synthetic = read_manifest(synthetic_manifest).studies
    train_v = study_vectors(trained, progress=progress, desc="audit: training exams")
    held_v = study_vectors(held, progress=progress, desc="audit: held-out exams")
    syn_v = study_vectors(synthetic, progress=progress, desc="audit: synthetic exams")
    result = audit(train_v[:2], held_v[:2], syn_v[:2], ratio=ratio)
    result["skipped"] = train_v[2] + held_v[2] + syn_v[2]
    return result


def write_audit(real_manifest: str | Path, synthetic_manifest: str | Path, out: str | Path, *, ratio: float = 0.5,
                progress: bool = True) -> dict:
    """:func:`audit_manifests`, written to ``out`` (JSON, atomically); prints how many possible copies it found."""
    from ..fileio import atomic_write_json

    result = audit_manifests(real_manifest, synthetic_manifest, ratio=ratio, progress=progress)
    atomic_write_json(out, result)
    copies = result["possible_copies"]
    print(f"{out}: memorisation audit: {len(copies)} of {len(result['synthetic'])} synthetic exams are possible "
          f"copies of training exams (threshold {result['threshold']:.4g})")
    return result
