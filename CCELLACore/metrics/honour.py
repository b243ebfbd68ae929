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

Outputs (:func:`write_honour`): ``honour.json`` (per-case records and the summary, never report text) and
``honour.md`` (a Markdown section ready for a model card). :func:`update_model_card` puts that section between
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
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..data.phantoms import CaseTruth, generate_phantom, phantom_report, sample_truth
from ..data.preprocess import PreprocessConfig, denormalize_array, normalize_volume, preprocess_exam
from ..data.study import Exam
from ..errors import CCELLAError
from ..fileio import atomic_write_json, atomic_write_text
from ..reports import is_empty_report
from .lesion_detector import DetectorThresholds, detect_lesions

__all__ = [
    "HonourSettings",
    "EvaluationCase",
    "CARD_START",
    "CARD_END",
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
    "evaluate_honour",
    "honour_markdown",
    "write_honour",
    "update_model_card",
]

logger = logging.getLogger("CCELLACore")

CARD_START = "<!-- honour:start -->"
CARD_END = "<!-- honour:end -->"
#: Report groups: the two with targets, and PI-RADS 3 (reported separately).
GROUPS = ("pirads_4_5", "pirads_1_2", "pirads_3")
_GROUP_TITLES = {"pirads_4_5": "PI-RADS >= 4", "pirads_1_2": "PI-RADS 1-2", "pirads_3": "PI-RADS 3"}
#: The issue's targets: P(lesion found | group) bounds.
TARGETS = {"pirads_4_5": (">=", 0.8), "pirads_1_2": ("<=", 0.2)}


@dataclass(frozen=True)
class HonourSettings:
    """What an honour evaluation runs (``ccella honour`` options).

    Args:
        n: evaluated reports (issue: 50).
        seed: phantom world seed of the evaluated reports; must not have been used in training.
        atlas_seed: phantom seed of the gland-atlas exams (disjoint from ``seed``).
        atlas_n: exams averaged into the gland atlas.
        steps, sampler, guidance: generation settings (``sampler=None``: the pipeline's default).
        institution: phantom institution of both (1: the reference protocol).
        phantom_size, phantom_spacing: grid the real phantom exams are rendered on before preprocessing
            (None: the institution's default, 64x64x32 at 2 mm for institution 1).
    """

    n: int = 50
    seed: int = 1000
    atlas_seed: int = 2000
    atlas_n: int = 40
    steps: int = 20
    sampler: str | None = None
    guidance: float = 1.0
    institution: int = 1
    phantom_size: tuple[int, int, int] | None = None
    phantom_spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.n < 1 or self.atlas_n < 1 or self.steps < 1:
            raise CCELLAError(f"n, atlas_n and steps must be >= 1, got {self.n}, {self.atlas_n}, {self.steps}")
        if self.seed == self.atlas_seed:
            raise CCELLAError(f"the atlas seed must differ from the evaluation seed (both {self.seed})")
        if self.guidance < 0:
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


def gland_atlas(config: PreprocessConfig, settings: HonourSettings, *, progress: bool = False) -> np.ndarray:
    """Gland atlas on ``config.grid``: mean of ``gland > 0`` over phantom cases 0..atlas_n-1 of ``atlas_seed``,
    each preprocessed (centred on its gland, as in training), thresholded at > 0.5.

    Returns:
        bool array (X, Y, Z) = ``config.grid.size``.
    """
    from tqdm.auto import tqdm

    total = np.zeros(tuple(config.grid.size), np.float64)
    for index in tqdm(range(settings.atlas_n), desc="gland atlas", unit="exam", disable=not progress):
        phantom = generate_phantom(index, settings.institution, settings.phantom_size, settings.phantom_spacing,
                                   settings.atlas_seed)
        # Only the geometry matters: AxT2 fixes the grid direction, the gland mask is what is averaged.
        exam = Exam(volumes={"AxT2": phantom.exam.volumes["AxT2"]}, masks={"gland": phantom.exam.masks["gland"]},
                    case_id=phantom.case_id)
        on_grid, _ = preprocess_exam(exam, _raw_config(config))
        total += on_grid.masks["gland"].array > 0
    return total / settings.atlas_n > 0.5


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
    progress: bool = False,
) -> dict[str, Any]:
    """The detector on the REAL phantom exams of ``cases`` (seed ``settings.seed``), on ``config.grid``.

    ``reconstruct`` (normalised (2, X, Y, Z) HighB/ADC -> reconstruction) adds the ``autoencoder`` representation.

    Returns:
        ``{"records": [...], "summary": {"<representation>_<gland>": {group: {"lesion_found": rate}, "side_correct":
        rate, "sensitivity": rate, "false_positive_rate": rate}}}`` for the representations ``model``/``physical``
        and gland regions ``atlas``/``own`` (see the module docstring), and ``autoencoder`` with ``reconstruct``.
    """
    from tqdm.auto import tqdm

    variants = VALIDITY_VARIANTS + (AUTOENCODER_VARIANTS if reconstruct is not None else ())
    records = []
    for case in tqdm(cases, desc="detector on real exams", unit="exam", disable=not progress):
        base = _case_base(case)
        raw = real_exam_on_grid(case.index, settings.seed, config, settings)
        views = {"physical": raw, "model": model_representation(raw, config, highb_reference)}
        if reconstruct is not None:
            views["autoencoder"] = model_representation(raw, config, highb_reference, reconstruct)
        glands = {"atlas": atlas, "own": raw.masks["gland"].array > 0}
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
    return {"records": records, "summary": summary}


