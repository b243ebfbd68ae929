"""Patient-level, label-stratified, seeded splits and nested training fractions.

- :func:`stratified_patient_split`: train/val/test (default 80:5:15, the paper's) for data sets that have no splits
  (PI-CAI). All studies of a patient go to one split. Patients are stratified by institution and label (a patient
  is positive when any of their studies is; unlabelled patients form their own stratum), and each stratum is cut
  in the fractions with largest-remainder rounding, after a seeded shuffle.
- :func:`nested_fractions`: the domain-adaptation study's training subsets (100, 50, 25, 12.5, 6.25 %), stratified by
  label at the patient level and nested: every smaller subset is contained in every larger one (one seeded order
  per stratum, each fraction takes its first ``round(f * n)`` patients, at least one while f > 0). The reference
  drew each fraction independently with ``random.sample`` (not nested, not per patient).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ..data.study import Study

__all__ = ["SPLIT_NAMES", "patient_strata", "largest_remainder", "stratified_patient_split", "nested_fractions"]

SPLIT_NAMES = ("train", "val", "test")


def patient_strata(studies: Sequence[Study], by_institution: bool = True) -> dict[tuple[str, str], list[str]]:
    """``{(institution, "pos" | "neg" | "unlabelled"): sorted patient ids}`` (a patient is positive if any study
    is, negative if all its labelled studies are negative)."""
    labels: dict[str, list[int | None]] = defaultdict(list)
    institution: dict[str, str] = {}
    for s in studies:
        labels[s.patient_id].append(s.label)
        institution.setdefault(s.patient_id, s.institution if by_institution else "")
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for patient, values in labels.items():
        known = [v for v in values if v is not None]
        kind = "unlabelled" if not known else ("pos" if max(known) == 1 else "neg")
        strata[(institution[patient], kind)].append(patient)
    return {k: sorted(v) for k, v in sorted(strata.items())}


def largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Counts summing to ``n`` in proportion to ``fractions`` (largest remainders get the spare units; ties go to
    the earlier fraction)."""
    f = np.asarray(fractions, float)
    if f.ndim != 1 or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {list(fractions)}")
    exact = f / f.sum() * n
    counts = np.floor(exact).astype(int)
    for k in sorted(range(len(f)), key=lambda i: (-(exact[i] - counts[i]), i))[: n - int(counts.sum())]:
        counts[k] += 1
    return [int(c) for c in counts]


def _order(patients: list[str], seed: int, key: tuple[str, str]) -> list[str]:
    salt = [ord(c) for c in "|".join(key)]
    rng = np.random.default_rng([int(seed), 17, *salt])
    return [patients[i] for i in rng.permutation(len(patients))]


def stratified_patient_split(studies: Sequence[Study], fractions: Sequence[float] = (0.8, 0.05, 0.15),
                             seed: int = 0) -> dict[str, str]:
    """``{patient_id: "train" | "val" | "test"}``; see the module docstring."""
    if len(fractions) != 3:
        raise ValueError(f"need 3 fractions (train, val, test), got {list(fractions)}")
    strata = patient_strata(studies)
    counts = {key: largest_remainder(len(patients), fractions) for key, patients in strata.items()}
    # Small data sets: a requested split that got no patient takes one from the split with the most patients, in
    # the largest stratum (every split with a positive fraction is non-empty when there are enough patients).
    for k, fraction in enumerate(fractions):
        totals = [sum(c[i] for c in counts.values()) for i in range(3)]
        if fraction > 0 and totals[k] == 0 and sum(totals) >= sum(1 for f in fractions if f > 0):
            donor = int(np.argmax(totals))
            key = max((key for key in counts if counts[key][donor] > 1 or totals[donor] > 1),
                      key=lambda key: (counts[key][donor], key))
            counts[key][donor] -= 1
            counts[key][k] += 1
    split_of: dict[str, str] = {}
    for key, patients in strata.items():
        order = _order(patients, seed, key)
        start = 0
        for name, count in zip(SPLIT_NAMES, counts[key]):
            for patient in order[start:start + count]:
                split_of[patient] = name
            start += count
    return split_of


def nested_fractions(studies: Sequence[Study], fractions: Sequence[float], seed: int = 0) -> dict[float, list[str]]:
    """``{fraction: case ids}`` of nested, label-stratified, patient-level training subsets (fractions in (0, 1]).

    Unlabelled studies are left out (they cannot train a classifier)."""
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"fractions must be in (0, 1], got {f}")
    labelled = [s for s in studies if s.label is not None]
    cases_of: dict[str, list[str]] = defaultdict(list)
    for s in labelled:
        cases_of[s.patient_id].append(s.case_id)
    strata = patient_strata(labelled, by_institution=False)
    orders = {key: _order(patients, seed, key) for key, patients in strata.items()}
    out: dict[float, list[str]] = {}
    for f in fractions:
        chosen: list[str] = []
        for key, order in orders.items():
            n = max(1, int(np.floor(f * len(order) + 0.5))) if order else 0
            for patient in order[:n]:
                chosen.extend(cases_of[patient])
        out[f] = sorted(chosen)
    return out
