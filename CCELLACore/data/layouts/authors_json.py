"""The CCELLA++ authors' dataset JSON (``train.json`` / ``test.json``); docs/data.md.

Each file is a list of entries::

    {"axt2": "./<folder>/axt2.nii.gz", "b1600": "./<folder>/b1600.nii.gz", "adc": "./<folder>/adc.nii.gz",
     "dataset": "Institute1", "folder": "<patient_id>", "pirads": [1, 0], "spacing": [0.5, 0.5, 0.5625],
     "text": "<report>", "text_isnull": 0}

Paths are relative to the JSON's folder (the authors' ``data_base_dir``). HighB is the ``b1600`` key. ``pirads`` is
a one-hot ``[negative, positive]`` with negative iff PI-RADS 1-2: it becomes the label, with source PI-RADS; the exact
score is not recoverable, so ``Study.pirads`` stays ``None``. ``dataset == "Institute1"`` -> institution ``"1"``,
anything else -> ``"2"``. The split is the file's name. The folder is the case id and the patient id (the authors
have one study per patient; :func:`export_studies` names extra studies ``<patient_id>_<study_id>``).

The three volumes are co-registered on one grid (AxT2's); masks are not part of the format: the exporter writes
them beside the volumes as ``gland_mask.nii.gz`` / ``lesion_mask.nii.gz`` and the importer picks them up if present.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ...errors import DataError, ManifestError
from ...fileio import atomic_write_json
from ..study import LabelSource, Study
from ..volume import read_volume, resample_to_grid, write_volume
from . import ImportLog

__all__ = ["JSON_FILES", "REQUIRED_KEYS", "looks_like", "import_studies", "export_studies"]

#: File name -> split.
JSON_FILES: dict[str, str] = {"train.json": "train", "test.json": "test"}
#: Keys without which an entry cannot be used.
REQUIRED_KEYS: tuple[str, ...] = ("axt2", "b1600", "adc", "folder", "pirads")
#: Keys the authors' files carry besides the required ones (a missing one is a warning).
OPTIONAL_KEYS: tuple[str, ...] = ("dataset", "spacing", "text", "text_isnull")
_IMAGE_KEYS = {"axt2": "AxT2", "b1600": "HighB", "adc": "ADC"}
_MASK_FILES = {"gland": "gland_mask.nii.gz", "lesion": "lesion_mask.nii.gz"}
_INSTITUTE1 = "Institute1"


def looks_like(src: Path) -> bool:
    """True for a ``train.json``/``test.json`` (or a folder holding one) that is a list of the authors' entries.

    A file that is not valid JSON still counts, so that importing it reports the line of the error.
    """
    files = [src] if src.is_file() else [src / name for name in JSON_FILES if (src / name).is_file()]
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if file.name in JSON_FILES:
                return True
            continue
        if isinstance(data, list) and any(isinstance(e, dict) and {"axt2", "folder"} <= set(e) for e in data[:5]):
            return True
    return False


def _load_entries(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(path, f"not valid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise ManifestError(path, f"expected a list of entries, got {type(data).__name__}")
    return data


def import_studies(src: Path, log: ImportLog) -> list[Study]:
    """Read ``train.json`` and ``test.json`` (or the one JSON file ``src``).

    An unreadable JSON file is reported and the other file still imports; when every file is unreadable the first
    error is raised.

    Raises:
        ManifestError: no JSON file could be read (names the file and, for invalid JSON, the line).
    """
    files = [src] if src.is_file() else [src / name for name in JSON_FILES if (src / name).is_file()]
    if not files:
        raise ManifestError(src, f"no {' or '.join(JSON_FILES)} found")
    studies: list[Study] = []
    seen: dict[str, str] = {}
    errors: list[ManifestError] = []
    for path in files:
        try:
            entries = _load_entries(path)
        except ManifestError as exc:
            errors.append(exc)
            log.skip(f"<{path.name}>", str(exc))
            continue
        split = JSON_FILES.get(path.name, "")
        if not split:
            log.warn(path.name, f"split unknown (file is not named {' or '.join(JSON_FILES)}); left empty")
        for index, entry in enumerate(entries):
            where = f"{path.name} entry {index}"
            study = _entry_to_study(entry, where, path.parent, split, log)
            if study is None:
                continue
            if study.case_id in seen:
                log.skip(study.case_id, f"{where}: duplicate folder (first in {seen[study.case_id]}); first kept")
                continue
            seen[study.case_id] = where
            studies.append(study)
    if len(errors) == len(files):
        raise errors[0]
    return studies


def _entry_to_study(entry: object, where: str, root: Path, split: str, log: ImportLog) -> Study | None:
    if not isinstance(entry, dict):
        log.skip(f"<{where}>", f"{where}: expected an object, got {type(entry).__name__}")
        return None
    case_id = str(entry.get("folder", "")).strip() or f"<{where}>"
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    if missing:
        log.skip(case_id, f"{where}: missing key(s) {missing}")
        return None
    unknown = sorted(set(entry) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        log.warn(where, f"unknown key(s) {unknown} ignored")
    absent = [k for k in OPTIONAL_KEYS if k not in entry]
    if absent:
        log.warn(where, f"key(s) {absent} absent")

    label = _label_from_onehot(entry["pirads"])
    if label is None:
        log.skip(case_id, f"{where}: 'pirads' must be [1, 0] or [0, 1], got {entry['pirads']!r}")
        return None
    images = {}
    for key, seq in _IMAGE_KEYS.items():
        value = entry[key]
        if not isinstance(value, str) or not value.strip():
            log.skip(case_id, f"{where}: '{key}' must be a path, got {value!r}")
            return None
        images[seq] = (root / value.strip()).resolve() if not Path(value.strip()).is_absolute() else Path(value.strip())
    problem = log.missing_files(images)
    if problem:
        log.skip(case_id, f"{where}: {problem}")
        return None
    case_dir = images["AxT2"].parent
    masks = {name: case_dir / file for name, file in _MASK_FILES.items() if (case_dir / file).is_file()}
    mask_problem = log.missing_files({f"{k} mask": v for k, v in masks.items()}) if log.check_images else None
    if mask_problem:
        log.skip(case_id, f"{where}: {mask_problem}")
        return None

    report = _report(entry, where, log)
    if log.check_images and isinstance(entry.get("spacing"), list):
        _check_spacing(entry["spacing"], images["AxT2"], where, log)
    dataset = str(entry.get("dataset", ""))
    try:
        return Study(
            case_id=case_id,
            patient_id=case_id,
            images=images,
            institution=("1" if dataset == _INSTITUTE1 else "2") if dataset else "",
            split=split,
            masks=masks,
            report=report,
            label=label,
            label_source=LabelSource.PIRADS,
        )
    except DataError as exc:
        log.skip(case_id, f"{where}: {exc.reason}")
        return None


def _label_from_onehot(value: object) -> int | None:
    """``[1, 0]`` -> 0 (PI-RADS 1-2), ``[0, 1]`` -> 1; anything else -> ``None``."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            neg, pos = (float(v) for v in value)
        except (TypeError, ValueError):
            return None
        if (neg, pos) == (1.0, 0.0):
            return 0
        if (neg, pos) == (0.0, 1.0):
            return 1
    return None


