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
5. **Hand-written reports** (:mod:`~CCELLACore.metrics.handwritten`, ``handwritten_seeds`` seeds each): ten short
   reports outside the phantom templates, judged the same way; on the card beside the gates, not a gate.

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
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data.preprocess import PreprocessConfig
from ..errors import CCELLAError
from ..fileio import Journal
from .handwritten import evaluate_handwritten
from .honour_cases import (GROUPS, TARGETS, EvaluationCase, HonourSettings, evaluation_cases, pirads_group, rank_auc,
                           rate, report_group_auc, report_side)
from .honour_reference import (ANATOMY_MIN_CORRELATION, anatomy, case_base, detect, detector_validity, gland_atlas,
                               grid_reference, group_rates, model_representation, real_exam_on_grid)
from .lesion_detector import DetectorThresholds

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
    "evaluate_ceiling",
    "honour_gates",
    "ceiling_gates",
    "ANATOMY_MIN_CORRELATION",
]

logger = logging.getLogger("CCELLACore")


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
                    thresholds: DetectorThresholds = DetectorThresholds(),
                    journal_path: str | Path | None = None) -> dict[str, Any]:
    """Run the whole evaluation with a loaded :class:`~CCELLACore.pipelines.generation.CCELLAPipeline`.

    ``journal_path`` (``ccella honour``: ``<out>/generated.jsonl``): each generated exam's record is appended there
    as soon as it is judged, so a killed evaluation run again with the same settings generates only the rest (the
    journal's key: model hash, settings, detector thresholds; records of other settings are discarded). The real-exam
    parts are recomputed (seconds to minutes; deterministic).

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
    grid_size = _check_grid(pipe, config)
    sampler = settings.sampler or None
    if sampler is not None and sampler not in pipe.supported_samplers:
        raise CCELLAError(f"sampler {sampler!r} is not supported by this {pipe.objective} model; "
                          f"choose one of {list(pipe.supported_samplers)}")
    cases = evaluation_cases(settings.n, settings.seed, settings.institution)
    journal = None
    if journal_path is not None:
        journal = Journal(journal_path, key={"model_hash": pipe.model_hash, "settings": asdict(settings),
                                             "decoder": pipe.autoencoder.decoder_name,
                                             "detector": asdict(thresholds)})
    atlas, references, validation, validity = _real_exams(pipe, settings, config, cases, thresholds, progress)

    records: list[dict[str, Any]] = []
    sampler_used, extras = None, {}
    done = _resumed(journal, cases)
    if done:
        logger.info("honour: resumed %d of %d generated exams from %s", len(done), len(cases), journal.path)
    for k, case in enumerate(tqdm(cases, desc="generate + detect", unit="exam", disable=not progress)):
        if k < len(done):
            records.append(done[k]["record"])
            sampler_used, extras = done[k]["sampler"], done[k]["extras"]
            continue
        out = pipe(case.report, seed=k, steps=settings.steps, sampler=sampler, guidance=settings.guidance)
        sampler_used = out.settings.get("sampler", sampler)
        extras = {key: out.settings[key] for key in SAMPLING_EXTRAS if key in out.settings}
        if tuple(out.exam.volumes["ADC"].shape) != atlas.shape:
            raise CCELLAError(f"generated exam {tuple(out.exam.volumes['ADC'].shape)} and gland atlas "
                              f"{atlas.shape} differ in size")
        base = case_base(case)
        record = {**base, "seed": k, **detect(out.exam, atlas, base["truth_side"], thresholds),
                  **anatomy(out.exam, references), "probability": round(float(out.class_probability), 6)}
        records.append(record)
        if journal is not None:
            journal.append({"record": record, "sampler": sampler_used, "extras": extras})

    handwritten = None
    if settings.handwritten_seeds:
        bar = (lambda pairs: tqdm(pairs, desc="hand-written reports", unit="exam")) if progress else None
        handwritten = evaluate_handwritten(pipe, atlas, references, seeds=settings.handwritten_seeds,
                                           steps=settings.steps, sampler=sampler, guidance=settings.guidance,
                                           thresholds=thresholds, progress=bar)

    summary = group_rates(records)
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
    summary["auc_report"] = report_group_auc(records)
    summary["anatomy"] = rate(sum(r["anatomy"] for r in records), len(records))
    spacing = tuple(float(s) for s in config.grid.spacing)
    return {
        "settings": {
            "model_hash": pipe.model_hash, "decoder": pipe.autoencoder.decoder_name,
            "steps": settings.steps, "sampler": sampler_used, "guidance": settings.guidance,
            **extras,  # the model's other sampling defaults, as the pipeline applied them
            "n": settings.n, "seed": settings.seed, "case_indices": [c.index for c in cases],
            "generation_seeds": f"0..{settings.n - 1}", "atlas_seed": settings.atlas_seed,
            "atlas_n": settings.atlas_n, "validation_seed": settings.validation_seed,
            "institution": settings.institution, "handwritten_seeds": settings.handwritten_seeds,
            "phantom_size": list(settings.phantom_size) if settings.phantom_size else None,
            "phantom_spacing": list(settings.phantom_spacing) if settings.phantom_spacing else None,
            "grid_size": list(grid_size), "grid_spacing": list(spacing),
            "machine": describe_device(pipe.device), "precision": str(pipe.dtype).replace("torch.", ""),
            "wall_time_s": round(time.perf_counter() - started, 2),
        },
        "detector": asdict(thresholds),
        "atlas": {"voxels": int(atlas.sum()), "volume_cc": round(float(atlas.sum()) * float(np.prod(spacing)) / 1000, 2)},
        "detector_validity": validity,
        "detector_validation": validation,
        "records": records,
        "summary": summary,
        "handwritten": handwritten,
    }


def _check_grid(pipe: Any, config: PreprocessConfig) -> tuple[int, ...]:
    grid_size = tuple(int(s) for s in pipe.metadata["grid_size"])
    if grid_size != tuple(config.grid.size):
        raise CCELLAError(f"model output grid {grid_size} differs from its preprocess grid "
                          f"{tuple(config.grid.size)}: the gland atlas would not line up")
    return grid_size


def _real_exams(pipe: Any, settings: HonourSettings, config: PreprocessConfig, cases: list[EvaluationCase],
                thresholds: DetectorThresholds, progress: bool):
    """The gland atlas, the mean exam, and the detector on real exams: of the validation seed (gate 1) and of the
    evaluated cases, also through the model's autoencoder (the yardsticks of gates 2 and 3)."""
    highb_reference = float(pipe.metadata.get("reference_intensities", {}).get("HighB", 1.0) or 1.0)
    atlas, references = grid_reference(config, settings, progress=progress)
    if not atlas.any():
        raise CCELLAError(f"the gland atlas of seed {settings.atlas_seed} is empty on grid {atlas.shape}")
    validation = detector_validity(evaluation_cases(settings.n, settings.validation_seed, settings.institution),
                                   config, atlas, settings, highb_reference=highb_reference, thresholds=thresholds,
                                   references=references, seed=settings.validation_seed, progress=progress)
    validity = detector_validity(cases, config, atlas, settings, highb_reference=highb_reference,
                                 thresholds=thresholds, reconstruct=pipe.reconstruct, references=references,
                                 seed=settings.seed, progress=progress,
                                 # a joint autoencoder encodes the exam's sequences together: give it all of them
                                 reconstruct_sequences=tuple(pipe.sequences) if pipe.autoencoder.joint
                                 else ("HighB", "ADC"))
    return atlas, references, validation, validity


