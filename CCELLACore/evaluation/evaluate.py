"""``evaluate``: every figure of a generator's evaluation from a real and a synthetic manifest, in one pass.

What is computed (the definitions are in docs/evaluation.md):

1. **FID and KID** with bootstrap intervals, per backbone and per feature key (sequence, or sequence/plane), plus
   their mean over keys as the overall figure. Backbones come from local weight files only: MedicalNet (3D),
   RadImageNet (2.5D) and, where neither file is at hand, a classifier model folder as a named stand-in. A backbone
   whose file is not given is listed as unavailable with the reason; nothing is computed on random weights.
2. **MS-SSIM diversity** of the synthetic exams, with the real exams' figure as the yardstick.
3. **Intensity table** (0.5th percentile, mean, 99.5th percentile per sequence, institution and split).
4. **Faithfulness** (classifier AUC against report classes; phantom lesion presence and side).
5. **Memorisation audit** of the synthetic exams against the real manifest's training exams.

Each exam is read once for 2-5 (one image pass per set) and once per backbone for 1 (cached features).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.manifest import read_manifest
from ..data.study import SEQUENCES, Study
from ..errors import CCELLAError, DataError
from ..fileio import atomic_write_json, remove_orphaned_temporaries
from .backbones import Backbone, load_classifier_standin, load_medicalnet, load_radimagenet
from .diversity import intensity_row, intensity_table, ms_ssim_diversity
from .faithfulness import on_axt2_grid
from .features import exam_features
from .memorisation import audit, exam_vector
from .stats import fid, kid, metric_with_interval

__all__ = ["EvaluationSettings", "evaluate", "image_pass", "backbone_metrics"]

logger = logging.getLogger("CCELLACore")


@dataclass(frozen=True)
class EvaluationSettings:
    """What ``ccella evaluate`` runs (its options).

    Args:
        medicalnet, radimagenet: weights files of the 3D / 2.5D backbones (None: those metrics are unavailable).
        standin: a classifier model folder whose features stand in for the backbones (named in every figure).
        classifier: a classifier model folder for the faithfulness AUC (None: not computed).
        real_splits: real exams compared with the synthetic ones (None: all); the audit always uses ``train``.
        cache: feature cache folder (None: ``<out>/feature_cache``).
        n_bootstrap, kid_subsets, kid_subset_size: interval and KID settings.
        max_slices: non-empty slices per plane and exam for the 2.5D features.
        diversity_exams: exams per set sampled for MS-SSIM and the histograms; pairs among them <= max_pairs.
        audit_ratio: possible copy when the nearest distance < ratio x the yardstick's 1st percentile.
    """

    medicalnet: Path | None = None
    radimagenet: Path | None = None
    standin: Path | None = None
    classifier: Path | None = None
    real_splits: tuple[str, ...] | None = None
    cache: Path | None = None
    device: str = "cpu"
    n_bootstrap: int = 100
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    max_slices: int = 32
    diversity_exams: int = 16
    max_pairs: int = 100
    audit_ratio: float = 0.5
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n_bootstrap < 0 or self.kid_subsets < 1 or self.kid_subset_size < 2 or self.max_slices < 1:
            raise CCELLAError("n_bootstrap must be >= 0, kid_subsets >= 1, kid_subset_size >= 2, max_slices >= 1")
        if not 0 < self.audit_ratio <= 1:
            raise CCELLAError(f"audit_ratio must be in (0, 1], got {self.audit_ratio}")


def image_pass(studies: list[Study], name: str, sample: set[str], *, progress: bool) -> dict[str, Any]:
    """Read each exam once: its intensity row, its audit vector, and (for ``sample`` cases) unit-range volumes."""
    from tqdm.auto import tqdm

    rows, kept, vectors, volumes, skipped, exams = [], [], [], {s: [] for s in SEQUENCES}, [], []
    for study in tqdm(studies, desc=f"images: {name}", unit="exam", disable=not progress):
        try:
            exam = study.load(masks=False)
            vector = exam_vector(exam)
        except DataError as exc:
            logger.warning("%s: skipped case %s: %s", name, study.case_id, exc.reason)
            skipped.append({"case_id": study.case_id, "reason": exc.reason})
            continue
        rows.append((study, {n: intensity_row(v.array) for n, v in exam.volumes.items()}))
        kept.append(study)
        vectors.append(vector)
        if study.case_id in sample:
            for n, v in exam.volumes.items():
                volumes[n].append(np.asarray(v.array, np.float32))
            if len(exams) < 2:  # for the montage
                exams.append(on_axt2_grid(exam))
    return {"exams": exams, "intensity": intensity_table(rows, name), "studies": kept, "skipped": skipped,
            "vectors": np.asarray(vectors, np.float64).reshape(len(vectors), -1), "volumes": volumes}


def _unavailable(kind: str, option: str) -> dict[str, Any]:
    return {"available": False, "reason": f"no {kind} weights file given ({option} PATH); nothing is downloaded, and "
            "features of random weights would mean nothing, so these metrics are not computed"}


def backbone_metrics(backbone: Backbone, real: list[Study], synthetic: list[Study], cache: Path,
                     settings: EvaluationSettings) -> dict[str, Any]:
    """FID and KID (with intervals) per feature key and overall for one backbone."""
    real_f, real_skip = exam_features(backbone, real, cache, progress=settings.progress,
                                      desc=f"{backbone.kind} features: real")
    syn_f, syn_skip = exam_features(backbone, synthetic, cache, progress=settings.progress,
                                    desc=f"{backbone.kind} features: synthetic")
    keys = [k for k in (real_f[0] if real_f else {}) if k != "__case__" and syn_f and k in syn_f[0]]
    per_key = {}
    for key in keys:
        r, s = [f[key] for f in real_f if key in f], [f[key] for f in syn_f if key in f]
        try:
            per_key[key] = {
                "fid": metric_with_interval(fid, r, s, n_bootstrap=settings.n_bootstrap, seed=settings.seed,
                                            floor=0.0),
                "kid": metric_with_interval(
                    lambda a, b: kid(a, b, subsets=settings.kid_subsets, subset_size=settings.kid_subset_size,
                                     seed=settings.seed), r, s, n_bootstrap=settings.n_bootstrap, seed=settings.seed),
            }
        except ValueError as exc:
            per_key[key] = {"error": str(exc)}
    valid = [v for v in per_key.values() if "fid" in v]
    overall = {m: float(np.mean([v[m]["value"] for v in valid])) for m in ("fid", "kid")} if valid else {}
    return {"available": True, "backbone": backbone.describe(), "label": backbone.label, "per_key": per_key,
            "overall": {**overall, "definition": "mean over the keys above"},
            "skipped": real_skip + syn_skip}


def _backbones(settings: EvaluationSettings) -> dict[str, Any]:
    loaded: dict[str, Any] = {}
    for key, path, loader, kind, option in (
            ("medicalnet_3d", settings.medicalnet, load_medicalnet, "MedicalNet ResNet-50", "--medicalnet"),
            ("radimagenet_2_5d", settings.radimagenet, lambda p, d: load_radimagenet(p, d, settings.max_slices),
             "RadImageNet ResNet-50", "--radimagenet")):
        loaded[key] = _unavailable(kind, option) if path is None else loader(path, settings.device)
    if settings.standin is not None:
        loaded["standin"] = load_classifier_standin(settings.standin, settings.device)
    return loaded


def _sample_ids(studies: list[Study], n: int, seed: int) -> set[str]:
    if len(studies) <= n:
        return {s.case_id for s in studies}
    rng = np.random.default_rng(seed)
    return {studies[i].case_id for i in rng.choice(len(studies), n, replace=False)}


def evaluate(real_manifest: str | Path, synthetic_manifest: str | Path, out: str | Path,
             settings: EvaluationSettings = EvaluationSettings()) -> dict[str, Any]:
    """Compute every figure and write ``out/metrics.json``, ``out/report.md`` and ``out/figures/*.png``.

    Raises:
        CCELLAError: a manifest or weights file is missing or malformed, or a set has fewer than 2 usable exams.
    """
    from ..precision import describe_device
    from .faithfulness import (classifier_agreement, pair_with_real, phantom_agreement, read_phantom_truth)
    from .report import write_report

    started = time.time()
    out = Path(out)
    cache = settings.cache or out / "feature_cache"
    real_all = read_manifest(real_manifest).studies
    synthetic = read_manifest(synthetic_manifest).studies
    real = [s for s in real_all if settings.real_splits is None or s.split in settings.real_splits]
    if len(real) < 2 or len(synthetic) < 2:
        raise CCELLAError(f"need at least 2 real and 2 synthetic exams, got {len(real)} real ({real_manifest}"
                          f"{', splits ' + ','.join(settings.real_splits) if settings.real_splits else ''}) and "
                          f"{len(synthetic)} synthetic ({synthetic_manifest})")
    backbones = _backbones(settings)

    real_sample = _sample_ids(real, settings.diversity_exams, settings.seed)
    syn_sample = _sample_ids(synthetic, settings.diversity_exams, settings.seed)
    real_pass = image_pass(real_all, "real", real_sample, progress=settings.progress)
    syn_pass = image_pass(synthetic, "synthetic", syn_sample, progress=settings.progress)

    fidelity = {key: (backbone_metrics(b, real, synthetic, cache, settings) if isinstance(b, Backbone) else b)
                for key, b in backbones.items()}
    diversity = {name: {"synthetic": ms_ssim_diversity(syn_pass["volumes"][name], max_pairs=settings.max_pairs,
                                                       seed=settings.seed),
                        "real": ms_ssim_diversity(real_pass["volumes"][name], max_pairs=settings.max_pairs,
                                                  seed=settings.seed)}
                 for name in SEQUENCES if syn_pass["volumes"][name]}

    train_ids = {s.case_id for s in real_all if s.split == "train"} or {s.case_id for s in real_all}
    index = {s.case_id: i for i, s in enumerate(real_pass["studies"])}

    vectors = real_pass["vectors"].reshape(len(real_pass["studies"]), -1)  # (N, D), also when a part is empty

    def part(ids_wanted: bool) -> tuple[list[Study], np.ndarray]:
        chosen = [s for s in real_pass["studies"] if (s.case_id in train_ids) == ids_wanted]
        return chosen, vectors[[index[s.case_id] for s in chosen]]

    memorisation = audit(part(True), part(False), (syn_pass["studies"], syn_pass["vectors"]),
                         ratio=settings.audit_ratio)

    sources = pair_with_real(synthetic, real_all)
    faithfulness: dict[str, Any] = {}
    if settings.classifier is not None:
        faithfulness["classifier"] = classifier_agreement(settings.classifier, synthetic, sources,
                                                          device=settings.device, progress=settings.progress)
    else:
        faithfulness["classifier"] = {"available": False, "reason": "no classifier model folder given (--classifier)"}
    truths = read_phantom_truth(synthetic_manifest)
    real_truths = read_phantom_truth(real_manifest)
    truths.update({syn: real_truths[src.case_id] for syn, src in sources.items() if src.case_id in real_truths})
    faithfulness["phantom_lesions"] = (phantom_agreement(synthetic, truths, real_all, progress=settings.progress)
                                       if truths else {"available": False, "reason": "no phantom truth.json beside "
                                                       "either manifest (only phantom data sets have one)"})

    metrics = {
        "note": "SYNTHETIC exams evaluated against real ones; research use only",
        "real_manifest": Path(real_manifest).name, "synthetic_manifest": Path(synthetic_manifest).name,
        "n_real": len(real), "n_real_all": len(real_all), "n_synthetic": len(synthetic),
        "real_splits": list(settings.real_splits) if settings.real_splits else "all",
        "device": describe_device(settings.device),
        "fidelity": fidelity, "diversity": diversity,
        "intensity": real_pass["intensity"] + syn_pass["intensity"],
        "faithfulness": faithfulness, "memorisation": memorisation,
        "skipped": {"real": real_pass["skipped"], "synthetic": syn_pass["skipped"]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.__dict__.items()},
    }
    metrics["seconds"] = round(time.time() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "figures"):  # of a run killed while it wrote the report
        remove_orphaned_temporaries(folder)
    write_report(metrics, out, {"real": real_pass, "synthetic": syn_pass})
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
