"""``ccella evaluate``: image quality, diversity, faithfulness and memorisation of synthetic exams, in one report.

Example (phantoms, with a classifier's features as the named stand-in backbone)::

    ccella evaluate --real data/real/manifest.csv --synthetic synth/manifest.csv --out eval \
        --standin runs/classifier/model --classifier runs/classifier/model

With the published backbones' weights files (never downloaded)::

    ccella evaluate --real ... --synthetic ... --out eval --medicalnet weights/resnet_50_23dataset.pth \
        --radimagenet weights/RadImageNet-ResNet50_notop.pth --real-splits test

Writes ``<out>/metrics.json``, ``<out>/report.md`` and ``<out>/figures/*.png``; features are cached in
``<out>/feature_cache`` (or ``--cache``), so a run that stops resumes where it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import positive_int

    parser.add_argument("--real", type=Path, required=True, help="manifest of the real exams")
    parser.add_argument("--synthetic", type=Path, required=True, help="manifest of the synthetic exams")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--medicalnet", type=Path, default=None, help="MedicalNet resnet_50_23dataset.pth (3D FID)")
    parser.add_argument("--radimagenet", type=Path, default=None,
                        help="RadImageNet-ResNet50_notop.pth (2.5D FID on axial, coronal, sagittal slices)")
    parser.add_argument("--standin", type=Path, default=None,
                        help="classifier model folder whose features stand in for the backbones (named as such)")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="classifier model folder for the faithfulness AUC (report class vs prediction)")
    parser.add_argument("--real-splits", nargs="+", default=None, help="real splits to compare with (default: all)")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: <out>/feature_cache)")
    parser.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the intervals (0: none)")
    parser.add_argument("--kid-subsets", type=positive_int, default=100)
    parser.add_argument("--kid-subset-size", type=positive_int, default=1000)
    parser.add_argument("--max-slices", type=positive_int, default=32, help="2.5D: non-empty slices per plane and exam")
    parser.add_argument("--diversity-exams", type=positive_int, default=16, help="exams per set for MS-SSIM pairs")
    parser.add_argument("--audit-ratio", type=float, default=0.5,
                        help="possible copy: nearest distance < ratio x the real yardstick's 1st percentile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import EvaluationSettings, evaluate

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    settings = EvaluationSettings(
        medicalnet=args.medicalnet, radimagenet=args.radimagenet, standin=args.standin, classifier=args.classifier,
        real_splits=tuple(args.real_splits) if args.real_splits else None, cache=args.cache, device=device,
        n_bootstrap=args.bootstrap, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
        max_slices=args.max_slices, diversity_exams=args.diversity_exams, audit_ratio=args.audit_ratio,
        seed=args.seed, progress=not args.no_progress)
    metrics = evaluate(args.real, args.synthetic, args.out, settings)
    copies = len(metrics["memorisation"]["possible_copies"])
    print(f"{args.out / 'report.md'}: {metrics['n_synthetic']} synthetic vs {metrics['n_real']} real exams; "
          f"{copies} possible cop{'y' if copies == 1 else 'ies'} of training exams")
    return 0