def evaluate_ceiling(pipe: Any, settings: HonourSettings = HonourSettings(), *, progress: bool = True,
                     thresholds: DetectorThresholds = DetectorThresholds(),
                     preprocess: PreprocessConfig | None = None) -> dict[str, Any]:
    """Gates 1 and 2 only: the detector on the real exams of the validation seed and of ``settings.seed``, and those
    exams through the pipeline's autoencoder. Nothing is generated, so this judges an autoencoder (minutes, not an
    hour) before a diffusion model is trained on its latents. ``preprocess``: the normalisation the autoencoder was
    trained with (default: the model's own; the grid must be the model's).

    Returns:
        ``{"settings", "detector", "detector_validity", "detector_validation"}`` as :func:`evaluate_honour` has them.
    """
    from ..precision import describe_device

    started = time.perf_counter()
    settings = model_settings(pipe, settings)
    config: PreprocessConfig = preprocess or pipe.config.preprocess.ldm
    grid_size = _check_grid(pipe, config)
    cases = evaluation_cases(settings.n, settings.seed, settings.institution)
    _, _, validation, validity = _real_exams(pipe, settings, config, cases, thresholds, progress)
    return {
        "settings": {"model_hash": pipe.model_hash, "decoder": pipe.autoencoder.decoder_name, "n": settings.n,
                     "seed": settings.seed, "case_indices": [c.index for c in cases],
                     "atlas_seed": settings.atlas_seed, "atlas_n": settings.atlas_n,
                     "validation_seed": settings.validation_seed, "institution": settings.institution,
                     "adc_window": list(config.adc_window), "grid_size": list(grid_size),
                     "machine": describe_device(pipe.device), "precision": str(pipe.dtype).replace("torch.", ""),
                     "wall_time_s": round(time.perf_counter() - started, 2)},
        "detector": asdict(thresholds),
        "detector_validity": validity,
        "detector_validation": validation,
    }