def _report(entry: dict, where: str, log: ImportLog) -> str:
    text = entry.get("text", "")
    text = text if isinstance(text, str) else ""
    isnull = entry.get("text_isnull", 0 if text.strip() else 1)
    if text.strip().endswith(".npy"):
        # A "*_merged.json" holds the path of a text embedding, not the report itself.
        log.warn(where, "'text' is an embedding file (.npy), not a report; report left empty")
        return ""
    if isnull in (1, True, "1") and text.strip():
        log.warn(where, "text_isnull is 1 but 'text' is not empty; report left empty (as the authors' code masks it)")
        return ""
    if isnull in (0, False, "0") and not text.strip():
        log.warn(where, "text_isnull is 0 but 'text' is empty")
    return text if isnull in (0, False, "0") else ""


def _check_spacing(spacing: list, axt2: Path, where: str, log: ImportLog) -> None:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(axt2))
    reader.ReadImageInformation()
    actual = reader.GetSpacing()[:3]
    try:
        if any(abs(float(a) - float(b)) > 1e-3 for a, b in zip(spacing, actual)) or len(spacing) != 3:
            log.warn(where, f"'spacing' {spacing} differs from {axt2.name}'s header spacing {tuple(round(a, 4) for a in actual)}")
    except (TypeError, ValueError):
        log.warn(where, f"'spacing' is not 3 numbers: {spacing!r}")


