"""Does a generative model honour its reports? The figures of a model card's "report faithfulness" section.

Procedure (issues "Generative core" and "Embedded demo model"):

1. **The detector is fixed first**: :func:`~CCELLACore.metrics.lesion_detector.detect_lesions` with its default
   :class:`~CCELLACore.metrics.lesion_detector.DetectorThresholds`, written down before any generated exam was seen.
   Nothing here tunes it.
2. **Gland region of generated exams.** A generated exam has no gland mask. The model was trained on exams
   preprocessed onto ``config.preprocess.ldm.grid`` *centred on the gland*, so its outputs put the gland at the grid
   centre. We use a gland ATLAS on that grid: the voxel-wise mean of ``gland > 0`` over ``atlas_n`` real phantom
   exams preprocessed exactly as for training, thresholded at > 0.5. The atlas exams come from ``atlas_seed``, a
   phantom seed disjoint from the evaluation seed, so the atlas knows nothing of the evaluated cases. The atlas is
   indexed in voxels, and the generated grid has the same size and spacing (checked), so it applies voxel for voxel.
3. **Detector validity before judging the model**: the detector runs on the REAL phantom exams of the evaluation
   cases, preprocessed onto the same grid, with the atlas and with each exam's own gland mask, in two
   representations:

   - ``model``: what a generated exam looks like: the training normalisation (HighB per-volume percentiles
     0..99.5 clipped to [0, 1], ADC window 0..3000 clipped) mapped back the way the pipeline maps its outputs
     (HighB x the model's reference intensity, ADC x 3000). This is the representation generated exams are judged
     in, so its sensitivity is the ceiling the model can reach.
   - ``physical``: the same grid without normalisation (HighB scanner units, ADC in 10^-6 mm^2/s unclipped).
   - ``autoencoder`` (when the model's autoencoder is given): the ``model`` representation encoded and decoded by
     the model's own autoencoder. A latent diffusion model can be no sharper than its autoencoder, so this is the
     tighter ceiling: when the autoencoder blurs lesions below the detector's thresholds, no amount of diffusion
     training can meet the targets, and the card says so.

   It reports the sensitivity on PI-RADS >= 4 exams and the false-positive rate on PI-RADS 1-2 exams.
4. **Evaluation**: ``n`` phantom reports of ``seed`` (never used in training; institution 1), scanning case indices
   0, 1, 2, ... and keeping the first ``n`` non-empty reports. Each is generated with ``pipe(report, seed=k, ...)``
   (k = its position 0..n-1), the detector runs with the atlas, and we record: lesion found; the side of the largest
   detection vs the side of the report's index lesion (highest PI-RADS, then longest); the predicted class
   probability vs the truth label (AUC, rank formula). Targets: a lesion in >= 80% of exams whose report describes a
   PI-RADS >= 4 lesion, in <= 20% of PI-RADS 1-2 exams; PI-RADS 3 exams are reported separately.

Outputs (:func:`~CCELLACore.metrics.honour_card.write_honour`): ``honour.json`` (per-case records and the summary, never report text) and
``honour.md`` (a Markdown section ready for a model card). :func:`~CCELLACore.metrics.honour_card.update_model_card` puts that section between
``<!-- honour:start -->`` and ``<!-- honour:end -->`` in the model directory's README.md (``model_hash`` covers only
weights files, so the hash does not change; this is checked).

Example:
    >>> pipe = CCELLAPipeline.from_pretrained("CCELLACore/demo_model")           # doctest: +SKIP
    >>> result = evaluate_honour(pipe, HonourSettings(n=50, steps=20))           # doctest: +SKIP
    >>> write_honour(result, "out/honour")                                        # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..data.phantoms import CaseTruth, generate_phantom, phantom_report, sample_truth
from ..data.preprocess import PreprocessConfig, denormalize_array, normalize_volume, preprocess_exam
from ..data.study import Exam
from ..errors import CCELLAError
from ..reports import is_empty_report
from .lesion_detector import DetectorThresholds, detect_lesions

__all__ = [
    "HonourSettings",
    "EvaluationCase",
    "GROUPS",
    "rank_auc",
    "rate",
    "pirads_group",
    "report_side",
    "evaluation_cases",
    "real_exam_on_grid",
    "model_representation",
    "gland_atlas",
    "detector_validity",
    "grid_reference",
    "anatomy",
    "model_settings",
    "evaluate_honour",
    "honour_gates",
    "ANATOMY_MIN_CORRELATION",
]

logger = logging.getLogger("CCELLACore")

#: Report groups: the two with targets, and PI-RADS 3 (reported separately).
GROUPS = ("pirads_4_5", "pirads_1_2", "pirads_3")
_GROUP_TITLES = {"pirads_4_5": "PI-RADS >= 4", "pirads_1_2": "PI-RADS 1-2", "pirads_3": "PI-RADS 3"}
#: The issue's targets: P(lesion found | group) bounds.
TARGETS = {"pirads_4_5": (">=", 0.8), "pirads_1_2": ("<=", 0.2)}
#: Gate 0, fixed before any generated exam was looked at: an exam "shows anatomy" when, for at least one of the
#: atlas's real exams, every sequence correlates (Pearson, voxel-wise) at least this much with that exam's. The
#: nearest real exam, not the mean one: one real exam in 20 of seed 3000 (an unusual pelvis) correlated only 0.06 with
#: the mean AxT2. Noise and smooth random texture score |r| < 0.03, so the bound leaves a wide margin.
ANATOMY_MIN_CORRELATION = 0.5


@dataclass(frozen=True)
class HonourSettings:
    """What an honour evaluation runs (``ccella honour`` options).

    Args:
        n: evaluated reports (issue: 50).
        seed: phantom world seed of the evaluated reports; must not have been used in training.
        atlas_seed: phantom seed of the gland-atlas exams (disjoint from ``seed``).
        atlas_n: exams averaged into the gland atlas (and into the mean exam of the anatomy check).
        validation_seed: phantom seed on which the detector's validity (gate 1) is judged, disjoint from ``seed``,
            so that the detector is never tuned on the cases of the final figures.
        steps, sampler, guidance: generation settings; None = the model's own ``sampling:`` defaults.
        institution: phantom institution of both (1: the reference protocol).
        phantom_size, phantom_spacing: grid the real phantom exams are rendered on before preprocessing; None = the
            model's ``phantoms:`` section (the grid its training phantoms had), else the institution's default.
    """

    n: int = 50
    seed: int = 1000
    atlas_seed: int = 2000
    atlas_n: int = 40
    validation_seed: int = 3000
    steps: int | None = None
    sampler: str | None = None
    guidance: float | None = None
    institution: int = 1
    phantom_size: tuple[int, int, int] | None = None
    phantom_spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.n < 1 or self.atlas_n < 1 or (self.steps is not None and self.steps < 1):
            raise CCELLAError(f"n, atlas_n and steps must be >= 1, got {self.n}, {self.atlas_n}, {self.steps}")
        if len({self.seed, self.atlas_seed, self.validation_seed}) < 3:
            raise CCELLAError(f"the evaluation, atlas and validation seeds must all differ, got {self.seed}, "
                              f"{self.atlas_seed}, {self.validation_seed}")
        if self.guidance is not None and self.guidance < 0:
            raise CCELLAError(f"guidance must be >= 0, got {self.guidance}")


@dataclass(frozen=True)
class EvaluationCase:
    """One evaluated phantom case: its index in the phantom world, truth and report (the text stays in memory)."""

    index: int
    truth: CaseTruth
    report: str


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------
def rank_auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve by the rank (Mann-Whitney U) formula, ties given their average rank.

    AUC = (sum of positive ranks - P (P + 1) / 2) / (P N), ranks 1-based over all scores.

    Returns:
        The AUC in [0, 1], or None when only one class is present (or no score is finite).
    """
    pairs = [(float(s), int(y)) for s, y in zip(scores, labels) if y is not None and math.isfinite(float(s))]
    n_pos = sum(1 for _, y in pairs if y == 1)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    values = np.array([s for s, _ in pairs])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0  # average 1-based rank of the tie block
        i = j + 1
    positive_rank_sum = sum(r for r, (_, y) in zip(ranks, pairs) if y == 1)
    return float((positive_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def rate(k: int, n: int) -> dict[str, Any]:
    """``{"k", "n", "rate", "count"}`` with ``count`` = "k/n" and ``rate`` None when n = 0."""
    return {"k": int(k), "n": int(n), "rate": (k / n) if n else None, "count": f"{int(k)}/{int(n)}"}


def pirads_group(pirads: int) -> str:
    """``"pirads_4_5"``, ``"pirads_1_2"`` or ``"pirads_3"``."""
    return "pirads_4_5" if pirads >= 4 else "pirads_1_2" if pirads <= 2 else "pirads_3"


def report_side(truth: CaseTruth) -> str | None:
    """Side ("left"/"right") of the report's index lesion: highest PI-RADS, then longest; None without lesions."""
    if not truth.lesions:
        return None
    return max(truth.lesions, key=lambda lesion: (lesion.pirads, lesion.diameter_mm)).side


def evaluation_cases(n: int, seed: int, institution: int = 1) -> list[EvaluationCase]:
    """The first ``n`` phantom cases (indices 0, 1, 2, ...) of ``seed`` whose report is not empty (~10% are).

    Raises:
        CCELLAError: fewer than ``n`` non-empty reports in the first ``20 n + 100`` indices (cannot happen with
            the phantom world's ~10% empty reports, but never loop forever).
    """
    cases: list[EvaluationCase] = []
    for index in range(20 * n + 100):
        truth = sample_truth(index, institution, seed)
        report = phantom_report(truth, seed)
        if not is_empty_report(report):
            cases.append(EvaluationCase(index, truth, report))
            if len(cases) == n:
                return cases
    raise CCELLAError(f"phantom seed {seed}: only {len(cases)} non-empty reports in {20 * n + 100} cases")


def _raw_config(config: PreprocessConfig) -> PreprocessConfig:
    return replace(config, normalize=False)


def real_exam_on_grid(index: int, seed: int, config: PreprocessConfig, settings: HonourSettings) -> Exam:
    """Phantom case ``index`` of ``seed`` rendered and preprocessed onto ``config.grid`` WITHOUT normalisation
    (HighB scanner units, ADC 10^-6 mm^2/s); masks ``gland``/``lesion`` resampled with it. Volumes (X, Y, Z)."""
    phantom = generate_phantom(index, settings.institution, settings.phantom_size, settings.phantom_spacing, seed)
    exam, _ = preprocess_exam(phantom.exam, _raw_config(config))
    return exam


def model_representation(exam: Exam, config: PreprocessConfig, highb_reference: float = 1.0,
                         reconstruct: Callable[[np.ndarray], np.ndarray] | None = None) -> Exam:
    """HighB/ADC of a preprocessed (unnormalised) exam as a generated exam shows them: normalised as in training
    (which clips HighB at its 99.5th percentile and ADC to 0..3000), optionally passed through ``reconstruct``
    (normalised (2, X, Y, Z) HighB/ADC -> the same, e.g. the model's autoencoder), then mapped back as the pipeline
    maps outputs."""
    highb = normalize_volume(exam.volumes["HighB"], "HighB", config)
    adc = normalize_volume(exam.volumes["ADC"], "ADC", config)
    arrays = np.stack([highb.array, adc.array]).astype(np.float32)
    if reconstruct is not None:
        arrays = np.asarray(reconstruct(arrays), np.float32)
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


def _detect(exam: Exam, gland: np.ndarray, truth_side: str | None, thresholds: DetectorThresholds) -> dict[str, Any]:
    detection = detect_lesions(exam, gland, thresholds)
    largest = detection.largest
    side = largest.side if largest is not None else None
    return {
        "detected": detection.found,
        "detected_side": side,
        "side_correct": (side == truth_side) if (side is not None and truth_side is not None) else None,
        "n_detections": len(detection.lesions),
        "largest_volume_mm3": round(largest.volume_mm3, 1) if largest is not None else 0.0,
    }


def _group_rates(records: Iterable[dict[str, Any]], key: str = "detected") -> dict[str, Any]:
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


def _case_base(case: EvaluationCase) -> dict[str, Any]:
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
) -> dict[str, Any]:
    """The detector on the REAL phantom exams of ``cases`` (seed ``seed``, default ``settings.seed``), on
    ``config.grid``; with ``references`` (:func:`grid_reference`) also the anatomy check on them.

    ``reconstruct`` (normalised (2, X, Y, Z) HighB/ADC -> reconstruction) adds the ``autoencoder`` representation.

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
        base = _case_base(case)
        raw = real_exam_on_grid(case.index, seed, config, settings)
        views = {"physical": raw, "model": model_representation(raw, config, highb_reference)}
        if reconstruct is not None:
            views["autoencoder"] = model_representation(raw, config, highb_reference, reconstruct)
        glands = {"atlas": atlas, "own": raw.masks["gland"].array > 0}
        if references is not None:  # judged as training sees them (normalised: raw AxT2 has a long fluid tail)
            normalised = Exam(volumes={name: normalize_volume(v, name, config) for name, v in raw.volumes.items()})
            base.update(anatomy(normalised, references))
        record = dict(base)
        for representation, region in variants:
            result = _detect(views[representation], glands[region], base["truth_side"], thresholds)
            record[f"{representation}_{region}"] = result["detected"]
            record[f"{representation}_{region}_side"] = result["detected_side"]
        records.append(record)
    summary = {}
    for representation, region in variants:
        key = f"{representation}_{region}"
        rates = _group_rates(records, key)
        rates["sensitivity"] = rates["pirads_4_5"]["lesion_found"]
        rates["false_positive_rate"] = rates["pirads_1_2"]["lesion_found"]
        summary[key] = rates
    if references is not None:
        summary["anatomy"] = rate(sum(r["anatomy"] for r in records), len(records))
    return {"records": records, "summary": summary}


# ----------------------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------------------
#: Sampling settings the honour records as the pipeline applied them (the model's defaults; no command-line option).
SAMPLING_EXTRAS = ("guidance_interval", "side_contrast", "side_scale")


def model_settings(pipe: Any, settings: HonourSettings) -> HonourSettings:
    """``settings`` with every unset generation option and phantom grid taken from the model folder."""
    sampling, grid = pipe.config.sampling, pipe.config.phantoms
    return replace(
        settings,
        steps=sampling.steps if settings.steps is None else settings.steps,
        sampler=settings.sampler or sampling.sampler,
        guidance=sampling.guidance if settings.guidance is None else settings.guidance,
        phantom_size=settings.phantom_size or grid.size,
        phantom_spacing=settings.phantom_spacing or grid.spacing,
    )


def evaluate_honour(pipe: Any, settings: HonourSettings = HonourSettings(), *, progress: bool = True,
                    thresholds: DetectorThresholds = DetectorThresholds()) -> dict[str, Any]:
    """Run the whole evaluation with a loaded :class:`~CCELLACore.pipelines.generation.CCELLAPipeline`.

    Returns:
        A JSON-able dict: ``settings``, ``detector`` (thresholds), ``atlas`` (voxels, mm^3), ``detector_validity``
        (records and summary), ``records`` (per generated case: case index/id, group, truth PI-RADS/label/side,
        detected, detected side, side correct, probability; never report text) and ``summary`` (rates with counts,
        targets met, AUC).
    """
    from tqdm.auto import tqdm

    from ..precision import describe_device

    started = time.perf_counter()
    settings = model_settings(pipe, settings)
    config: PreprocessConfig = pipe.config.preprocess.ldm
    grid_size = tuple(int(s) for s in pipe.metadata["grid_size"])
    if grid_size != tuple(config.grid.size):
        raise CCELLAError(f"model output grid {grid_size} differs from its preprocess grid "
                          f"{tuple(config.grid.size)}: the gland atlas would not line up")
    sampler = settings.sampler or None
    if sampler is not None and sampler not in pipe.supported_samplers:
        raise CCELLAError(f"sampler {sampler!r} is not supported by this {pipe.objective} model; "
                          f"choose one of {list(pipe.supported_samplers)}")
    highb_reference = float(pipe.metadata.get("reference_intensities", {}).get("HighB", 1.0) or 1.0)

    cases = evaluation_cases(settings.n, settings.seed, settings.institution)
    atlas, references = grid_reference(config, settings, progress=progress)
    if not atlas.any():
        raise CCELLAError(f"the gland atlas of seed {settings.atlas_seed} is empty on grid {grid_size}")
    # Gate 1 on the validation seed; the evaluation seed's real exams give the yardsticks of gates 2 and 3.
    validation = detector_validity(evaluation_cases(settings.n, settings.validation_seed, settings.institution),
                                   config, atlas, settings, highb_reference=highb_reference, thresholds=thresholds,
                                   references=references, seed=settings.validation_seed, progress=progress)
    validity = detector_validity(cases, config, atlas, settings, highb_reference=highb_reference,
                                 thresholds=thresholds, reconstruct=pipe.reconstruct, references=references,
                                 progress=progress)

    records = []
    sampler_used, extras = None, {}
    for k, case in enumerate(tqdm(cases, desc="generate + detect", unit="exam", disable=not progress)):
        out = pipe(case.report, seed=k, steps=settings.steps, sampler=sampler, guidance=settings.guidance)
        sampler_used = out.settings.get("sampler", sampler)
        extras = {key: out.settings[key] for key in SAMPLING_EXTRAS if key in out.settings}
        if tuple(out.exam.volumes["ADC"].shape) != atlas.shape:
            raise CCELLAError(f"generated exam {tuple(out.exam.volumes['ADC'].shape)} and gland atlas "
                              f"{atlas.shape} differ in size")
        base = _case_base(case)
        record = {**base, "seed": k, **_detect(out.exam, atlas, base["truth_side"], thresholds),
                  **anatomy(out.exam, references), "probability": round(float(out.class_probability), 6)}
        records.append(record)

    summary = _group_rates(records)
    for group, (op, bound) in TARGETS.items():
        value = summary[group]["lesion_found"]["rate"]
        summary[group]["target"] = f"{op} {bound:.0%}"
        summary[group]["meets_target"] = None if value is None else (value >= bound if op == ">=" else value <= bound)
    labelled = [r for r in records if r["truth_label"] is not None]
    summary["auc"] = {
        "value": rank_auc([r["probability"] for r in labelled], [r["truth_label"] for r in labelled]),
        "positives": sum(1 for r in labelled if r["truth_label"] == 1),
        "negatives": sum(1 for r in labelled if r["truth_label"] == 0),
    }
    # The adapter judged against the report: PI-RADS >= 4 vs PI-RADS 1-2 (labels are drawn from P(csPCa | PI-RADS),
    # so no report-only predictor separates the labels much better than the report groups allow).
    grouped = [r for r in records if r["group"] in ("pirads_4_5", "pirads_1_2")]
    summary["auc_report"] = {
        "value": rank_auc([r["probability"] for r in grouped], [int(r["group"] == "pirads_4_5") for r in grouped]),
        "positives": sum(1 for r in grouped if r["group"] == "pirads_4_5"),
        "negatives": sum(1 for r in grouped if r["group"] == "pirads_1_2"),
    }
    summary["anatomy"] = rate(sum(r["anatomy"] for r in records), len(records))
    spacing = tuple(float(s) for s in config.grid.spacing)
    return {
        "settings": {
            "model_hash": pipe.model_hash, "steps": settings.steps, "sampler": sampler_used, "guidance": settings.guidance,
            **extras,  # the model's other sampling defaults, as the pipeline applied them
            "n": settings.n, "seed": settings.seed, "case_indices": [c.index for c in cases],
            "generation_seeds": f"0..{settings.n - 1}", "atlas_seed": settings.atlas_seed,
            "atlas_n": settings.atlas_n, "validation_seed": settings.validation_seed,
            "institution": settings.institution,
            "phantom_size": list(settings.phantom_size) if settings.phantom_size else None,
            "phantom_spacing": list(settings.phantom_spacing) if settings.phantom_spacing else None,
            "grid_size": list(grid_size), "grid_spacing": list(spacing),
            "machine": describe_device(pipe.device), "wall_time_s": round(time.perf_counter() - started, 2),
        },
        "detector": asdict(thresholds),
        "atlas": {"voxels": int(atlas.sum()), "volume_cc": round(float(atlas.sum()) * float(np.prod(spacing)) / 1000, 2)},
        "detector_validity": validity,
        "detector_validation": validation,
        "records": records,
        "summary": summary,
    }


def _check(figure: str, target: str, met: bool | None) -> dict[str, Any]:
    return {"figure": figure, "target": target, "met": met}


def _at_least(r: dict[str, Any], bound: float) -> bool | None:
    return None if r["rate"] is None else r["rate"] >= bound - 1e-12


def _at_most(r: dict[str, Any], bound: float) -> bool | None:
    return None if r["rate"] is None else r["rate"] <= bound + 1e-12


def honour_gates(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The four gates of a demo model, in order, each a list of checks ``{"figure", "target", "met"}``:
    0 anatomy in every generated exam; 1 the detector valid on the validation seed's real exams; 2 the autoencoder
    ceiling close to the real exams; 3 the generated exams honour their reports. ``met`` is None where a group is
    empty."""
    s = result["summary"]
    real = result["detector_validity"]["summary"]["model_atlas"]
    valid = result["detector_validation"]["summary"]["model_atlas"]
    ceiling = result["detector_validity"]["summary"].get("autoencoder_atlas")
    sens, fp = s["pirads_4_5"]["lesion_found"], s["pirads_1_2"]["lesion_found"]
    real_sens, real_fp = real["sensitivity"]["rate"] or 0.0, real["false_positive_rate"]["rate"] or 0.0
    auc = s["auc_report"]["value"]
    gates = [
        {"gate": 0, "name": "every generated exam shows anatomy",
         "checks": [_check(f"{s['anatomy']['count']} exams", "all", s["anatomy"]["k"] == s["anatomy"]["n"])]},
        {"gate": 1, "name": f"detector on real exams of the validation seed {result['settings']['validation_seed']}",
         "checks": [_check(f"sensitivity {_fmt(valid['sensitivity'])}", ">= 90%", _at_least(valid["sensitivity"], 0.9)),
                    _check(f"false positives {_fmt(valid['false_positive_rate'])}", "<= 15%",
                           _at_most(valid["false_positive_rate"], 0.15))]},
    ]
    if ceiling is not None:
        gates.append({"gate": 2, "name": "autoencoder ceiling (real exams through the autoencoder)", "checks": [
            _check(f"sensitivity {_fmt(ceiling['sensitivity'])}", f">= 90% of real ({0.9 * real_sens:.0%})",
                   _at_least(ceiling["sensitivity"], 0.9 * real_sens)),
            _check(f"false positives {_fmt(ceiling['false_positive_rate'])}", f"<= real + 5 points ({real_fp + 0.05:.0%})",
                   _at_most(ceiling["false_positive_rate"], real_fp + 0.05))]})
    gates.append({"gate": 3, "name": "generated exams honour their reports", "checks": [
        _check(f"lesion found, PI-RADS >= 4: {_fmt(sens)}", f">= 80% and >= real - 10 points ({real_sens - 0.1:.0%})",
               _at_least(sens, max(0.8, real_sens - 0.1))),
        _check(f"lesion found, PI-RADS 1-2: {_fmt(fp)}", f"<= 20% and <= real + 10 points ({real_fp + 0.1:.0%})",
               _at_most(fp, min(0.2, real_fp + 0.1))),
        _check(f"class AUC, PI-RADS >= 4 vs 1-2 reports: {'-' if auc is None else f'{auc:.3f}'}", ">= 0.97",
               None if auc is None else auc >= 0.97),
        _check(f"side right, detected PI-RADS >= 4: {_fmt(s['side_correct_pirads_4_5'])}", ">= 75%",
               _at_least(s["side_correct_pirads_4_5"], 0.75))]})
    return gates


def _fmt(r: dict[str, Any]) -> str:
    return f"{r['count']} ({r['rate']:.0%})" if r["rate"] is not None else f"{r['count']} (-)"


