"""Reports written by hand, outside the phantom world's templates: does a model honour reports as people write them?

``ccella honour`` judges a model on phantom reports, which come from templates (:mod:`CCELLACore.data.phantom_reports`),
however varied. The ten reports below were written by hand in the style of short clinical reports, with the facts a
reader states: zone, side, size, signal, PI-RADS. They were fixed on 2026-12-02 and tried that day on the model
shipped then, before any model trained on the more varied report phrasing of that day had been looked at; changing
them after seeing outputs would bias the figures, so change them only with a reason written here.

Each report is generated with seeds ``0 .. seeds - 1`` and judged exactly like the phantom reports (the same detector,
gland atlas and anatomy check): lesion found per group, the side of the largest detection for PI-RADS >= 4 reports,
and the adapter's class probability (AUC between the groups). The figures are reported on the card beside the gates,
not as a gate: ten reports are too few for a bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .honour_cases import rate, report_group_auc
from .honour_reference import anatomy, detect, group_rates
from .lesion_detector import DetectorThresholds

__all__ = ["HandwrittenReport", "HANDWRITTEN_REPORTS", "evaluate_handwritten"]


@dataclass(frozen=True)
class HandwrittenReport:
    """A hand-written report and what it states: its group (``"pirads_4_5"``/``"pirads_1_2"``) and index side."""

    group: str
    side: str | None
    text: str


HANDWRITTEN_REPORTS = (
    HandwrittenReport("pirads_4_5", "left", "Findings: 12 mm lesion in the left anterior transition zone, low T2 "
                      "signal, bright on DWI. Impression: PI-RADS 4."),
    HandwrittenReport("pirads_4_5", "left", "Lt TZ anterior 1.2 cm lesion, low T2, DWI bright. PI-RADS 4."),
    HandwrittenReport("pirads_4_5", "right", "Right TZ lesion, 14 mm, homogeneous low T2, marked restriction. "
                      "PIRADS 4. Biopsy advised."),
    HandwrittenReport("pirads_4_5", "right", "There is a 16 mm lesion in the right peripheral zone at the mid gland "
                      "with markedly restricted diffusion. PI-RADS 5."),
    HandwrittenReport("pirads_4_5", "left", "PI-RADS 5: 2.0 cm left PZ posterolateral lesion with EPE, very dark on "
                      "ADC, bright on b1400."),
    HandwrittenReport("pirads_4_5", "right", "MRI prostate. PSA 9. Suspicious lesion right apex PZ, 11 mm, restricted "
                      "diffusion. Overall PI-RADS 4, targeted biopsy recommended."),
    HandwrittenReport("pirads_1_2", None, "Normal prostate, no focal lesion. PI-RADS 1."),
    HandwrittenReport("pirads_1_2", None, "No suspicious lesion on T2 or DWI. BPH. PI-RADS 2. No biopsy needed."),
    HandwrittenReport("pirads_1_2", None, "Prostate 45 cc, PSA density 0.08. Homogeneous PZ, no restricted diffusion. "
                      "Overall PI-RADS 1."),
    HandwrittenReport("pirads_1_2", None, "Mild diffuse changes in keeping with prostatitis, no focal abnormality. "
                      "PIRADS 2/5."),
)


def evaluate_handwritten(pipe: Any, atlas: np.ndarray, references: dict[str, np.ndarray], *, seeds: int,
                         steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                         thresholds: DetectorThresholds = DetectorThresholds(),
                         reports: tuple[HandwrittenReport, ...] = HANDWRITTEN_REPORTS,
                         progress: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Generate every report with seeds ``0 .. seeds - 1`` and judge each exam (see the module docstring).

    Returns:
        ``{"records": [...], "summary": {...}}``: per exam the report's index in ``reports`` (never its text), group,
        stated side, seed, detection, anatomy and probability; the summary has ``lesion_found`` per group,
        ``side_correct_pirads_4_5``, ``anatomy``, ``auc_report`` and the mean probability per group.
    """
    records = []
    pairs = [(i, seed) for i in range(len(reports)) for seed in range(seeds)]
    for i, seed in (progress(pairs) if progress is not None else pairs):
        report = reports[i]
        out = pipe(report.text, seed=seed, steps=steps, sampler=sampler, guidance=guidance)
        records.append({"report": i, "group": report.group, "truth_side": report.side, "seed": seed,
                        **detect(out.exam, atlas, report.side, thresholds), **anatomy(out.exam, references),
                        "probability": round(float(out.class_probability), 6)})
    summary = group_rates(records)
    summary["anatomy"] = rate(sum(r["anatomy"] for r in records), len(records))
    summary["auc_report"] = report_group_auc(records)
    for group in ("pirads_4_5", "pirads_1_2"):
        members = [r["probability"] for r in records if r["group"] == group]
        summary[group]["mean_probability"] = round(float(np.mean(members)), 4) if members else None
    return {"records": records, "summary": summary, "n_reports": len(reports), "seeds": seeds}
