"""A classifier trained on phantom exams beats chance on held-out phantom exams: AUC > 0.8.

CPU-sized on purpose (about a minute on 2 cores, both used): a 32 x 32 x 32 grid at 2 mm (the gland and its
surroundings), ~80 optimiser steps of 8 exams, flips only. The label is what the images show, PI-RADS >= 4 (a
suspicious lesion) against PI-RADS <= 2 (no lesion), PI-RADS 3 exams left out: the phantoms' csPCa label also
depends on a hidden biopsy draw (P(csPCa | PI-RADS 4) = 0.5), which caps any image classifier's AUC near 0.89 by
design, too close to 0.8 for a short run to clear reliably.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from CCELLACore.classifier.classify import classify_manifest
from CCELLACore.classifier.config import AugmentationConfig, load_classifier_config
from CCELLACore.classifier.model import load_classifier_dir
from CCELLACore.classifier.train import train_classifier
from CCELLACore.data.manifest import write_manifest
from CCELLACore.data.phantoms import generate_phantom
from CCELLACore.data.preprocess import GridConfig
from CCELLACore.data.study import Study
from CCELLACore.data.volume import write_volume

N_CASES = 110
TEST_FRACTION = 0.25


@pytest.fixture()
def two_threads():
    """Both cores (CI's 2): half the time of one thread (126 s -> 65 s, AVX2 kernels; held-out AUC 0.893)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _phantom_manifest(root: Path) -> Path:
    studies = []
    for index in range(N_CASES):
        case = generate_phantom(index, 1, (40, 40, 32), (2.5, 2.5, 2.5), seed=11, multi_study_fraction=0.0)
        if case.truth.pirads == 3:
            continue
        paths = {seq: write_volume(vol, root / case.case_id / f"{seq.lower()}.nii.gz")
                 for seq, vol in case.exam.volumes.items()}
        studies.append(Study(case_id=case.case_id, patient_id=case.truth.patient_id, institution="1", images=paths,
                             pirads=case.truth.pirads, label=int(case.truth.pirads >= 4), label_source="pirads"))
    n_test = round(TEST_FRACTION * len(studies))
    for k, study in enumerate(studies):  # phantom cases are independent draws: the last ones are held out
        study.split = "test" if k >= len(studies) - n_test else "train"
    return write_manifest(studies, root / "manifest.csv")


def test_phantom_classifier_beats_chance_on_held_out_exams(tmp_path, two_threads):
    manifest = _phantom_manifest(tmp_path / "data")
    config = load_classifier_config("tiny")
    config = dataclasses.replace(
        config,
        grid=GridConfig((32, 32, 32), (2.0, 2.0, 2.0)),
        augmentation=AugmentationConfig(rotate_deg=0.0, translate_mm=(0.0, 0.0, 0.0), zoom=(1.0, 1.0)),
        train=dataclasses.replace(config.train, batch_size=8, epochs=10, lr=3e-4, val_split="",
                                  checkpoint_every=100),
    )
    model_dir = train_classifier(config, manifest, tmp_path / "run", device="cpu", progress=False)
    model = load_classifier_dir(model_dir)
    assert model.metadata["extra"]["steps"] >= 70
    summary = classify_manifest(model, manifest, tmp_path / "test", splits=("test",), saliency=False, progress=False)
    metrics = summary["metrics"]
    assert summary["n_skipped"] == 0 and metrics["n"] >= 20 and 0 < metrics["n_pos"] < metrics["n"]
    print(f"held-out phantom AUC {metrics['auc']:.3f}, AP {metrics['ap']:.3f} on {int(metrics['n'])} exams")
    assert metrics["auc"] > 0.8, metrics
