"""The PI-CAI public data set: image folds plus the ``picai_labels`` repository.

Layout under the root::

    picai_public_images_fold<k>/<patient_id>/<patient_id>_<study_id>_{t2w,adc,hbv[,sag,cor]}.mha
    picai_labels/clinical_information/marksheet.csv
    picai_labels/anatomical_delineations/whole_gland/AI/Bosma22b/<patient_id>_<study_id>.nii.gz
    picai_labels/csPCa_lesion_delineations/human_expert/resampled/<patient_id>_<study_id>.nii.gz
    picai_labels/csPCa_lesion_delineations/AI/Bosma22a/<patient_id>_<study_id>.nii.gz   (fallback)

A patient may have several studies; the case id is ``<patient_id>_<study_id>``. Label: ``case_csPCa`` (YES/NO) from
``case_ISUP`` (ISUP >= 2, source histopathology) when the ISUP grade group is known; without it ``case_csPCa`` is
kept with source PI-RADS (PI-CAI labels non-biopsied cases from radiology and follow-up). No PI-RADS, no reports,
institution ``"2"``, no split (the folds are cross-validation folds, counted in the summary). Sagittal and coronal
T2 are ignored. PI-CAI's whole-gland masks are binary: imported as-is, so "gland" = mask > 0 holds but the zone
labels (1 = TZ, 2 = PZ) do not; the exporter writes the gland as binary too.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from pathlib import Path

import numpy as np

from ...errors import DataError, ManifestError
from ...fileio import atomic_write_text
from ..study import LabelSource, Study, derive_label
from ..volume import read_volume, write_volume
from . import ImportLog, copy_volume, read_table, stable_hash

__all__ = ["MARKSHEET_COLUMNS", "looks_like", "import_studies", "export_studies"]

MARKSHEET_COLUMNS: tuple[str, ...] = (
    "patient_id", "study_id", "mri_date", "patient_age", "psa", "psad", "prostate_volume", "histopath_type",
    "lesion_GS", "lesion_ISUP", "case_ISUP", "case_csPCa", "center",
)
_REQUIRED = ("patient_id", "study_id", "case_csPCa")
LABELS_DIR = "picai_labels"
MARKSHEET = Path("clinical_information/marksheet.csv")
GLAND_DIR = Path("anatomical_delineations/whole_gland/AI/Bosma22b")
LESION_DIRS = (Path("csPCa_lesion_delineations/human_expert/resampled"), Path("csPCa_lesion_delineations/AI/Bosma22a"))
FOLD_PREFIX = "picai_public_images_fold"
_SEQUENCE_SUFFIX = {"t2w": "AxT2", "hbv": "HighB", "adc": "ADC"}
_IGNORED_SUFFIX = ("sag", "cor")
_FILE_RE = re.compile(r"^(?P<stem>.+)_(?P<kind>t2w|adc|hbv|sag|cor)\.mha$")
INSTITUTION = "2"
N_FOLDS = 5


def _folds(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{FOLD_PREFIX}*") if p.is_dir())


def looks_like(src: Path) -> bool:
    return src.is_dir() and (src / LABELS_DIR).is_dir() and bool(_folds(src))


def _scan_images(root: Path, log: ImportLog) -> dict[tuple[str, str], tuple[Path, dict[str, Path]]]:
    """(patient_id, study_id) -> (fold folder, {sequence: path}); a study in two folds is reported, first kept."""
    found: dict[tuple[str, str], tuple[Path, dict[str, Path]]] = {}
    for fold in _folds(root):
        for patient_dir in sorted(p for p in fold.iterdir() if p.is_dir()):
            pid = patient_dir.name
            groups: dict[str, dict[str, Path]] = {}
            for file in sorted(patient_dir.iterdir()):
                match = _FILE_RE.match(file.name)
                if match is None or not match["stem"].startswith(pid + "_"):
                    if file.is_file():
                        log.warn(f"{fold.name}/{pid}/{file.name}", "not a <patient_id>_<study_id>_<t2w|adc|hbv|sag|cor>.mha file; ignored")
                    continue
                sid = match["stem"][len(pid) + 1 :]
                if match["kind"] in _IGNORED_SUFFIX:
                    continue
                groups.setdefault(sid, {})[_SEQUENCE_SUFFIX[match["kind"]]] = file
            for sid, images in groups.items():
                key = (pid, sid)
                if key in found:
                    log.skip(f"{pid}_{sid}", f"duplicate study: images in {found[key][0].name} and {fold.name}; {found[key][0].name} kept")
                    continue
                found[key] = (fold, images)
    return found


def _parse_isup(value: str) -> int | None:
    if value in ("", "N/A", "NA", "nan"):
        return None
    number = float(value)
    if number != int(number) or not 0 <= number <= 5:
        raise ValueError(f"case_ISUP must be an ISUP grade group 0-5, got {value!r}")
    return int(number)


def import_studies(src: Path, log: ImportLog) -> list[Study]:
    """Read the marksheet, match its rows to image files and masks.

    Raises:
        ManifestError: the marksheet is missing, not UTF-8 or lacks patient_id, study_id or case_csPCa.
    """
    labels = src / LABELS_DIR
    marksheet = labels / MARKSHEET
    if not marksheet.is_file():
        raise ManifestError(marksheet, "PI-CAI marksheet not found")
    rows = read_table(marksheet, MARKSHEET_COLUMNS, _REQUIRED, log)
    images = _scan_images(src, log)
    log.summary.details["per_fold"] = dict(sorted(Counter(fold.name[len(FOLD_PREFIX):] for fold, _ in images.values()).items()))

    studies: list[Study] = []
    seen: dict[tuple[str, str], int] = {}
    for line, row in rows:
        pid, sid = row.get("patient_id", ""), row.get("study_id", "")
        case_id = f"{pid}_{sid}" if pid and sid else f"<{marksheet.name} row {line}>"
        where = f"{marksheet.name} row {line}"
        if not pid or not sid:
            log.skip(case_id, f"{where}: empty patient_id or study_id")
            continue
        if (pid, sid) in seen:
            log.skip(case_id, f"{where}: duplicate row (first at row {seen[(pid, sid)]}); first kept")
            continue
        seen[(pid, sid)] = line
        if (pid, sid) not in images:
            log.skip(case_id, f"{where}: no images {pid}_{sid}_*.mha in any {FOLD_PREFIX}*/{pid}/")
            continue
        fold, files = images[(pid, sid)]
        missing = [f"{pid}_{sid}_{k}.mha" for k, seq in _SEQUENCE_SUFFIX.items() if seq not in files]
        if missing:
            log.skip(case_id, f"{fold.name}/{pid}: missing {', '.join(missing)}")
            continue
        problem = log.missing_files(files)
        if problem:
            log.skip(case_id, f"{fold.name}/{pid}: {problem}")
            continue
        try:
            label, source, isup = _label(row, where, case_id, log)
        except ValueError as exc:
            log.skip(case_id, f"{where}: {exc}")
            continue
        masks = {}
        gland = labels / GLAND_DIR / f"{case_id}.nii.gz"
        if gland.is_file():
            masks["gland"] = gland
        lesion = next((labels / d / f"{case_id}.nii.gz" for d in LESION_DIRS if (labels / d / f"{case_id}.nii.gz").is_file()), None)
        if lesion is not None:
            masks["lesion"] = lesion
        problem = log.missing_files({f"{k} mask": v for k, v in masks.items()}) if log.check_images else None
        if problem:
            log.skip(case_id, f"{LABELS_DIR}: {problem}")
            continue
        studies.append(
            Study(
                case_id=case_id, patient_id=pid, study_id=sid, images=files, institution=INSTITUTION, masks=masks,
                report="", isup=isup, label=label, label_source=source,
            )
        )
    for (pid, sid), (fold, _) in sorted(images.items()):
        if (pid, sid) not in seen:
            log.skip(f"{pid}_{sid}", f"images in {fold.name}/{pid} have no row in {marksheet.name}")
    return studies


def _label(row: dict[str, str], where: str, case_id: str, log: ImportLog) -> tuple[int | None, LabelSource, int | None]:
    isup = _parse_isup(row.get("case_ISUP", ""))
    cspca = row.get("case_csPCa", "").upper()
    if cspca not in ("YES", "NO", ""):
        raise ValueError(f"case_csPCa must be YES or NO, got {row.get('case_csPCa')!r}")
    given = {"YES": 1, "NO": 0}.get(cspca)
    if isup is not None:
        label, source = derive_label(isup, None)
        if given is not None and given != label:
            log.warn(where, f"case {case_id}: case_csPCa {cspca} disagrees with case_ISUP {isup}; ISUP >= 2 used")
        return label, source, isup
    if given is None:
        return None, LabelSource.NONE, None
    return given, LabelSource.PIRADS, None


# --- export -------------------------------------------------------------------------------------------------------
_GLEASON = {0: "0+0", 1: "3+3", 2: "3+4", 3: "4+3", 4: "4+4", 5: "4+5"}
_CENTERS = ("RUMC", "PCNN", "ZGT")


def _study_id(study: Study) -> str:
    if study.study_id:
        return study.study_id
    prefix = study.patient_id + "_"
    return study.case_id[len(prefix):] if study.case_id.startswith(prefix) and len(study.case_id) > len(prefix) else study.case_id


def _marksheet_row(study: Study, pid: str, sid: str) -> dict[str, str]:
    """Plausible clinical columns, deterministic per case (the phantom world has no real ones)."""
    h = stable_hash(study.case_id)
    isup = study.isup
    age = 55 + h % 25
    volume = 30.0 + (h >> 8) % 50
    psa = round(2.0 + ((h >> 16) % 180) / 10.0, 1)
    label = study.label
    return {
        "patient_id": pid,
        "study_id": sid,
        "mri_date": f"20{16 + (h >> 24) % 6}-{1 + (h >> 28) % 12:02d}-{1 + (h >> 32) % 28:02d}",
        "patient_age": str(age),
        "psa": str(psa),
        "psad": f"{psa / volume:.2f}",
        "prostate_volume": str(volume),
        "histopath_type": "" if isup is None else "MRBx",
        "lesion_GS": "" if isup is None or isup == 0 else _GLEASON[isup],
        "lesion_ISUP": "" if isup is None or isup == 0 else str(isup),
        "case_ISUP": "" if isup is None else str(isup),
        "case_csPCa": "" if label is None else ("YES" if label else "NO"),
        "center": _CENTERS[(h >> 40) % len(_CENTERS)],
    }


def export_studies(studies: list[Study], out_dir: Path) -> Path:
    """Write the PI-CAI layout: ``.mha`` images in fold ``patient hash % 5``, marksheet, gland and lesion masks.

    Images keep their own grids (PI-CAI's sequences are not co-registered); NIfTI is converted to MHA. The study id
    is ``study.study_id``, else the case id without its ``<patient_id>_`` prefix, so that the imported case id is
    ``<patient_id>_<study_id>``. ``case_ISUP`` is written only when known; then the label is ISUP >= 2 on import.

    Raises:
        DataError: a study lacks HighB or ADC.
    """
    labels = out_dir / LABELS_DIR
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MARKSHEET_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for study in studies:
        missing = [s for s in ("HighB", "ADC") if s not in study.images]
        if missing:
            raise DataError(study.case_id, f"PI-CAI needs t2w, adc and hbv; {missing} missing")
        pid, sid = study.patient_id, _study_id(study)
        fold = stable_hash(pid) % N_FOLDS
        for kind, seq in _SEQUENCE_SUFFIX.items():
            copy_volume(study.images[seq], out_dir / f"{FOLD_PREFIX}{fold}" / pid / f"{pid}_{sid}_{kind}.mha")
        if "gland" in study.masks:
            gland = read_volume(study.masks["gland"], check_finite=False)
            write_volume(gland.with_array((gland.array > 0).astype(np.uint8)), labels / GLAND_DIR / f"{pid}_{sid}.nii.gz")
        if "lesion" in study.masks:
            copy_volume(study.masks["lesion"], labels / LESION_DIRS[0] / f"{pid}_{sid}.nii.gz")
        writer.writerow(_marksheet_row(study, pid, sid))
    atomic_write_text(labels / MARKSHEET, buffer.getvalue())
    return out_dir
