"""The cases and small figures of ``ccella honour`` (:mod:`CCELLACore.metrics.honour`): its settings, the evaluated
phantom cases, report groups and sides, rates and the rank AUC."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..data.phantoms import CaseTruth, phantom_report, sample_truth
from ..errors import CCELLAError
from ..reports import is_empty_report

__all__ = ["HonourSettings", "EvaluationCase", "GROUPS", "TARGETS", "rank_auc", "report_group_auc", "rate",
           "pirads_group", "report_side", "evaluation_cases"]

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
        atlas_n: exams averaged into the gland atlas (and into the mean exam of the anatomy check).
        validation_seed: phantom seed on which the detector's validity (gate 1) is judged, disjoint from ``seed``,
            so that the detector is never tuned on the cases of the final figures.
        steps, sampler, guidance: generation settings; None = the model's own ``sampling:`` defaults.
        institution: phantom institution of both (1: the reference protocol).
        phantom_size, phantom_spacing: grid the real phantom exams are rendered on before preprocessing; None = the
            model's ``phantoms:`` section (the grid its training phantoms had), else the institution's default.
        handwritten_seeds: seeds per hand-written report (:mod:`~CCELLACore.metrics.handwritten`); 0 = none.
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
    handwritten_seeds: int = 3

    def __post_init__(self) -> None:
        if self.handwritten_seeds < 0:
            raise CCELLAError(f"handwritten_seeds must be >= 0, got {self.handwritten_seeds}")
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


def report_group_auc(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The class probability judged against the report: AUC of PI-RADS >= 4 vs PI-RADS 1-2 records (``group``,
    ``probability``), with the two counts; PI-RADS 3 records are left out."""
    grouped = [r for r in records if r["group"] in ("pirads_4_5", "pirads_1_2")]
    return {
        "value": rank_auc([r["probability"] for r in grouped], [int(r["group"] == "pirads_4_5") for r in grouped]),
        "positives": sum(1 for r in grouped if r["group"] == "pirads_4_5"),
        "negatives": sum(1 for r in grouped if r["group"] == "pirads_1_2"),
    }


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

