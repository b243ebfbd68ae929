"""``ccella split`` and the study's training fractions: patient-level, stratified by institution and label,
seeded, nested; no files are read (the studies point to paths that need not exist)."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from CCELLACore.classifier.split import largest_remainder, nested_fractions, patient_strata, \
    stratified_patient_split
from CCELLACore.cli import main
from CCELLACore.data.manifest import read_manifest, write_manifest
from CCELLACore.data.study import Study


def _studies(n_patients: int = 240, seed: int = 0) -> list[Study]:
    """Patients of two institutions, ~30% positive, every 7th with two studies, a few unlabelled."""
    import random

    rng = random.Random(seed)
    out = []
    for p in range(n_patients):
        label = None if p % 41 == 0 else int(rng.random() < 0.3)
        for k in range(2 if p % 7 == 0 else 1):
            out.append(Study(case_id=f"p{p}_s{k}", patient_id=f"p{p}", institution=str(1 + p % 2),
                             images={"AxT2": f"cases/p{p}_s{k}/axt2.nii.gz"}, label=label))
    return out


def test_splits_keep_patients_together_and_stratify_by_institution_and_label():
    studies = _studies()
    split_of = stratified_patient_split(studies, (0.8, 0.05, 0.15), seed=3)
    assert set(split_of) == {s.patient_id for s in studies}
    by_patient = defaultdict(set)
    for s in studies:
        by_patient[s.patient_id].add(split_of[s.patient_id])
    assert all(len(v) == 1 for v in by_patient.values())
    for key, patients in patient_strata(studies).items():
        counts = Counter(split_of[p] for p in patients)
        assert [counts["train"], counts["val"], counts["test"]] == largest_remainder(len(patients), (0.8, 0.05, 0.15)), key
    # seeded: same seed, same splits; another seed, other splits
    assert stratified_patient_split(studies, (0.8, 0.05, 0.15), seed=3) == split_of
    assert stratified_patient_split(studies, (0.8, 0.05, 0.15), seed=4) != split_of


def test_largest_remainder_and_small_data_sets_get_every_split():
    assert largest_remainder(10, (0.8, 0.05, 0.15)) == [8, 1, 1]  # tie: the earlier split
    assert largest_remainder(20, (0.8, 0.05, 0.15)) == [16, 1, 3]
    assert largest_remainder(7, (1, 1, 1)) == [3, 2, 2]
    studies = _studies(12)
    counts = Counter(stratified_patient_split(studies, (0.8, 0.05, 0.15), seed=0).values())
    assert all(counts[name] >= 1 for name in ("train", "val", "test")), counts


def test_nested_fractions_are_nested_stratified_and_per_patient():
    studies = [s for s in _studies() if s.institution == "1"]
    fractions = (1.0, 0.5, 0.25, 0.125, 0.0625)
    subsets = nested_fractions(studies, fractions, seed=0)
    labelled = [s for s in studies if s.label is not None]
    assert subsets[1.0] == sorted(s.case_id for s in labelled)
    patient = {s.case_id: s.patient_id for s in studies}
    label = {s.case_id: s.label for s in studies}
    for big, small in zip(fractions, fractions[1:]):
        assert set(subsets[small]) <= set(subsets[big])
    for f in fractions:
        cases = subsets[f]
        patients = {patient[c] for c in cases}
        assert all(patient[s.case_id] not in patients or s.case_id in cases for s in labelled)  # whole patients
        n_pos = len({patient[c] for c in cases if label[c] == 1})
        n_all_pos = len({s.patient_id for s in labelled if s.label == 1})
        assert n_pos == max(1, round(f * n_all_pos))
    assert nested_fractions(studies, fractions, seed=0) == subsets
    assert nested_fractions(studies, fractions, seed=1)[0.5] != subsets[0.5]
    with pytest.raises(ValueError):
        nested_fractions(studies, (0.0,))


def test_split_cli_writes_a_manifest_and_refuses_existing_splits(tmp_path, capsys):
    studies = _studies(40)
    write_manifest(studies, tmp_path / "in.csv")
    assert main(["split", "--manifest", str(tmp_path / "in.csv"), "--out", str(tmp_path / "out.csv"),
                 "--seed", "2"]) == 0
    assert "train" in capsys.readouterr().out
    out = read_manifest(tmp_path / "out.csv")
    assert [s.case_id for s in out.studies] == [s.case_id for s in studies]
    assert {s.split for s in out.studies} == {"train", "val", "test"}
    assert all(str(s.images["AxT2"]).endswith(f"{s.case_id}/axt2.nii.gz") for s in out.studies)
    # a manifest with splits is refused unless --overwrite
    assert main(["split", "--manifest", str(tmp_path / "out.csv"), "--out", str(tmp_path / "again.csv")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["split", "--manifest", str(tmp_path / "out.csv"), "--out", str(tmp_path / "again.csv"),
                 "--overwrite", "--seed", "2"]) == 0
    again = read_manifest(tmp_path / "again.csv")
    assert [s.split for s in again.studies] == [s.split for s in out.studies]
