"""The project's manifest: one CSV row per study, paths relative to the manifest's folder.

Columns (``MANIFEST_COLUMNS``; ``case_id``, ``patient_id`` and ``axt2`` are required, the others may be empty):

==============  =====================================================================================
case_id         unique study key (PI-CAI: ``<patient_id>_<study_id>``)
patient_id      patient key; a patient may have several studies; splits are per patient
study_id        the study's own id, if any
institution     e.g. ``1`` / ``2`` or a site name
split           ``train``, ``val``, ``test`` or empty
axt2            path of the axial T2 volume (NIfTI, NRRD or MHA)
highb           path of the high-b DWI volume
adc             path of the ADC map, in 10^-6 mm^2/s
gland_mask      path of the whole-gland mask
lesion_mask     path of the lesion mask
report          free-text report (CSV-quoted; may be empty)
pirads          case-level PI-RADS 1-5
isup            case-level ISUP grade group 0-5
label           csPCa label 0/1
label_source    histopathology, pirads, annotation, predicted (synthetic exams) or none
==============  =====================================================================================

Reading is lenient per row and strict per file: an unknown column, bytes that are not UTF-8 or broken CSV quoting
is an error naming the file (and column or line; a typo would otherwise drop data silently); a bad row (duplicate
case, bad value, more values than columns, a report that :func:`~CCELLACore.reports.check_report` refuses) is
reported in ``problems`` with its line and skipped.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, ManifestError
from ..fileio import atomic_write_text
from ..reports import ReportError, check_report
from .batch import SkippedCase
from .study import MASKS, SEQUENCES, LabelSource, Study

__all__ = ["MANIFEST_COLUMNS", "Manifest", "read_manifest", "write_manifest"]

_IMAGE_COLUMNS = {name.lower(): name for name in SEQUENCES}  # axt2 -> AxT2, ...
_MASK_COLUMNS = {f"{name}_mask": name for name in MASKS}

MANIFEST_COLUMNS: tuple[str, ...] = (
    "case_id",
    "patient_id",
    "study_id",
    "institution",
    "split",
    *_IMAGE_COLUMNS,
    *_MASK_COLUMNS,
    "report",
    "pirads",
    "isup",
    "label",
    "label_source",
)
_REQUIRED = ("case_id", "patient_id", "axt2")


@dataclass
class Manifest:
    """Studies read from a manifest, with absolute paths, plus every row that could not be used."""

    path: Path | None
    studies: list[Study]
    problems: list[SkippedCase] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.studies)

    def by_case(self) -> dict[str, Study]:
        return {s.case_id: s for s in self.studies}

    def select(self, splits: tuple[str, ...], institution: str | None = None) -> list[Study]:
        """The studies of ``splits`` (and of ``institution`` when given), in manifest order.

        Raises:
            DataError: ``institution`` is given but no study of the manifest has it (naming those it has).
        """
        if institution is not None:
            known = sorted({s.institution for s in self.studies})
            if str(institution) not in known:
                raise DataError("<none>", f"{self.path}: no study of institution {institution!r}; the manifest "
                                          f"has {known}")
        return [s for s in self.studies
                if s.split in splits and (institution is None or s.institution == str(institution))]


def _optional_int(value: str, column: str) -> int | None:
    value = value.strip()
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"column '{column}' must be an integer, got {value!r}") from None
    if number != int(number):
        raise ValueError(f"column '{column}' must be an integer, got {value!r}")
    return int(number)


def read_manifest(path: str | Path, *, check_files: bool = False) -> Manifest:
    """Read a manifest CSV.

    Args:
        path: the CSV file; relative paths inside it are resolved against its folder.
        check_files: also skip rows whose image files do not exist (reported in ``problems``).

    Raises:
        ManifestError: the file is missing or not UTF-8, lacks a required column or has an unknown one.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "manifest not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # spreadsheet programs start UTF-8 CSVs with a byte-order mark
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError(path, f"not valid UTF-8 at byte {exc.start} (line {line}); save it as UTF-8 CSV") from None
    # strict: an unterminated quote is an error, not a last field that swallows the rest of the file.
    reader = csv.DictReader(io.StringIO(text), strict=True)
    try:
        return _read_rows(path, reader, check_files)
    except csv.Error as exc:
        raise ManifestError(path, f"not a readable CSV in the row starting at line {reader.line_num + 1}: {exc}") from None


