"""Real-data layouts: detect, import into :class:`~CCELLACore.data.study.Study` records, and export.

Four layouts (docs/data.md, "Real data layouts"):

=============  ==========================================================================================
manifest       the project's own CSV (:func:`~CCELLACore.data.manifest.read_manifest`)
authors_json   the CCELLA++ authors' ``train.json`` / ``test.json`` (co-registered NIfTI volumes, reports)
picai          PI-CAI public images (``picai_public_images_fold<k>/``) + ``picai_labels/`` (marksheet, masks)
prostate158    ``prostate158_train/{train,valid}.csv`` and ``prostate158_test/test.csv`` with case folders
=============  ==========================================================================================

Import is lenient per case and strict per table: a case whose files are missing, unreadable (``check_images``) or
duplicated is reported in the :class:`~CCELLACore.data.batch.BatchSummary` with its reason and the file, and the
others import; an unknown column or key is a warning in the summary; a table that cannot be read at all is a
:class:`~CCELLACore.errors.ManifestError`. Images are not read, only checked to exist (and their headers read with
``check_images``). Exporters write a list of studies into a layout, so that every importer runs on phantom archives.

Example:
    >>> studies, summary = import_layout(Path("/data/picai"))  # doctest: +SKIP
    >>> summary.details["n_studies"], len(summary.skipped)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable

from ...errors import ManifestError, VolumeError
from ..batch import BatchSummary
from ..manifest import read_manifest, write_manifest
from ..study import LabelSource, Study
from ..volume import read_header, read_volume, volume_format, write_volume

__all__ = ["LAYOUTS", "detect_layout", "import_layout", "export_layout", "summarize"]

#: Layout names accepted by :func:`import_layout`, :func:`export_layout` and ``ccella import --layout``.
LAYOUTS: tuple[str, ...] = ("manifest", "authors_json", "picai", "prostate158")

#: The file a manifest-layout folder holds.
MANIFEST_NAME = "manifest.csv"


# --- shared helpers for the layout modules ------------------------------------------------------------------------
class ImportLog:
    """Collects what one import did: skipped cases (with reasons) and warnings, in a :class:`BatchSummary`."""

    def __init__(self, layout: str, src: Path, *, check_images: bool = False):
        self.summary = BatchSummary(job="import")
        self.summary.details.update({"layout": layout, "source": str(src), "warnings": []})
        self.check_images = check_images
        # An archive's index names its files: none may lie outside the archive (a '../' or absolute path would make
        # the import read, and later copy, any file on disk). The project's own manifest may point anywhere.
        self.root = None if layout == "manifest" else (src if src.is_dir() else src.parent).resolve()

    def skip(self, case_id: str, reason: str) -> None:
        self.summary.skip(case_id, reason)

    def warn(self, where: str, reason: str) -> None:
        self.summary.details["warnings"].append({"where": where, "reason": reason})

    def file_problem(self, path: Path) -> str | None:
        """Why ``path`` cannot be used as a volume (missing, unsupported, unreadable or not 3D), or ``None``.

        Only existence is checked unless ``check_images``; then the header is read (no voxels). A file outside the
        data root (an archive's folder) is refused unread.
        """
        if self.root is not None and not Path(path).resolve().is_relative_to(self.root):
            return f"{path}: outside the data root {self.root} ('../' or an absolute path in the index); not read"
        try:
            volume_format(path)
        except VolumeError as exc:
            return f"{path.name}: {exc.reason}"
        if not path.is_file():
            return f"file not found: {path}"
        if self.check_images:
            try:
                read_header(path)
            except VolumeError as exc:
                return str(exc)
        return None

    def missing_files(self, files: dict[str, Path]) -> str | None:
        """The first problem among ``files`` (name -> path), as a reason naming the file, or ``None``."""
        for name, path in files.items():
            problem = self.file_problem(path)
            if problem is not None:
                return f"{name}: {problem}"
        return None


def read_table(path: Path, known: Iterable[str], required: Iterable[str], log: ImportLog) -> list[tuple[int, dict[str, str]]]:
    """Read a source CSV as ``(line number, row)`` pairs; unknown columns become warnings.

    Raises:
        ManifestError: the file is not UTF-8 or lacks a required column (the whole table is unusable).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(path, f"not valid UTF-8 at byte {exc.start}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in required if c not in columns]
    if missing:
        raise ManifestError(path, f"missing required column(s) {missing}")
    unknown = [c for c in columns if c not in set(known)]
    if unknown:
        log.warn(path.name, f"unknown column(s) {unknown} ignored")
    rows = []
    for line, row in enumerate(reader, start=2):
        rows.append((line, {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}))
    return rows


def stable_hash(text: str) -> int:
    """A hash that is the same on every run and machine (Python's ``hash`` is salted per process)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16)


def single_file_suffix(path: Path) -> str:
    """The file suffix to write ``path``'s format as a single file (detached ``.nhdr``/``.mhd`` become ``.nrrd``/``.mha``)."""
    name = str(path).lower()
    for suffix, single in ((".nii.gz", ".nii.gz"), (".nii", ".nii"), (".nrrd", ".nrrd"), (".nhdr", ".nrrd"), (".mha", ".mha"), (".mhd", ".mha")):
        if name.endswith(suffix):
            return single
    raise VolumeError(path, "unsupported file type")


def copy_volume(src: Path, dst: Path) -> Path:
    """Write ``src`` at ``dst``: a byte copy when the format is the same, else read and convert (e.g. NIfTI -> MHA)."""
    if str(src).lower().endswith(single_file_suffix(dst)):  # same single-file format: no need to decode
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return dst
    return write_volume(read_volume(src, check_finite=False), dst)


def summarize(studies: list[Study], log: ImportLog) -> BatchSummary:
    """Fill the summary's counts: per institution, split, label and label source; patients and their studies."""
    summary = log.summary
    summary.done.extend(s.case_id for s in studies)
    per_patient = Counter(s.patient_id for s in studies)
    summary.details.update(
        {
            "n_studies": len(studies),
            "n_patients": len(per_patient),
            "n_patients_with_several_studies": sum(1 for n in per_patient.values() if n > 1),
            "max_studies_per_patient": max(per_patient.values(), default=0),
            "per_institution": dict(sorted(Counter(s.institution or "unknown" for s in studies).items())),
            "per_split": dict(sorted(Counter(s.split or "unassigned" for s in studies).items())),
            "per_label": dict(sorted(Counter("none" if s.label is None else str(s.label) for s in studies).items())),
            "per_label_source": dict(sorted(Counter(LabelSource(s.label_source).value for s in studies).items())),
            "n_with_report": sum(1 for s in studies if s.has_report),
            "n_with_gland_mask": sum(1 for s in studies if "gland" in s.masks),
            "n_with_lesion_mask": sum(1 for s in studies if "lesion" in s.masks),
        }
    )
    return summary


# --- detection, import, export ------------------------------------------------------------------------------------
def _matches(src: Path) -> list[str]:
    from . import authors_json, picai, prostate158

    if src.is_file():
        if src.suffix.lower() == ".csv":
            return ["manifest"]
        if src.suffix.lower() == ".json" and authors_json.looks_like(src):
            return ["authors_json"]
        return []
    found = []
    if authors_json.looks_like(src):
        found.append("authors_json")
    if picai.looks_like(src):
        found.append("picai")
    if prostate158.looks_like(src):
        found.append("prostate158")
    if (src / MANIFEST_NAME).is_file():
        found.append("manifest")
    return found


def detect_layout(src: Path) -> str:
    """Name the layout of ``src`` (a folder, a manifest CSV or an authors' JSON file).

    Raises:
        ManifestError: naming ``src`` when no layout, or more than one, matches.
    """
    src = Path(src)
    if not src.exists():
        raise ManifestError(src, "not found")
    found = _matches(src)
    if not found:
        raise ManifestError(
            src,
            "no known data layout: expected train.json/test.json (authors' JSON), picai_labels/ with "
            f"picai_public_images_fold*/ (PI-CAI), prostate158_train/ or prostate158_test/ (Prostate158), or {MANIFEST_NAME}",
        )
    if len(found) > 1:
        raise ManifestError(src, f"several layouts match ({', '.join(found)}); choose one with --layout")
    return found[0]


def import_layout(src: Path, layout: str | None = None, *, check_images: bool = False) -> tuple[list[Study], BatchSummary]:
    """Read the studies of ``src`` in ``layout`` (detected when ``None``).

    Args:
        src: the layout's root folder, or a manifest CSV / an authors' JSON file.
        layout: one of :data:`LAYOUTS`, or ``None`` to detect it.
        check_images: also read every image header and skip cases with unreadable or non-3D files.

    Returns:
        The studies (absolute paths) and a summary of counts, skipped cases (with reasons) and warnings.

    Raises:
        ManifestError: ``src`` matches no layout, or a source table is unusable as a whole.
    """
    from . import authors_json, picai, prostate158

    src = Path(src)
    if layout is None:
        layout = detect_layout(src)
    if layout not in LAYOUTS:
        raise ManifestError(src, f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not src.exists():
        raise ManifestError(src, "not found")
    log = ImportLog(layout, src, check_images=check_images)
    if layout == "manifest":
        studies = _import_manifest(src, log)
    else:
        module = {"authors_json": authors_json, "picai": picai, "prostate158": prostate158}[layout]
        studies = module.import_studies(src, log)
    return studies, summarize(studies, log)


def _import_manifest(src: Path, log: ImportLog) -> list[Study]:
    path = src if src.is_file() else src / MANIFEST_NAME
    manifest = read_manifest(path, check_files=True)
    log.summary.extend(manifest.problems)
    studies = []
    for study in manifest.studies:
        problem = log.missing_files({**study.images, **{f"{k} mask": v for k, v in study.masks.items()}}) if log.check_images else None
        if problem:
            log.skip(study.case_id, f"{path.name}: {problem}")
            continue
        studies.append(study)
    return studies


def export_layout(studies: list[Study], layout: str, out_dir: Path) -> Path:
    """Write ``studies`` (with their image and mask files) into ``layout`` under ``out_dir``.

    Returns:
        What :func:`import_layout` reads back: ``out_dir`` for the dataset layouts, the manifest CSV for "manifest".

    Raises:
        DataError: naming the case when a study cannot be written in that layout (see each module's exporter).
    """
    from . import authors_json, picai, prostate158

    out_dir = Path(out_dir)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    ids = Counter(s.case_id for s in studies)
    duplicated = sorted(c for c, n in ids.items() if n > 1)
    if duplicated:
        raise ValueError(f"duplicate case_id(s) {duplicated[:5]} in the studies to export")
    out_dir.mkdir(parents=True, exist_ok=True)
    if layout == "manifest":
        return _export_manifest(studies, out_dir)
    module = {"authors_json": authors_json, "picai": picai, "prostate158": prostate158}[layout]
    return module.export_studies(studies, out_dir)


def _export_manifest(studies: list[Study], out_dir: Path) -> Path:
    """Manifest plus a copy of every file not already under ``out_dir`` (a self-contained folder)."""
    root = out_dir.resolve()
    copied = []
    for study in studies:
        def place(name: str, path: Path) -> Path:
            path = Path(path)
            if path.resolve().is_relative_to(root):
                return path
            return copy_volume(path, out_dir / "cases" / study.case_id / f"{name.lower()}{single_file_suffix(path)}")

        images = {seq: place(seq, p) for seq, p in study.images.items()}
        masks = {name: place(f"{name}_mask", p) for name, p in study.masks.items()}
        copied.append(study.with_paths(images, masks))
    return write_manifest(copied, out_dir / MANIFEST_NAME)
