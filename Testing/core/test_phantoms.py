"""The phantom world: determinism, appearance, geometry, reports, labels, institution statistics, CLI outputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from CCELLACore.cli import main
from CCELLACore.data.manifest import read_manifest
from CCELLACore.data.phantoms import (
    CSPCA_PROBABILITY,
    INSTITUTIONS,
    CaseTruth,
    generate_phantom,
    phantom_ids,
    phantom_report,
    sample_truth,
)
from CCELLACore.data.phantoms_cli import assign_splits
from CCELLACore.data.volume import read_volume, resample_to_grid


def _run_cli(out: Path, seed: int = 3, n: int = 6, extra: tuple[str, ...] = ()) -> int:
    return main(
        ["phantoms", "--institution", "1", "--n", str(n), "--size", "32", "32", "16", "--spacing", "4", "4", "4",
         "--seed", str(seed), "--out", str(out), "--layouts", "none", "--no-progress", *extra]
    )


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inst1_cases():
    return [generate_phantom(i, 1, seed=0) for i in range(10)]


@pytest.fixture(scope="module")
def inst2_cases():
    return [generate_phantom(i, 2, seed=0) for i in range(10)]


@pytest.fixture(scope="module")
def truths():
    return [sample_truth(i, 1, seed=5) for i in range(800)]


# --- determinism and CLI outputs -----------------------------------------------------------------------------------
def test_cli_same_seed_same_bytes_and_resume(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    # Two worker processes write what one process writes.
    assert _run_cli(a) == 0 and _run_cli(b, extra=("--workers", "2")) == 0 and _run_cli(c, seed=4) == 0
    files_a, files_b = _files(a), _files(b)
    assert len(files_a) == 6 * 5 + 2  # five volumes per case + manifest.csv + truth.json
    assert files_a == files_b
    # gzip headers carry no timestamp (bytes 4-8 = mtime) and no file name (flags byte 3), so bytes are reproducible.
    assert all(data[4:8] == b"\0\0\0\0" and data[3] == 0 for name, data in files_a.items() if name.endswith(".gz"))
    # A different seed gives different data.
    adc_a = read_volume(next(a.glob("cases/*/adc.nii.gz"))).array
    adc_c = read_volume(next(c.glob("cases/*/adc.nii.gz"))).array
    assert not np.array_equal(adc_a, adc_c)
    assert (a / "manifest.csv").read_bytes() != (c / "manifest.csv").read_bytes()
    # Resume: deleted files are regenerated with the same bytes; existing cases are kept.
    for victim in sorted(a.glob("cases/*/highb.nii.gz"))[:2]:
        victim.unlink()
    assert _run_cli(a, extra=("--workers", "2")) == 0
    assert _files(a) == files_b


def test_cli_manifest_readable_and_patient_level_splits(tmp_path):
    out = tmp_path / "world"
    assert _run_cli(out, n=16, extra=("--multi-study-fraction", "0.5", "--splits", "0.5", "0.25", "0.25")) == 0
    manifest = read_manifest(out / "manifest.csv", check_files=True)
    assert manifest.problems == [] and len(manifest) == 16
    split_of_patient: dict[str, set[str]] = {}
    for s in manifest.studies:
        assert s.case_id == f"{s.patient_id}_{s.study_id}" and s.institution == "1"
        assert set(s.images) == {"AxT2", "HighB", "ADC"} and set(s.masks) == {"gland", "lesion"}
        split_of_patient.setdefault(s.patient_id, set()).add(s.split)
    assert all(len(v) == 1 for v in split_of_patient.values())  # no patient in two splits
    assert len(split_of_patient) < 16  # some patients have two studies
    assert {next(iter(v)) for v in split_of_patient.values()} == {"train", "val", "test"}
    exam = manifest.studies[0].load()
    assert exam.volumes["HighB"].shape == (16, 16, 16) and exam.volumes["AxT2"].shape == (32, 32, 16)
    # truth.json carries the per-case truth with the same scores as the manifest.
    truth = __import__("json").loads((out / "truth.json").read_text(encoding="utf-8"))["cases"]
    for s in manifest.studies:
        t = CaseTruth.from_dict(truth[s.case_id])
        assert t.pirads == s.pirads and t.isup == s.isup and t.label == s.label
        assert bool(s.report) == truth[s.case_id]["has_report"]


def test_ids_and_splits():
    ids = [phantom_ids(i, 1, seed=0) for i in range(400)]
    patients = {}
    for patient_id, study_id, _ in ids:
        patients.setdefault(patient_id, []).append(study_id)
    two = sum(len(v) == 2 for v in patients.values()) / len(patients)
    assert max(len(v) for v in patients.values()) == 2 and 0.04 < two < 0.18
    split = assign_splits(list(patients), (0.8, 0.05, 0.15), seed=0)
    counts = {k: list(split.values()).count(k) for k in ("train", "val", "test")}
    assert abs(counts["train"] - 0.8 * len(patients)) <= 1 and abs(counts["test"] - 0.15 * len(patients)) <= 1


def test_generator_is_per_case_and_seeded():
    a = generate_phantom(7, 1, size=(24, 24, 12), spacing=(5, 5, 5), seed=11)
    b = generate_phantom(7, 1, size=(24, 24, 12), spacing=(5, 5, 5), seed=11)
    c = generate_phantom(7, 1, size=(24, 24, 12), spacing=(5, 5, 5), seed=12)
    for name in ("AxT2", "HighB", "ADC"):
        assert np.array_equal(a.exam.volumes[name].array, b.exam.volumes[name].array)
        assert not np.array_equal(a.exam.volumes[name].array, c.exam.volumes[name].array)
    assert a.report == b.report


# --- appearance and geometry ---------------------------------------------------------------------------------------
def _world(vol, ijk):
    return vol.affine_lps[:3, :3] @ np.asarray(ijk, float) + vol.affine_lps[:3, 3]


def _index(vol, lps):
    return np.round(np.linalg.solve(vol.affine_lps[:3, :3], np.asarray(lps, float) - vol.affine_lps[:3, 3])).astype(int)


def test_lesion_appearance_and_side(inst1_cases, inst2_cases):
    checked = 0
    for case in inst1_cases + inst2_cases:
        t2, highb, adc = (case.exam.volumes[k] for k in ("AxT2", "HighB", "ADC"))
        gland, lesion = case.exam.masks["gland"], case.exam.masks["lesion"]
        gland_dwi = resample_to_grid(gland, adc, interpolation="nearest").array
        lesion_dwi = resample_to_grid(lesion, adc, interpolation="nearest").array
        normal = (gland.array > 0) & (lesion.array == 0)
        normal_dwi = (gland_dwi > 0) & (lesion_dwi == 0)
        # PZ ADC is in the normal range (confounders and lesions are small).
        if case.truth.institution == 1:
            assert 1300 < np.median(adc.array[(gland_dwi == 2) & (lesion_dwi == 0)]) < 1900
        gland_centre_x = _world(t2, np.argwhere(gland.array > 0).mean(0))[0]
        for les in case.truth.lesions:
            mask = lesion.array == les.index
            if mask.sum() < 4:
                continue
            checked += 1
            # Side: "left" lesions lie at larger LPS x than the gland centre, in the truth and in the mask.
            mask_x = _world(t2, np.argwhere(mask).mean(0))[0]
            assert (mask_x > gland_centre_x) == (les.side == "left"), (case.case_id, les)
            assert (les.center_lps[0] > case.truth.gland_center_lps[0]) == (les.side == "left")
            zone_label = gland.array[tuple(_index(t2, les.center_lps))]
            assert zone_label == (1 if les.zone == "TZ" else 2)
            # AxT2 dark; HighB bright, ADC dark (restricted diffusion) at the lesion centre.
            assert t2.array[mask].mean() < 0.8 * t2.array[normal].mean()
            if les.diameter_mm < 10:  # DWI voxels are 4 mm: smaller lesions are partial-volumed at any voxel
                continue
            centre = tuple(_index(adc, les.center_lps))
            assert 500 < adc.array[centre] < 1000, (case.case_id, les, adc.array[centre])
            assert adc.array[centre] < 0.8 * np.median(adc.array[normal_dwi])
            assert highb.array[centre] > 1.5 * np.median(highb.array[normal_dwi])
    assert checked >= 5
    assert all(np.allclose(c.exam.volumes["AxT2"].direction, np.eye(3)) for c in inst1_cases)
    assert any(not np.allclose(c.exam.volumes["AxT2"].direction, np.eye(3)) for c in inst2_cases)
    assert all(c.exam.volumes["ADC"].array.min() >= 0 for c in inst1_cases)


def test_higher_pirads_is_larger_and_darker(truths):
    by_score = {s: [l for t in truths for l in t.lesions if l.pirads == s] for s in (3, 4, 5)}
    assert all(l.diameter_mm >= 15 for l in by_score[5])
    assert np.mean([l.diameter_mm for l in by_score[3]]) < np.mean([l.diameter_mm for l in by_score[4]])
    assert np.mean([l.adc for l in by_score[3]]) > np.mean([l.adc for l in by_score[4]]) > np.mean([l.adc for l in by_score[5]])
    assert all(len(t.lesions) <= 3 for t in truths) and all(t.pirads == max([l.pirads for l in t.lesions], default=t.pirads) for t in truths)
    volumes = np.array([t.gland_volume_cc for t in truths])
    assert volumes.min() >= 20 and 0.05 < (volumes > 80).mean() < 0.25


# --- institutions ---------------------------------------------------------------------------------------------------
def test_institution_intensity_statistics(inst1_cases, inst2_cases):
    means = {}
    for inst, cases in ((1, inst1_cases), (2, inst2_cases)):
        for seq in ("AxT2", "HighB", "ADC"):
            mean = np.mean([c.exam.volumes[seq].array.mean() for c in cases])
            target = INSTITUTIONS[inst].targets[seq][0]
            assert abs(mean / target - 1) < 0.15, (inst, seq, mean, target)
            means[inst, seq] = mean
        assert {c.exam.volumes["HighB"].metadata["b_value"] for c in cases} <= {str(b) for b in INSTITUTIONS[inst].b_values}
    assert 1.3 < means[2, "ADC"] / means[1, "ADC"] < 1.6
    assert 0.7 < means[2, "AxT2"] / means[1, "AxT2"] < 0.9
    assert 0.8 < means[2, "HighB"] / means[1, "HighB"] < 1.0
    p995 = np.mean([np.percentile(c.exam.volumes["AxT2"].array, 99.5) for c in inst1_cases])
    assert abs(p995 / 853 - 1) < 0.2
    # DWI is on a coarser grid with the same field of view.
    t2, adc = inst1_cases[0].exam.volumes["AxT2"], inst1_cases[0].exam.volumes["ADC"]
    assert adc.shape == (32, 32, 32) and np.allclose(adc.physical_extent, t2.physical_extent)


# --- labels and reports ---------------------------------------------------------------------------------------------
def test_labels_agree_with_pirads_in_probability(truths):
    histo = [t for t in truths if t.label_source == "histopathology"]
    assert 0.65 < len(histo) / len(truths) < 0.85
    for lo, hi, scores in ((0.0, 0.12, (1, 2)), (0.03, 0.3, (3,)), (0.3, 0.7, (4,)), (0.6, 0.95, (5,))):
        group = [t.label for t in histo if t.pirads in scores]
        assert len(group) > 30 and lo < np.mean(group) < hi, (scores, np.mean(group))
    for t in truths:
        if t.label_source == "pirads":
            assert t.isup is None and t.label == int(t.pirads >= 4)
        else:
            assert t.label == int(t.isup >= 2)
    assert 0.28 < np.mean([t.label for t in truths]) < 0.42
    assert set(CSPCA_PROBABILITY) == {1, 2, 3, 4, 5}


_SCORE = r"(PI[- ]?RADS|category|score)[^0-9\n]{{0,14}}{score}\b"


def test_reports_state_the_truth(truths):
    reports = [phantom_report(t, seed=5) for t in truths[:300]]
    empty = sum(r == "" for r in reports) / len(reports)
    assert 0.05 < empty < 0.16
    assert any(ch in "".join(reports) for ch in "µ≥×")
    checked, volumes = 0, []
    for t, text in zip(truths, reports):
        if not text:
            continue
        assert re.search(_SCORE.format(score=t.pirads), text), text  # overall category
        volumes.append(f"{t.gland_volume_cc:.0f}" in text or f"{t.gland_volume_cc:.1f}" in text)
        for les in t.lesions:
            assert re.search(_SCORE.format(score=les.pirads), text)
            assert str(les.diameter_mm) in text or f"{les.diameter_mm / 10:.1f}" in text
        sides = {l.side for l in t.lesions} | {c.side for c in t.confounders}
        if t.lesions and len(sides) == 1:
            side = next(iter(sides))
            other = "right" if side == "left" else "left"
            abbreviation = {"left": "Lt", "right": "Rt"}[side]
            assert re.search(rf"\b({side}|{side[0].upper()}|{abbreviation})\b", text), text
            assert not re.search(rf"\b({other}|{other[0].upper()}t)\b", text), text
            checked += 1
        if not t.lesions:
            assert re.search(r"[Nn]o (suspicious )?focal|no focal area|[Nn]o suspicious lesion|Low likelihood", text)
    assert checked > 50
    # Brief reports (lesion sentences and impression, BRIEF_REPORT_PROBABILITY of them) leave the gland volume out.
    assert 0.6 < np.mean(volumes) < 0.9, np.mean(volumes)
