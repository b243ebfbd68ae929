"""``ccella preprocess`` over a manifest: every study through :func:`~CCELLACore.data.preprocess.preprocess_study`,
resumable, in worker processes, bad cases reported and not fatal; gland masks from a folder for studies without one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..fileio import atomic_write_json, read_json
from .batch import BatchSummary
from .preprocess import (DONE_FILE, PreprocessConfig, _check_sequences, _preprocess_study, case_folder_name,
                         config_hash)
from .study import MASKS, SEQUENCES, Study
from .volume import single_itk_thread

__all__ = ["MASK_SUFFIXES", "gland_masks_from_folder", "preprocess_manifest"]

logger = logging.getLogger("CCELLACore")


def _fingerprint(study: Study, config_digest: str) -> str:
    """Config hash plus each input's name, size and modification time: a change in any recomputes the case."""
    items = []
    for key, path in sorted({**study.images, **study.masks}.items()):
        try:
            stat = Path(path).stat()
            items.append([key, str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
        except OSError:
            items.append([key, str(path), None, None])
    text = json.dumps({"config": config_digest, "inputs": items}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class _CaseResult:
    case_id: str
    status: str  # "done", "reused" or "skipped"
    study: Study | None = None
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def _reuse(study: Study, case_dir: Path, fingerprint: str) -> _CaseResult | None:
    """The finished result of an earlier run, if ``done.json`` matches and every file it lists is there."""
    done = case_dir / DONE_FILE
    if not done.is_file():
        return None
    try:
        record = read_json(done)
    except Exception:  # an unreadable record means "not done"
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    files = record.get("files", {})
    if not isinstance(files, dict) or not all((case_dir / f).is_file() for f in files.values()):
        return None
    images = {k: case_dir / f for k, f in files.items() if k in SEQUENCES}
    masks = {k: case_dir / f for k, f in files.items() if k in MASKS}
    if set(images) != set(study.images) or set(masks) != set(study.masks):
        return None
    info = {"center": record.get("center", ""), "normalization": record.get("normalization", {})}
    return _CaseResult(study.case_id, "reused", study.with_paths(images, masks), info=info)


def _run_case(study: Study, config: PreprocessConfig, digest: str, cases_dir: Path, allow_missing: bool) -> _CaseResult:
    """Process or reuse one case; never raises for a bad case (the batch goes on)."""
    case_dir = cases_dir / case_folder_name(study.case_id)
    try:
        _check_sequences(study, allow_missing)
        fingerprint = _fingerprint(study, digest)
        reused = _reuse(study, case_dir, fingerprint)
        if reused is not None:
            return reused
        if (case_dir / DONE_FILE).exists():
            (case_dir / DONE_FILE).unlink()  # stale: the files are about to change
        new_study, info = _preprocess_study(study, config, case_dir, allow_missing)
        record = {
            "case_id": study.case_id,
            "fingerprint": fingerprint,
            "config_hash": digest,
            "files": {k: Path(p).name for k, p in {**new_study.images, **new_study.masks}.items()},
            "center": info["center"],
            "normalization": info["normalization"],
        }
        atomic_write_json(case_dir / DONE_FILE, record)  # last: its presence means the case is complete
        return _CaseResult(study.case_id, "done", new_study, info=info)
    except DataError as exc:
        return _CaseResult(study.case_id, "skipped", reason=exc.reason)
    except Exception as exc:  # an unexpected failure of one case must not stop the batch
        logger.debug("case %s failed", study.case_id, exc_info=True)
        return _CaseResult(study.case_id, "skipped", reason=f"unexpected {type(exc).__name__}: {exc}")


#: File name endings tried for a case's mask in a masks folder, in this order.
MASK_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".nrrd")


def gland_masks_from_folder(studies: list[Study], masks_dir: str | Path) -> list[Study]:
    """``studies`` with the gland mask ``<masks_dir>/<case_id>.nii.gz`` (or ``.nii``, ``.mha``, ``.nrrd``) added
    where the study has none; a mask the manifest names wins. Any value > 0 is gland (binary whole-gland masks, as
    PI-CAI's ``anatomical_delineations/whole_gland/AI/Bosma22b/<patient_id>_<study_id>.nii.gz``, or zone maps).

    Raises:
        DataError: ``masks_dir`` is not a folder.
    """
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise DataError("<all>", f"{masks_dir}: masks folder not found")
    out = []
    for study in studies:
        if "gland" not in study.masks:
            found = next((masks_dir / f"{study.case_id}{suffix}" for suffix in MASK_SUFFIXES
                          if (masks_dir / f"{study.case_id}{suffix}").is_file()), None)
            if found is not None:
                study = study.with_paths(study.images, {**study.masks, "gland": found})
        out.append(study)
    return out


def preprocess_manifest(
    manifest_path: str | Path,
    config: PreprocessConfig,
    out_dir: str | Path,
    *,
    workers: int = 2,
    allow_missing: bool = False,
    progress: bool = True,
    details: dict[str, Any] | None = None,
    masks_dir: str | Path | None = None,
) -> BatchSummary:
    """Preprocess every study of a manifest; resumable; bad cases are reported, not fatal.

    Writes ``<out>/cases/<case>/{axt2,highb,adc,gland,lesion}.nii.gz`` + ``done.json`` (last, atomically: the case is
    complete and holds the config/input fingerprint), ``<out>/manifest.csv`` (same labels and reports, new paths;
    finished cases only, in the input order) and ``<out>/preprocess_summary.json``.

    Args:
        workers: processes (``concurrent.futures.ProcessPoolExecutor``); 1 = in this process.
        allow_missing: process studies lacking HighB or ADC with what they have (else they are skipped).
        details: extra entries for the summary (e.g. config name and target).
        masks_dir: gland masks for studies whose manifest row has none, one file per case named by its case id
            (:func:`gland_masks_from_folder`; PI-CAI's AI whole-gland delineations have this layout). Cases left
            without a mask are centred on the AxT2 volume, with one warning naming them.

    Returns:
        The summary (``done``, ``reused``, ``skipped`` with reasons naming files).
    """
    from tqdm.auto import tqdm

    from .manifest import read_manifest, write_manifest

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    manifest = read_manifest(manifest_path)
    summary = BatchSummary("preprocess")
    summary.extend(manifest.problems)
    if masks_dir is not None:
        manifest.studies = gland_masks_from_folder(manifest.studies, masks_dir)
    digest = config_hash(config)
    cases_dir = out_dir / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, _CaseResult] = {}
    bar = tqdm(total=len(manifest.studies), desc="preprocess", unit="case", disable=not progress, file=sys.stderr)
    if workers == 1:
        for study in manifest.studies:
            results[study.case_id] = _run_case(study, config, digest, cases_dir, allow_missing)
            bar.update(1)
    else:
        import multiprocessing

        # "spawn": safe whatever the parent imported (forking a process with torch threads can deadlock).
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=single_itk_thread) as pool:
            futures = {pool.submit(_run_case, s, config, digest, cases_dir, allow_missing): s.case_id
                       for s in manifest.studies}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
    bar.close()

    finished: list[Study] = []
    centers = {"gland": 0, "volume": 0}
    unmasked: list[str] = []
    for study in manifest.studies:  # input order, whatever order the workers finished in
        result = results[study.case_id]
        if result.status == "skipped":
            summary.skip(result.case_id, result.reason)
            continue
        (summary.done if result.status == "done" else summary.reused).append(result.case_id)
        centers[result.info.get("center", "volume")] = centers.get(result.info.get("center", "volume"), 0) + 1
        if config.center == "gland" and "gland" not in study.masks:
            unmasked.append(study.case_id)
        finished.append(result.study)  # type: ignore[arg-type]
    if unmasked:
        shown = ", ".join(unmasked[:20]) + (f", ... ({len(unmasked)} in all)" if len(unmasked) > 20 else "")
        logger.warning("%d case(s) have no gland mask and were centred on the AxT2 volume instead of the gland: %s "
                       "(give masks with --masks DIR, one <case_id>.nii.gz per case)", len(unmasked), shown)

    write_manifest(finished, out_dir / "manifest.csv")
    from ..config import to_dict

    summary.details.update({
        **(details or {}),
        "config": to_dict(config),
        "config_hash": digest,
        "n_studies": len(manifest.studies),
        "centered_on": centers,
        "no_gland_mask": unmasked,
        "manifest": "manifest.csv",
    })
    summary.write(out_dir / "preprocess_summary.json")
    logger.info("%s", summary)
    return summary