def _read_rows(path: Path, reader: csv.DictReader, check_files: bool) -> Manifest:
    columns = reader.fieldnames or []
    unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
    if unknown:
        raise ManifestError(path, f"unknown column(s) {unknown}; allowed: {', '.join(MANIFEST_COLUMNS)}")
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        raise ManifestError(path, f"missing required column(s) {missing}")

    root = path.parent
    studies: list[Study] = []
    problems: list[SkippedCase] = []
    seen: set[str] = set()
    for row in reader:
        line = reader.line_num  # a quoted report may span several lines: name the line the row ends on
        extra = row.pop(None, None)  # values beyond the header's columns
        row = {k: (v or "") for k, v in row.items()}
        case_id = row["case_id"].strip() or f"<row {line}>"
        if extra:
            problems.append(SkippedCase(case_id, f"line {line} of {path.name}: {len(columns) + len(extra)} values "
                                                 f"for {len(columns)} columns (an unquoted comma?)"))
            continue
        if case_id in seen:
            problems.append(SkippedCase(case_id, f"duplicate case_id (line {line} of {path.name}); first row kept"))
            continue
        try:
            study = _row_to_study(row, root)
            if check_files:
                for name, file in (*study.images.items(), *study.masks.items()):
                    if not file.is_file():
                        raise DataError(study.case_id, f"{name} file not found: {file}")
        except (ValueError, DataError, ReportError) as exc:
            reason = exc.reason if isinstance(exc, DataError) else str(exc)
            problems.append(SkippedCase(case_id, f"line {line} of {path.name}: {reason}"))
            continue
        seen.add(case_id)
        studies.append(study)
    return Manifest(path=path, studies=studies, problems=problems)


def _row_to_study(row: dict[str, str], root: Path) -> Study:
    def resolve(value: str) -> Path | None:
        value = value.strip()
        if not value:
            return None
        p = Path(value)
        return p if p.is_absolute() else root / p

    images = {seq: resolve(row.get(col, "")) for col, seq in _IMAGE_COLUMNS.items()}
    masks = {name: resolve(row.get(col, "")) for col, name in _MASK_COLUMNS.items()}
    label_source = row.get("label_source", "").strip() or "none"
    try:
        label_source = LabelSource(label_source)
    except ValueError:
        raise ValueError(f"column 'label_source' must be one of {[s.value for s in LabelSource]}, got {label_source!r}") from None
    case_id = row["case_id"].strip()
    if not case_id:
        raise ValueError("empty case_id")
    if not row["patient_id"].strip():
        raise ValueError("empty patient_id")
    return Study(
        case_id=case_id,
        patient_id=row["patient_id"].strip(),
        study_id=row.get("study_id", "").strip(),
        institution=row.get("institution", "").strip(),
        split=row.get("split", "").strip(),
        images={k: v for k, v in images.items() if v is not None},
        masks={k: v for k, v in masks.items() if v is not None},
        report=check_report(row.get("report", ""), source="column 'report'") if row.get("report") else "",
        pirads=_optional_int(row.get("pirads", ""), "pirads"),
        isup=_optional_int(row.get("isup", ""), "isup"),
        label=_optional_int(row.get("label", ""), "label"),
        label_source=label_source,
    )


def _relative(path: Path | None, root: Path) -> str:
    if path is None:
        return ""
    try:
        return Path(os.path.relpath(Path(path).resolve(), root.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_posix()


def write_manifest(studies: list[Study], path: str | Path) -> Path:
    """Write studies as a manifest CSV (atomically), with paths relative to the manifest's folder; report line
    breaks are written as ``\n``."""
    path = Path(path)
    root = path.parent
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for s in studies:
        row = {
            "case_id": s.case_id,
            "patient_id": s.patient_id,
            "study_id": s.study_id,
            "institution": s.institution,
            "split": s.split,
            # csv quotes a field holding the line terminator (\n) but not a lone \r, which the reader then takes for
            # a line break: store report line breaks as \n.
            "report": (s.report or "").replace("\r\n", "\n").replace("\r", "\n"),
            "pirads": "" if s.pirads is None else s.pirads,
            "isup": "" if s.isup is None else s.isup,
            "label": "" if s.label is None else s.label,
            "label_source": LabelSource(s.label_source).value,
        }
        for col, seq in _IMAGE_COLUMNS.items():
            row[col] = _relative(s.images.get(seq), root)
        for col, name in _MASK_COLUMNS.items():
            row[col] = _relative(s.masks.get(name), root)
        writer.writerow(row)
    return atomic_write_text(path, buffer.getvalue())