def _resumed(journal: Journal | None, cases: list[EvaluationCase]) -> list[dict[str, Any]]:
    """The journal's records that are the first cases in order (case index and generation seed as now)."""
    done = []
    for k, item in enumerate(journal.items() if journal is not None else ()):
        record = item.get("record", {}) if isinstance(item, dict) else {}
        if k >= len(cases) or record.get("case_index") != cases[k].index or record.get("seed") != k:
            break
        done.append(item)
    return done


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
    sens, fp = s["pirads_4_5"]["lesion_found"], s["pirads_1_2"]["lesion_found"]
    real_sens, real_fp = real["sensitivity"]["rate"] or 0.0, real["false_positive_rate"]["rate"] or 0.0
    auc = s["auc_report"]["value"]
    gates = [
        {"gate": 0, "name": "every generated exam shows anatomy",
         "checks": [_check(f"{s['anatomy']['count']} exams", "all", s["anatomy"]["k"] == s["anatomy"]["n"])]},
        *ceiling_gates(result),
    ]
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


def ceiling_gates(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Gates 1 and 2 (the second only where the autoencoder was judged) of an :func:`evaluate_honour` or
    :func:`evaluate_ceiling` result, as :func:`honour_gates` lists them."""
    real = result["detector_validity"]["summary"]["model_atlas"]
    valid = result["detector_validation"]["summary"]["model_atlas"]
    ceiling = result["detector_validity"]["summary"].get("autoencoder_atlas")
    real_sens, real_fp = real["sensitivity"]["rate"] or 0.0, real["false_positive_rate"]["rate"] or 0.0
    gates = [{"gate": 1, "name": f"detector on real exams of the validation seed {result['settings']['validation_seed']}",
              "checks": [_check(f"sensitivity {_fmt(valid['sensitivity'])}", ">= 90%",
                                _at_least(valid["sensitivity"], 0.9)),
                         _check(f"false positives {_fmt(valid['false_positive_rate'])}", "<= 15%",
                                _at_most(valid["false_positive_rate"], 0.15))]}]
    if ceiling is not None:
        gates.append({"gate": 2, "name": "autoencoder ceiling (real exams through the autoencoder)", "checks": [
            _check(f"sensitivity {_fmt(ceiling['sensitivity'])}", f">= 90% of real ({0.9 * real_sens:.0%})",
                   _at_least(ceiling["sensitivity"], 0.9 * real_sens)),
            _check(f"false positives {_fmt(ceiling['false_positive_rate'])}", f"<= real + 5 points ({real_fp + 0.05:.0%})",
                   _at_most(ceiling["false_positive_rate"], real_fp + 0.05))]})
    return gates


def _fmt(r: dict[str, Any]) -> str:
    return f"{r['count']} ({r['rate']:.0%})" if r["rate"] is not None else f"{r['count']} (-)"



