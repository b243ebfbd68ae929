"""Apply a classifier to exams of any geometry: p(csPCa) and a saliency map on the AxT2 input's grid.

Outputs per exam (``DIR``)::

    classification.json   probability (of clinically significant cancer), predicted class at the threshold,
                          the model's name and hash, the input file names, the classifier grid, the saliency method
    saliency.nii.gz       Grad-CAM map in [0, 1] on the AxT2 input's own grid (same size, spacing, origin, direction)

For a manifest, ``DIR/cases/<case>/`` holds those per exam, ``DIR/classifications.csv`` one row per exam and
``DIR/classify_summary.json`` the skipped cases and, where labels exist, AUC and AP.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.preprocess import case_folder_name
from ..data.study import SEQUENCES, Exam, read_case_volume
from ..data.volume import SUPPORTED_SUFFIXES, Volume, write_volume
from ..errors import DataError
from ..fileio import atomic_write_json, atomic_write_text
from .data import prepare_exam
from .metrics import classification_metrics
from .model import LoadedClassifier
from .saliency import DEFAULT_LAYER, grad_cam, saliency_on_input_grid

__all__ = ["STUDY_FILE_NAMES", "find_study_files", "classify_exam", "classify_files", "classify_manifest"]

logger = logging.getLogger("CCELLACore")

#: File stems recognised in a ``--study`` folder, per sequence (any supported suffix).
STUDY_FILE_NAMES: dict[str, tuple[str, ...]] = {
    "AxT2": ("axt2", "t2w", "t2"),
    "HighB": ("highb", "hbv", "b1600", "dwi"),
    "ADC": ("adc",),
}


def find_study_files(folder: str | Path) -> dict[str, Path]:
    """The sequence files in a study folder (``axt2.nii.gz``, ``highb.nrrd``, ``adc.mha``, ...).

    Raises:
        DataError: the folder is missing, or holds two candidates for one sequence (named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder.name, f"{folder}: study folder not found")
    found: dict[str, Path] = {}
    for seq, stems in STUDY_FILE_NAMES.items():
        hits = []
        for path in sorted(folder.iterdir()):
            lower = path.name.lower()
            suffix = next((s for s in SUPPORTED_SUFFIXES if lower.endswith(s)), None)
            if suffix and lower[: -len(suffix)] in stems and path.is_file():
                hits.append(path)
        if len(hits) > 1:
            raise DataError(folder.name, f"{folder}: several {seq} files ({', '.join(p.name for p in hits)}); "
                            "keep one or give --axt2/--highb/--adc")
        if hits:
            found[seq] = hits[0]
    return found


def classify_exam(
    model: LoadedClassifier,
    volumes: dict[str, Volume],
    *,
    case_id: str = "exam",
    files: dict[str, Path] | None = None,
    saliency: bool = True,
    layer: str = DEFAULT_LAYER,
    threshold: float = 0.5,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Any], Volume | None]:
    """Classify one exam.

    Args:
        volumes: sequence -> volume, each on any grid (resampled internally onto the classifier's grid).
        files: sequence -> input file (names only go into the result).

    Returns:
        ``(result, saliency)``: the classification.json content and the saliency volume on the AxT2 input grid
        (None when ``saliency`` is False).

    Raises:
        DataError: naming the case and file: a sequence the model needs is missing, NaN/Inf voxels, no physical
            overlap with AxT2, a constant volume.
    """
    files = files or {}
    array, grid = prepare_exam(Exam(dict(volumes), {}, case_id), model.preprocess, model.config.intensity,
                               model.sequences, files=files)
    device = torch.device(device)
    network = model.network.to(device).eval()
    x = torch.from_numpy(array)[None].to(device)
    with torch.no_grad():
        probability = float(torch.softmax(network(x).float(), dim=1)[0, 1])
    result: dict[str, Any] = {
        "case_id": case_id,
        "probability": probability,
        "threshold": threshold,
        "predicted_class": int(probability >= threshold),
        "model": {"name": model.name, "hash": model.model_hash, "directory": model.directory.name},
        "sequences": list(model.sequences),
        "inputs": {s: Path(files[s]).name for s in model.sequences if s in files},
        "ignored_inputs": sorted(s for s in volumes if s not in model.sequences),
        "classifier_grid": {"size": list(model.preprocess.grid.size), "spacing": list(model.preprocess.grid.spacing)},
        "note": "research use only; not a medical device",
    }
    sal = None
    if saliency:
        cam = grad_cam(network, x, layer=layer)
        sal = saliency_on_input_grid(cam, grid, volumes["AxT2"])
        result["saliency"] = {"file": "saliency.nii.gz", "method": "Grad-CAM (MONAI)", "layer": layer,
                              "class": "csPCa", "grid": "the AxT2 input's grid"}
    return result, sal


