"""The yardsticks of ``ccella honour`` (:mod:`CCELLACore.metrics.honour`, steps 2-3 of its procedure): real phantom
exams on the model's grid, the gland atlas and mean exams, the anatomy check (gate 0) and the detector on real exams
(gates 1 and 2)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..data.phantoms import generate_phantom
from ..data.normalization import denormalize_array, normalize_volume
from ..data.preprocess import PreprocessConfig, preprocess_exam
from ..data.study import Exam
from .honour_cases import GROUPS, EvaluationCase, HonourSettings, pirads_group, rate, report_side
from .lesion_detector import DetectorThresholds, detect_lesions, region_reading

__all__ = ["ANATOMY_MIN_CORRELATION", "VALIDITY_VARIANTS", "AUTOENCODER_VARIANTS", "real_exam_on_grid",
           "model_representation", "grid_reference", "gland_atlas", "anatomy", "detect", "group_rates", "case_base",
           "detector_validity"]

#: Gate 0, fixed before any generated exam was looked at: an exam "shows anatomy" when, for at least one of the
#: atlas's real exams, every sequence correlates (Pearson, voxel-wise) at least this much with that exam's. The
#: nearest real exam, not the mean one: one real exam in 20 of seed 3000 (an unusual pelvis) correlated only 0.06 with
#: the mean AxT2. Noise and smooth random texture score |r| < 0.03, so the bound leaves a wide margin.
ANATOMY_MIN_CORRELATION = 0.5


def _raw_config(config: PreprocessConfig) -> PreprocessConfig:
    return replace(config, normalize=False)


def real_exam_on_grid(index: int, seed: int, config: PreprocessConfig, settings: HonourSettings) -> Exam:
    """Phantom case ``index`` of ``seed`` rendered and preprocessed onto ``config.grid`` WITHOUT normalisation
    (HighB scanner units, ADC 10^-6 mm^2/s); masks ``gland``/``lesion`` resampled with it. Volumes (X, Y, Z)."""
    phantom = generate_phantom(index, settings.institution, settings.phantom_size, settings.phantom_spacing, seed)
    exam, _ = preprocess_exam(phantom.exam, _raw_config(config))
    return exam


def model_representation(exam: Exam, config: PreprocessConfig, highb_reference: float = 1.0,
                         reconstruct: Callable[[np.ndarray], np.ndarray] | None = None,
                         reconstruct_sequences: tuple[str, ...] = ("HighB", "ADC")) -> Exam:
    """HighB/ADC of a preprocessed (unnormalised) exam as a generated exam shows them: normalised as in training
    (which clips HighB at its 99.5th percentile and ADC to 0..3000), optionally passed through ``reconstruct``
    (normalised (S, X, Y, Z) volumes of ``reconstruct_sequences`` -> the same, e.g. the model's autoencoder; a
    joint autoencoder needs all of an exam's sequences), then mapped back as the pipeline maps outputs."""
    highb = normalize_volume(exam.volumes["HighB"], "HighB", config)
    adc = normalize_volume(exam.volumes["ADC"], "ADC", config)
    arrays = np.stack([highb.array, adc.array]).astype(np.float32)
    if reconstruct is not None:
        if not {"HighB", "ADC"} <= set(reconstruct_sequences):
            raise ValueError(f"reconstruct_sequences {reconstruct_sequences} must hold HighB and ADC")
        given = {"HighB": highb.array, "ADC": adc.array}
        stack = np.stack([given[name] if name in given else normalize_volume(exam.volumes[name], name, config).array
                          for name in reconstruct_sequences]).astype(np.float32)
        out = np.asarray(reconstruct(stack), np.float32)
        arrays = out[[reconstruct_sequences.index("HighB"), reconstruct_sequences.index("ADC")]]
    return Exam(volumes={
        "HighB": highb.with_array(denormalize_array(arrays[0], "HighB", highb_reference)),
        "ADC": adc.with_array(denormalize_array(arrays[1], "ADC", adc_window=tuple(config.adc_window))),
    }, case_id=exam.case_id)


def grid_reference(config: PreprocessConfig, settings: HonourSettings, *,
                   progress: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The gland atlas and the mean exam on ``config.grid``, from phantom cases 0..atlas_n-1 of ``atlas_seed``,
    each preprocessed exactly as for training (centred on its gland, normalised).

    Returns:
        ``(atlas, exams)``: atlas = bool (X, Y, Z), the voxel-wise mean of ``gland > 0`` thresholded at > 0.5;
        exams = per sequence the (atlas_n, X, Y, Z) float32 normalised volumes, the yardstick of the anatomy check.
    """
    from tqdm.auto import tqdm

    total = np.zeros(tuple(config.grid.size), np.float64)
    exams: dict[str, list[np.ndarray]] = {}
    for index in tqdm(range(settings.atlas_n), desc="gland atlas", unit="exam", disable=not progress):
        phantom = generate_phantom(index, settings.institution, settings.phantom_size, settings.phantom_spacing,
                                   settings.atlas_seed)
        on_grid, _ = preprocess_exam(phantom.exam, config)
        total += on_grid.masks["gland"].array > 0
        for name, volume in on_grid.volumes.items():
            exams.setdefault(name, []).append(np.asarray(volume.array, np.float32))
    return total / settings.atlas_n > 0.5, {name: np.stack(arrays) for name, arrays in exams.items()}


def gland_atlas(config: PreprocessConfig, settings: HonourSettings, *, progress: bool = False) -> np.ndarray:
    """The atlas of :func:`grid_reference`: bool array (X, Y, Z) = ``config.grid.size``."""
    return grid_reference(config, settings, progress=progress)[0]


def _standardise(x: np.ndarray) -> np.ndarray:
    """Rows of (K, V) (or one (V,)) to zero mean and unit norm, so that a dot product is Pearson's r."""
    x = x - x.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def anatomy(exam: Exam, references: dict[str, np.ndarray]) -> dict[str, Any]:
    """Gate 0's check against the real exams of :func:`grid_reference` (any linear unit: the pipeline's outputs are
    linear in the normalised volumes).

    Returns:
        ``{"anatomy": bool, "anatomy_r": {sequence: r}}``: r with the nearest real exam (the one whose worst
        sequence correlates best), and whether all reach :data:`ANATOMY_MIN_CORRELATION`.
    """
    names = [name for name in references if name in exam.volumes]
    if not names:
        return {"anatomy": False, "anatomy_r": {}}
    r = np.stack([
        _standardise(references[name].reshape(len(references[name]), -1).astype(np.float64))
        @ _standardise(np.asarray(exam.volumes[name].array, np.float64).ravel())
        for name in names])  # (sequences, K)
    nearest = int(np.argmax(r.min(axis=0)))
    values = {name: round(float(r[i, nearest]), 4) for i, name in enumerate(names)}
    return {"anatomy": min(values.values()) >= ANATOMY_MIN_CORRELATION, "anatomy_r": values}


def detect(exam: Exam, gland: np.ndarray, truth_side: str | None, thresholds: DetectorThresholds,
           against: Exam | None = None) -> dict[str, Any]:
    """The detector's verdict on ``exam``; with ``against`` (another exam on the grid, e.g. the real exam that
    ``exam`` reconstructs) also ``regions``: each detected region's volume and readings in both exams."""
    detection = detect_lesions(exam, gland, thresholds)
    largest = detection.largest
    side = largest.side if largest is not None else None
    out = {
        "detected": detection.found,
        "detected_side": side,
        "side_correct": (side == truth_side) if (side is not None and truth_side is not None) else None,
        "n_detections": len(detection.lesions),
        "largest_volume_mm3": round(largest.volume_mm3, 1) if largest is not None else 0.0,
    }
    if against is not None:
        out["regions"] = []
        for k, lesion in enumerate(detection.lesions, start=1):
            adc, highb_ratio = region_reading(against, gland, detection.regions == k)
            out["regions"].append({"volume_mm3": round(lesion.volume_mm3, 1), "adc": round(lesion.mean_adc, 1),
                                   "highb_ratio": round(lesion.highb_ratio, 3), "real_adc": round(adc, 1),
                                   "real_highb_ratio": round(highb_ratio, 3)})
    return out


def group_rates(records: Iterable[dict[str, Any]], key: str = "detected") -> dict[str, Any]:
    """Per group: P(key) as a rate, plus side accuracy over detections with a known report side."""
    records = list(records)
    out: dict[str, Any] = {}
    for group in GROUPS:
        members = [r for r in records if r["group"] == group]
        found = [r for r in members if r[key]]
        out[group] = {"lesion_found": rate(len(found), len(members))}
    sided = [r for r in records if r.get(f"{key}_side") is not None and r["truth_side"] is not None]
    out["side_correct"] = rate(sum(1 for r in sided if r[f"{key}_side"] == r["truth_side"]), len(sided))
    sided_45 = [r for r in sided if r["group"] == "pirads_4_5"]
    out["side_correct_pirads_4_5"] = rate(sum(1 for r in sided_45 if r[f"{key}_side"] == r["truth_side"]),
                                          len(sided_45))
    return out


def case_base(case: EvaluationCase) -> dict[str, Any]:
    truth = case.truth
    return {"case_index": case.index, "case_id": truth.case_id, "group": pirads_group(truth.pirads),
            "truth_pirads": truth.pirads, "truth_label": truth.label, "truth_side": report_side(truth)}


#: Detector-validity variants: (representation, gland region); the autoencoder one only when a model is given.
VALIDITY_VARIANTS = (("model", "atlas"), ("model", "own"), ("physical", "atlas"), ("physical", "own"))
AUTOENCODER_VARIANTS = (("autoencoder", "atlas"), ("autoencoder", "own"))


def detector_validity(
    cases: Sequence[EvaluationCase],
    config: PreprocessConfig,
    atlas: np.ndarray,
    settings: HonourSettings,
    *,
    highb_reference: float = 1.0,
    thresholds: DetectorThresholds = DetectorThresholds(),
    reconstruct: Callable[[np.ndarray], np.ndarray] | None = None,
    references: dict[str, np.ndarray] | None = None,
    seed: int | None = None,
    progress: bool = False,
    reconstruct_sequences: tuple[str, ...] = ("HighB", "ADC"),
) -> dict[str, Any]:
    """The detector on the REAL phantom exams of ``cases`` (seed ``seed``, default ``settings.seed``), on
    ``config.grid``; with ``references`` (:func:`grid_reference`) also the anatomy check on them.

    ``reconstruct`` (normalised (S, X, Y, Z) volumes of ``reconstruct_sequences`` -> reconstruction) adds the
    ``autoencoder`` representation, and per record ``autoencoder_<gland>_regions``: each region detected through
    the autoencoder with its volume, ADC and HighB ratio there and in the real exam (``real_adc``,
    ``real_highb_ratio``; the model representation the autoencoder was given), which says whether the
    autoencoder made a region dark on ADC or bright on HighB that the real exam holds only at the border.

    Returns:
        ``{"records": [...], "summary": {"<representation>_<gland>": {group: {"lesion_found": rate}, "side_correct":
        rate, "sensitivity": rate, "false_positive_rate": rate}}}`` for the representations ``model``/``physical``
        and gland regions ``atlas``/``own`` (see the module docstring), and ``autoencoder`` with ``reconstruct``.
    """
    from tqdm.auto import tqdm

    variants = VALIDITY_VARIANTS + (AUTOENCODER_VARIANTS if reconstruct is not None else ())
    seed = settings.seed if seed is None else seed
    records = []
    for case in tqdm(cases, desc="detector on real exams", unit="exam", disable=not progress):
        base = case_base(case)
        raw = real_exam_on_grid(case.index, seed, config, settings)
        views = {"physical": raw, "model": model_representation(raw, config, highb_reference)}
        if reconstruct is not None:
            views["autoencoder"] = model_representation(raw, config, highb_reference, reconstruct,
                                                        reconstruct_sequences)
        glands = {"atlas": atlas, "own": raw.masks["gland"].array > 0}
        if references is not None:  # judged as training sees them (normalised: raw AxT2 has a long fluid tail)
            normalised = Exam(volumes={name: normalize_volume(v, name, config) for name, v in raw.volumes.items()})
            base.update(anatomy(normalised, references))
        record = dict(base)
        for representation, region in variants:
            # through the autoencoder, each region is also read in the exam it reconstructs
            against = views["model"] if representation == "autoencoder" else None
            result = detect(views[representation], glands[region], base["truth_side"], thresholds, against)
            record[f"{representation}_{region}"] = result["detected"]
            record[f"{representation}_{region}_side"] = result["detected_side"]
            if against is not None:
                record[f"{representation}_{region}_regions"] = result["regions"]
        records.append(record)
    summary = {}
    for representation, region in variants:
        key = f"{representation}_{region}"
        rates = group_rates(records, key)
        rates["sensitivity"] = rates["pirads_4_5"]["lesion_found"]
        rates["false_positive_rate"] = rates["pirads_1_2"]["lesion_found"]
        summary[key] = rates
    if references is not None:
        summary["anatomy"] = rate(sum(r["anatomy"] for r in records), len(records))
    return {"records": records, "summary": summary}