# ----------------------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------------------
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

    from ..training.precision import describe_device

    started = time.perf_counter()
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
    atlas = gland_atlas(config, settings, progress=progress)
    if not atlas.any():
        raise CCELLAError(f"the gland atlas of seed {settings.atlas_seed} is empty on grid {grid_size}")
    validity = detector_validity(cases, config, atlas, settings, highb_reference=highb_reference,
                                 thresholds=thresholds, reconstruct=pipe.reconstruct, progress=progress)

    records = []
    sampler_used = None
    for k, case in enumerate(tqdm(cases, desc="generate + detect", unit="exam", disable=not progress)):
        out = pipe(case.report, seed=k, steps=settings.steps, sampler=sampler, guidance=settings.guidance)
        sampler_used = out.settings.get("sampler", sampler)
        if tuple(out.exam.volumes["ADC"].shape) != atlas.shape:
            raise CCELLAError(f"generated exam {tuple(out.exam.volumes['ADC'].shape)} and gland atlas "
                              f"{atlas.shape} differ in size")
        base = _case_base(case)
        record = {**base, "seed": k, **_detect(out.exam, atlas, base["truth_side"], thresholds),
                  "probability": round(float(out.class_probability), 6)}
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
    spacing = tuple(float(s) for s in config.grid.spacing)
    return {
        "settings": {
            "model_hash": pipe.model_hash, "steps": settings.steps, "sampler": sampler_used, "guidance": settings.guidance,
            "n": settings.n, "seed": settings.seed, "case_indices": [c.index for c in cases],
            "generation_seeds": f"0..{settings.n - 1}", "atlas_seed": settings.atlas_seed,
            "atlas_n": settings.atlas_n, "institution": settings.institution,
            "phantom_size": list(settings.phantom_size) if settings.phantom_size else None,
            "phantom_spacing": list(settings.phantom_spacing) if settings.phantom_spacing else None,
            "grid_size": list(grid_size), "grid_spacing": list(spacing),
            "machine": describe_device(pipe.device), "wall_time_s": round(time.perf_counter() - started, 2),
        },
        "detector": asdict(thresholds),
        "atlas": {"voxels": int(atlas.sum()), "volume_cc": round(float(atlas.sum()) * float(np.prod(spacing)) / 1000, 2)},
        "detector_validity": validity,
        "records": records,
        "summary": summary,
    }


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------
def _fmt(r: dict[str, Any]) -> str:
    return f"{r['count']} ({r['rate']:.0%})" if r["rate"] is not None else f"{r['count']} (-)"