def _read_inputs(case_id: str, files: dict[str, Path], sequences: tuple[str, ...]) -> dict[str, Volume]:
    missing = [s for s in sequences if s not in files]
    if missing:
        raise DataError(case_id, f"the classifier needs {', '.join(sequences)}; no {', '.join(missing)} file given"
                        + (" (--highb/--adc)" if set(missing) & {"HighB", "ADC"} else ""))
    return {s: read_case_volume(case_id, Path(p)) for s, p in files.items() if s in SEQUENCES}


def classify_files(model: LoadedClassifier, files: dict[str, Path], out_dir: str | Path, *,
                   case_id: str | None = None, saliency: bool = True, layer: str = DEFAULT_LAYER,
                   device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read the given files, classify, write ``out_dir/classification.json`` (and ``saliency.nii.gz``)."""
    files = {s: Path(p) for s, p in files.items() if p is not None}
    case_id = case_id or (files["AxT2"].parent.name if "AxT2" in files else "exam")
    volumes = _read_inputs(case_id, files, model.sequences)
    result, sal = classify_exam(model, volumes, case_id=case_id, files=files, saliency=saliency, layer=layer,
                                device=device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if sal is not None:
        write_volume(sal, out_dir / "saliency.nii.gz")
    atomic_write_json(out_dir / "classification.json", result)  # last: its presence means the exam is done
    return result


def classify_manifest(model: LoadedClassifier, manifest_path: str | Path, out_dir: str | Path, *,
                      splits: tuple[str, ...] | None = None, institution: str | None = None, saliency: bool = True,
                      layer: str = DEFAULT_LAYER, device: str | torch.device = "cpu",
                      progress: bool = True) -> dict[str, Any]:
    """Classify every study of a manifest (optionally only some splits / one institution); bad exams are skipped
    and reported by name. Returns the summary (also written to ``out_dir/classify_summary.json``)."""
    from tqdm.auto import tqdm

    from ..data.manifest import read_manifest

    out_dir = Path(out_dir)
    manifest = read_manifest(manifest_path)
    studies = [s for s in manifest.studies if (not splits or s.split in splits)
               and (institution is None or s.institution == str(institution))]
    rows, skipped = [], [{"case_id": p.case_id, "reason": p.reason} for p in manifest.problems]
    for study in tqdm(studies, desc="classify", unit="exam", disable=not progress):
        try:
            result = classify_files(model, dict(study.images), out_dir / "cases" / case_folder_name(study.case_id),
                                    case_id=study.case_id, saliency=saliency, layer=layer, device=device)
        except DataError as exc:
            logger.warning("skipped case %s: %s", study.case_id, exc.reason)
            skipped.append({"case_id": study.case_id, "reason": exc.reason})
            continue
        rows.append({"case_id": study.case_id, "split": study.split, "institution": study.institution,
                     "label": "" if study.label is None else study.label, "probability": result["probability"]})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case_id", "split", "institution", "label", "probability"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "classifications.csv", buffer.getvalue())
    labelled = [r for r in rows if r["label"] != ""]
    summary: dict[str, Any] = {
        "model": {"name": model.name, "hash": model.model_hash},
        "manifest": Path(manifest_path).name,
        "n_classified": len(rows),
        "n_skipped": len(skipped),
        "skipped": skipped,
    }
    if labelled:
        metrics = classification_metrics([int(r["label"]) for r in labelled], [r["probability"] for r in labelled])
        summary["metrics"] = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in metrics.items()}
    atomic_write_json(out_dir / "classify_summary.json", summary)
    return summary
