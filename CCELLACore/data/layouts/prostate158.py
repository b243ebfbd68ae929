"""The Prostate158 data set.

Layout under the root::

    prostate158_train/train.csv, valid.csv, train/<ID>/...
    prostate158_test/test.csv, test/<ID>/...

Each case folder holds ``t2.nii.gz``, ``adc.nii.gz``, ``dwi.nii.gz`` (HighB), ``t2_anatomy_reader{1,2}.nii.gz``
(1 = transition zone, 2 = peripheral zone: the project's gland convention), ``t2_tumor_reader1.nii.gz`` and
``adc_tumor_reader{1,2}.nii.gz``. The CSVs list them (columns :data:`CSV_COLUMNS`), paths relative to the CSV's
folder, empty where absent. Split: ``train.csv`` -> train, ``valid.csv`` -> val, ``test.csv`` -> test.

Label (docs/data.md, "Labels"): a case with a tumour annotation (a non-empty ``adc_tumor_reader1`` or ``t2_tumor_reader1``
entry whose file exists) is csPCa-positive, source "annotation"; every other case is negative. Masks: gland =
``t2_anatomy_reader1`` (else reader 2), lesion = ``t2_tumor_reader1`` (else ``adc_tumor_reader1``, on the ADC grid).
One study per patient: the ID is the case id and the patient id. Institution ``"2"``, no reports.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from ...errors import DataError, ManifestError
from ...fileio import atomic_write_text
from ..study import LabelSource, Study
from ..volume import read_volume, resample_to_grid, write_volume
from . import ImportLog, copy_volume, read_table

__all__ = ["CSV_COLUMNS", "looks_like", "import_studies", "export_studies"]

logger = logging.getLogger("CCELLACore")

CSV_COLUMNS: tuple[str, ...] = (
    "ID", "t2", "adc", "dwi", "t2_anatomy_reader1", "t2_anatomy_reader2", "adc_tumor_reader1", "adc_tumor_reader2",
    "t2_tumor_reader1",
)
_REQUIRED = ("ID", "t2", "adc", "dwi")
#: (top folder, CSV name, split, case sub-folder)
TABLES: tuple[tuple[str, str, str, str], ...] = (
    ("prostate158_train", "train.csv", "train", "train"),
    ("prostate158_train", "valid.csv", "val", "train"),
    ("prostate158_test", "test.csv", "test", "test"),
)
_IMAGES = {"t2": "AxT2", "dwi": "HighB", "adc": "ADC"}
_TUMOUR = ("adc_tumor_reader1", "t2_tumor_reader1")
INSTITUTION = "2"


def looks_like(src: Path) -> bool:
    return src.is_dir() and any((src / top).is_dir() for top in ("prostate158_train", "prostate158_test"))


def import_studies(src: Path, log: ImportLog) -> list[Study]:
    """Read every CSV present; report cases whose files are missing and case folders no CSV lists.

    Raises:
        ManifestError: no CSV found, or a CSV lacks ID, t2, adc or dwi.
    """
    studies: list[Study] = []
    seen: dict[str, str] = {}
    listed: set[Path] = set()
    n_tables = 0
    for top, name, split, _ in TABLES:
        table = src / top / name
        if not table.is_file():
            if (src / top).is_dir():
                log.warn(f"{top}/{name}", "CSV not found; its split is empty")
            continue
        n_tables += 1
        for line, row in read_table(table, CSV_COLUMNS, _REQUIRED, log):
            where = f"{top}/{name} row {line}"
            case_id = row.get("ID", "") or f"<{where}>"
            if not row.get("ID"):
                log.skip(case_id, f"{where}: empty ID")
                continue
            files = {col: table.parent / row[col] for col in CSV_COLUMNS[1:] if row.get(col)}
            listed.update(p.parent.resolve() for p in files.values())
            if case_id in seen:
                log.skip(case_id, f"{where}: duplicate ID (first in {seen[case_id]}); first kept")
                continue
            seen[case_id] = where
            study = _row_to_study(case_id, split, files, where, log)
            if study is not None:
                studies.append(study)
    if n_tables == 0:
        raise ManifestError(src, f"no Prostate158 CSV ({', '.join(f'{t}/{n}' for t, n, _, _ in TABLES)}) found")
    for top, _, _, sub in TABLES[::2]:  # train/ holds train and valid cases; test/ the test cases
        folder = src / top / sub
        if folder.is_dir():
            for case_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                if case_dir.resolve() not in listed:
                    log.skip(case_dir.name, f"case folder {top}/{sub}/{case_dir.name} is listed in no CSV")
    return studies


def _row_to_study(case_id: str, split: str, files: dict[str, Path], where: str, log: ImportLog) -> Study | None:
    missing = [c for c in _IMAGES if c not in files]
    if missing:
        log.skip(case_id, f"{where}: no {', '.join(missing)} entry")
        return None
    # Every listed file must exist: a listed tumour file that is absent would make the label uncertain.
    problem = log.missing_files(files)
    if problem:
        log.skip(case_id, f"{where}: {problem}")
        return None
    masks = {}
    gland = files.get("t2_anatomy_reader1") or files.get("t2_anatomy_reader2")
    if gland is not None:
        masks["gland"] = gland
    lesion = files.get("t2_tumor_reader1") or files.get("adc_tumor_reader1")
    if lesion is not None:
        masks["lesion"] = lesion
    label = int(any(col in files for col in _TUMOUR))
    try:
        return Study(
            case_id=case_id, patient_id=case_id, images={seq: files[col] for col, seq in _IMAGES.items()},
            institution=INSTITUTION, split=split, masks=masks, report="", label=label,
            label_source=LabelSource.ANNOTATION,
        )
    except DataError as exc:
        log.skip(case_id, f"{where}: {exc.reason}")
        return None


# --- export -------------------------------------------------------------------------------------------------------
def export_studies(studies: list[Study], out_dir: Path) -> Path:
    """Write the Prostate158 layout; split val -> ``valid.csv``, test -> ``test.csv``, train and unassigned -> train.

    The gland mask becomes ``t2_anatomy_reader1``. A positive study (label 1) gets ``t2_tumor_reader1`` (its lesion
    mask on the AxT2 grid) and ``adc_tumor_reader1`` (the same, nearest-resampled onto the ADC grid); a negative or
    unlabelled study gets no tumour file, so it imports as negative (logged for unlabelled ones). The case id is the
    folder name; patient ids are not part of the format (one study per patient).

    Raises:
        DataError: a positive study has no lesion mask (Prostate158 encodes csPCa only as a tumour annotation), or
            lacks HighB or ADC.
    """
    rows: dict[tuple[str, str], list[dict[str, str]]] = {(top, name): [] for top, name, _, _ in TABLES}
    for study in studies:
        missing = [s for s in ("HighB", "ADC") if s not in study.images]
        if missing:
            raise DataError(study.case_id, f"Prostate158 needs t2, adc and dwi; {missing} missing")
        if study.label == 1 and "lesion" not in study.masks:
            raise DataError(study.case_id, "positive study without a lesion mask: Prostate158 labels are tumour annotations")
        if study.label is None:
            logger.warning("case %s has no label; written to Prostate158 without a tumour annotation (negative)", study.case_id)
        top, name, _, sub = next((t for t in TABLES if t[2] == study.split), TABLES[0])
        case_dir = out_dir / top / sub / study.case_id
        row = {c: "" for c in CSV_COLUMNS}
        row["ID"] = study.case_id
        for col, seq in _IMAGES.items():
            copy_volume(study.images[seq], case_dir / f"{col}.nii.gz")
            row[col] = f"{sub}/{study.case_id}/{col}.nii.gz"
        if "gland" in study.masks:
            copy_volume(study.masks["gland"], case_dir / "t2_anatomy_reader1.nii.gz")
            row["t2_anatomy_reader1"] = f"{sub}/{study.case_id}/t2_anatomy_reader1.nii.gz"
        if study.label == 1:
            lesion = read_volume(study.masks["lesion"], check_finite=False)
            t2 = read_volume(study.images["AxT2"], check_finite=False)
            adc = read_volume(study.images["ADC"], check_finite=False)
            for col, grid in (("t2_tumor_reader1", t2), ("adc_tumor_reader1", adc)):
                mask = lesion if lesion.same_grid(grid) else resample_to_grid(lesion, grid, interpolation="nearest")
                write_volume(mask, case_dir / f"{col}.nii.gz")
                row[col] = f"{sub}/{study.case_id}/{col}.nii.gz"
        rows[(top, name)].append(row)
    for (top, name), table in rows.items():
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        atomic_write_text(out_dir / top / name, buffer.getvalue())
    return out_dir