# --- export -------------------------------------------------------------------------------------------------------
def _folders(studies: list[Study]) -> dict[str, str]:
    """case_id -> folder: the patient id, or ``<patient_id>_<study_id>`` for patients with several studies."""
    per_patient = Counter(s.patient_id for s in studies)
    folders = {}
    for s in studies:
        if per_patient[s.patient_id] == 1:
            folders[s.case_id] = s.patient_id
        else:
            sid = s.study_id or (s.case_id[len(s.patient_id) + 1 :] if s.case_id.startswith(s.patient_id + "_") else s.case_id)
            folders[s.case_id] = f"{s.patient_id}_{sid}"
    if len(set(folders.values())) != len(folders):
        clash = [f for f, n in Counter(folders.values()).items() if n > 1]
        raise DataError(clash[0], "two studies map to the same authors' folder name")
    return folders


def _onehot(study: Study) -> list[int]:
    if study.label is not None:
        return [1 - study.label, study.label]
    if study.pirads is not None:  # the authors' one-hot: negative iff PI-RADS 1-2
        return [int(study.pirads <= 2), int(study.pirads >= 3)]
    raise DataError(study.case_id, "the authors' JSON needs a label (its 'pirads' one-hot); this study has none")


def export_studies(studies: list[Study], out_dir: Path) -> Path:
    """Write ``train.json`` / ``test.json`` and ``<folder>/{axt2,b1600,adc}.nii.gz`` under ``out_dir``.

    HighB and ADC are resampled (linear) onto the AxT2 grid, masks (nearest) too, because the authors' volumes share
    one grid; ``spacing`` is AxT2's. Splits ``train``, ``val`` and unassigned go to ``train.json``, ``test`` to
    ``test.json``. The one-hot is the study's label (else PI-RADS >= 3, the authors' meaning).

    Raises:
        DataError: a study has no label and no PI-RADS, lacks HighB/ADC, or two studies map to one folder.
    """
    folders = _folders(studies)
    tables: dict[str, list[dict]] = {"train.json": [], "test.json": []}
    for study in studies:
        missing = [s for s in ("HighB", "ADC") if s not in study.images]
        if missing:
            raise DataError(study.case_id, f"the authors' JSON needs AxT2, HighB and ADC; {missing} missing")
        folder = folders[study.case_id]
        onehot = _onehot(study)
        axt2 = read_volume(study.images["AxT2"], check_finite=False)
        volumes = {"axt2": axt2}
        for key, seq in (("b1600", "HighB"), ("adc", "ADC")):
            vol = read_volume(study.images[seq], check_finite=False)
            volumes[key] = vol if vol.same_grid(axt2) else resample_to_grid(vol, axt2, interpolation="linear")
        for key, vol in volumes.items():
            write_volume(vol, out_dir / folder / f"{key}.nii.gz")
        for name, path in study.masks.items():
            mask = read_volume(path, check_finite=False)
            mask = mask if mask.same_grid(axt2) else resample_to_grid(mask, axt2, interpolation="nearest")
            write_volume(mask, out_dir / folder / _MASK_FILES[name])
        report = study.report or ""
        tables["test.json" if study.split == "test" else "train.json"].append(
            {
                "axt2": f"./{folder}/axt2.nii.gz",
                "b1600": f"./{folder}/b1600.nii.gz",
                "adc": f"./{folder}/adc.nii.gz",
                "dataset": _INSTITUTE1 if study.institution == "1" else "Institute2",
                "folder": folder,
                "pirads": onehot,
                "spacing": [round(float(s), 6) for s in axt2.spacing],
                "text": report,
                "text_isnull": 0 if report.strip() else 1,
            }
        )
    for name, entries in tables.items():
        atomic_write_json(out_dir / name, entries)
    return out_dir
