"""Faithfulness: does each synthetic exam show what its report says?

* **Report class vs a classifier** (``--classifier DIR``): the AUC of a csPCa classifier's probability on each
  synthetic exam against the class of the report it was generated from: PI-RADS >= 4 when the report's PI-RADS is
  known (the synthetic row's, or its real source's: synthetic case ``syn_<hash>`` is paired with the real case
  whose :func:`~CCELLACore.pipelines.synthesize_cli.synthetic_id` it is), else the synthetic row's label (the class
  the generator predicted from the report).
* **Phantom lesion presence and side** (when a ``truth.json`` from ``ccella phantoms`` lies beside either
  manifest): the fixed rule-based detector of the demo model's honour check
  (:func:`~CCELLACore.metrics.lesion_detector.detect_lesions`) on each synthetic exam, inside its gland mask when it
  has one, else inside a gland atlas: the real exams' gland masks on the synthetic grid (gland-centred, as the
  training exams were), mean > 0.5. Reported per report group: the share of exams with a detection, and the share
  of detections on the side of the report's index lesion.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..data.phantoms import CaseTruth
from ..data.study import Study
from ..errors import DataError
from ..fileio import read_json
from ..metrics.honour import GROUPS, pirads_group, rank_auc, rate, report_side
from ..metrics.lesion_detector import detect_lesions

__all__ = ["on_axt2_grid", "pair_with_real", "report_class", "classifier_agreement", "read_phantom_truth",
           "gland_atlas_for", "phantom_agreement"]

logger = logging.getLogger("CCELLACore")


def pair_with_real(synthetic: list[Study], real: list[Study]) -> dict[str, Study]:
    """Synthetic case id -> the real study it was synthesised from (by ``synthetic_id``), where there is one."""
    from ..pipelines.synthesize_cli import synthetic_id

    by_hash = {synthetic_id(s.case_id): s for s in real}
    return {s.case_id: by_hash[s.case_id] for s in synthetic if s.case_id in by_hash}


def report_class(study: Study, source: Study | None) -> int | None:
    for pirads in (study.pirads, source.pirads if source else None):
        if pirads is not None:
            return int(pirads >= 4)
    return study.label


def classifier_agreement(model_dir: str | Path, synthetic: list[Study], sources: dict[str, Study], *,
                         device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """AUC of a classifier's p(csPCa) on the synthetic exams against their reports' classes."""
    from tqdm.auto import tqdm

    from ..classifier.classify import classify_exam
    from ..classifier.model import load_classifier_dir

    model = load_classifier_dir(model_dir, device=device)
    scores, labels, skipped = [], [], []
    for study in tqdm(synthetic, desc="faithfulness: classifier", unit="exam", disable=not progress):
        label = report_class(study, sources.get(study.case_id))
        if label is None:
            continue
        try:
            exam = study.load(model.sequences, masks=False)
            result, _ = classify_exam(model, exam.volumes, case_id=study.case_id, saliency=False, device=device)
        except DataError as exc:
            skipped.append({"case_id": study.case_id, "reason": exc.reason})
            continue
        scores.append(result["probability"])
        labels.append(label)
    predicted = [int(p >= 0.5) for p in scores]
    return {"classifier": {"name": model.name, "hash": model.model_hash}, "auc": rank_auc(scores, labels),
            "accuracy": rate(sum(int(p == y) for p, y in zip(predicted, labels)), len(labels)),
            "n": len(labels), "n_positive": int(sum(labels)), "skipped": skipped}


def read_phantom_truth(manifest: str | Path) -> dict[str, CaseTruth]:
    """Case id -> phantom truth from the ``truth.json`` beside a manifest ({} when there is none)."""
    path = Path(manifest).parent / "truth.json"
    if not path.is_file():
        return {}
    cases = read_json(path).get("cases", {})
    return {case: CaseTruth.from_dict(row) for case, row in cases.items()}


def gland_atlas_for(reference, real: list[Study], n: int = 20) -> np.ndarray | None:
    """Gland atlas on ``reference``'s grid (size, spacing) from up to ``n`` real exams with gland masks."""
    from ..data.preprocess import GridConfig, PreprocessConfig, preprocess_exam

    config = PreprocessConfig(grid=GridConfig(tuple(int(s) for s in reference.shape),
                                              tuple(float(s) for s in reference.spacing)), normalize=False)
    masks = []
    for study in [s for s in real if "gland" in s.masks][:n]:
        try:
            exam = study.load(("AxT2",))
            masks.append(preprocess_exam(exam, config)[0].masks["gland"].array > 0)
        except DataError as exc:
            logger.warning("gland atlas: skipped case %s: %s", study.case_id, exc.reason)
    return None if not masks else np.mean(masks, axis=0) > 0.5


def on_axt2_grid(exam):
    """The exam with every volume and mask resampled onto its AxT2 grid (raw exams keep DWI on its own grid)."""
    from ..data.preprocess import GridConfig, PreprocessConfig, preprocess_exam

    if exam.same_space():
        return exam
    axt2 = exam.volumes["AxT2"]
    grid = GridConfig(tuple(int(s) for s in axt2.shape), tuple(float(s) for s in axt2.spacing))
    return preprocess_exam(exam, PreprocessConfig(grid=grid, normalize=False, center="volume"))[0]


def phantom_agreement(synthetic: list[Study], truths: dict[str, CaseTruth], real: list[Study], *,
                      progress: bool = True) -> dict[str, Any]:
    """Lesion presence and side of the synthetic exams against their phantom reports (see the module docstring).

    Args:
        truths: synthetic case id -> the truth of the report it was generated from.
    """
    from tqdm.auto import tqdm

    records, atlases = [], {}
    for study in tqdm([s for s in synthetic if s.case_id in truths], desc="faithfulness: lesions", unit="exam",
                      disable=not progress):
        truth = truths[study.case_id]
        try:
            exam = on_axt2_grid(study.load(("AxT2", "HighB", "ADC")))
        except DataError as exc:
            records.append({"case_id": study.case_id, "skipped": exc.reason})
            continue
        if "gland" in exam.masks:
            gland, region = exam.masks["gland"].array > 0, "own gland mask"
        else:
            key = (exam.reference.shape, tuple(np.round(exam.reference.spacing, 4)))
            if key not in atlases:
                atlases[key] = gland_atlas_for(exam.reference, real)
            gland, region = atlases[key], "gland atlas of the real exams"
        if gland is None:
            records.append({"case_id": study.case_id, "skipped": "no gland mask and no real gland masks for an atlas"})
            continue
        detection = detect_lesions(exam, gland)
        side = detection.largest.side if detection.found else None
        truth_side = report_side(truth)
        records.append({"case_id": study.case_id, "group": pirads_group(truth.pirads), "detected": detection.found,
                        "detected_side": side, "report_side": truth_side, "gland_region": region,
                        "side_correct": (side == truth_side) if side and truth_side else None})
    used = [r for r in records if "skipped" not in r]
    groups = {}
    for group in GROUPS:
        rows = [r for r in used if r["group"] == group]
        sided = [r for r in rows if r["side_correct"] is not None]
        groups[group] = {"lesion_found": rate(sum(r["detected"] for r in rows), len(rows)),
                         "side_correct": rate(sum(r["side_correct"] for r in sided), len(sided))}
    return {"detector": "CCELLACore.metrics.lesion_detector.detect_lesions (default thresholds)",
            "groups": groups, "n": len(used), "records": records}