def honour_markdown(result: dict[str, Any]) -> str:
    """The model card section (Markdown): the figures, the detector's validity and the settings."""
    s, summary = result["settings"], result["summary"]
    validity = result["detector_validity"]["summary"]
    auc = summary["auc"]
    auc_text = (f"{auc['value']:.3f} ({auc['positives']} positive / {auc['negatives']} negative)"
                if auc["value"] is not None else f"- (one class only: {auc['positives']} positive / "
                f"{auc['negatives']} negative)")

    def target(group: str) -> str:
        g = summary[group]
        if "target" not in g:
            return "reported separately"
        met = g["meets_target"]
        return f"{g['target']}: " + ("met" if met else "not met" if met is not None else "no exams")

    lines = [
        "## Report faithfulness",
        "",
        f"Generated from {s['n']} phantom reports of seed {s['seed']} (a seed not used in training); a fixed "
        "rule-based detector "
        "(bright on HighB and low on ADC against the gland, inside a gland atlas) decides whether a lesion appears.",
        "",
        "| Measure | Result | Target |",
        "|---|---|---|",
    ]
    for group in GROUPS:
        lines.append(f"| Lesion found, report {_GROUP_TITLES[group]} | {_fmt(summary[group]['lesion_found'])} | "
                     f"{target(group)} |")
    lines += [
        f"| Side of largest detection = side of report's index lesion | {_fmt(summary['side_correct'])} | - |",
        f"| ... of which report PI-RADS >= 4 | {_fmt(summary['side_correct_pirads_4_5'])} | - |",
        f"| Predicted csPCa probability vs label, AUC | {auc_text} | - |",
        "",
        "Detector on the real phantom exams of the same cases (same grid), before judging generated exams:",
        "",
        "| Representation, gland region | Sensitivity, PI-RADS >= 4 | False positives, PI-RADS 1-2 | Side correct |",
        "|---|---|---|---|",
    ]
    names = {"model": "as the model sees it (normalised)", "physical": "physical units",
             "autoencoder": "through the model's autoencoder (the ceiling of any generated exam)"}
    for representation, region in VALIDITY_VARIANTS + AUTOENCODER_VARIANTS:
        v = validity.get(f"{representation}_{region}")
        if v is None:
            continue
        lines.append(f"| {names[representation]}, {'gland atlas' if region == 'atlas' else 'own gland mask'} | "
                     f"{_fmt(v['sensitivity'])} | {_fmt(v['false_positive_rate'])} | {_fmt(v['side_correct'])} |")
    d = result["detector"]
    phantom_args = ""
    if s.get("phantom_size"):
        phantom_args += " --phantom-size " + " ".join(str(v) for v in s["phantom_size"])
    if s.get("phantom_spacing"):
        phantom_args += " --phantom-spacing " + " ".join(f"{v:g}" for v in s["phantom_spacing"])
    lines += [
        "",
        "| Setting | Value |",
        "|---|---|",
        f"| Model hash (SHA-256 of weights) | `{s['model_hash']}` |",
        f"| Sampler, steps, guidance | {s['sampler']}, {s['steps']}, {s['guidance']:g} |",
        f"| Reports (N), phantom seed, institution | {s['n']}, {s['seed']}, {s['institution']} |",
        f"| Generation seeds | {s['generation_seeds']} |",
        f"| Gland atlas | {s['atlas_n']} exams of phantom seed {s['atlas_seed']}, "
        f"{result['atlas']['volume_cc']:g} cc |",
        f"| Output grid | {' x '.join(map(str, s['grid_size']))} voxels at "
        f"{' x '.join(f'{v:g}' for v in s['grid_spacing'])} mm |",
        f"| Detector thresholds | HighB >= {d['highb_ratio']:g} x gland median, ADC <= {d['adc_ratio']:g} x gland "
        f"median and <= {d['adc_max']:g}, >= {d['min_volume_mm3']:g} mm^3 |",
        f"| Machine | {s['machine']} |",
        f"| Wall time | {s['wall_time_s']:.1f} s |",
        "",
        "Reproduce: `ccella honour --model DIR "
        f"--n {s['n']} --seed {s['seed']} --atlas-seed {s['atlas_seed']} --atlas-n {s['atlas_n']} "
        f"--steps {s['steps']} --sampler {s['sampler']} --guidance {s['guidance']:g}{phantom_args} --out OUT`.",
    ]
    return "\n".join(lines) + "\n"


def write_honour(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``honour.json`` and ``honour.md`` atomically; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_json(out_dir / "honour.json", result)
    md_path = atomic_write_text(out_dir / "honour.md", honour_markdown(result))
    return Path(json_path), Path(md_path)


def update_model_card(model_dir: str | Path, section: str) -> Path:
    """Put ``section`` between :data:`CARD_START` and :data:`CARD_END` in ``model_dir/README.md`` (appended with
    the markers when they are absent), atomically. The weights and ``model_hash`` do not change (checked).

    Raises:
        CCELLAError: no model directory, markers out of order, or the model hash changed (it must cover weights only).
    """
    from ..models.serialization import model_hash

    model_dir = Path(model_dir)
    card_path = model_dir / "README.md"
    before = model_hash(model_dir)
    text = card_path.read_text(encoding="utf-8") if card_path.is_file() else ""
    block = f"{CARD_START}\n{section.rstrip()}\n{CARD_END}"
    start, end = text.find(CARD_START), text.find(CARD_END)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(CARD_END):]
    elif start >= 0 or end >= 0:
        raise CCELLAError(f"{card_path}: found only one of {CARD_START} / {CARD_END}, or them out of order")
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    logger.warning("updating the model card %s (the README only; weights and model hash are unchanged)", card_path)
    atomic_write_text(card_path, text)
    if model_hash(model_dir) != before:
        raise CCELLAError(f"{model_dir}: model_hash changed after editing README.md; it must cover weights only")
    return card_path
