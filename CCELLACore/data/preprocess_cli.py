"""``ccella preprocess``: resample a manifest's studies onto one grid around the gland and normalise them.

Usage:
    ccella preprocess --manifest data/manifest.csv --config paper --target ldm --out prep/ldm
    ccella preprocess --manifest data/manifest.csv --config tiny --target classifier --out prep/cls --workers 1

Writes ``<out>/cases/<case_id>/{axt2,highb,adc,gland,lesion}.nii.gz``, ``<out>/manifest.csv`` and
``<out>/preprocess_summary.json``. ``--masks DIR`` supplies gland masks (``DIR/<case_id>.nii.gz``) for cases the
manifest gives none; cases still without one are centred on the AxT2 volume, with a warning naming them. Re-running reuses finished cases (same config and inputs) and recomputes the rest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import positive_int

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, type=Path, help="input manifest CSV")
    parser.add_argument("--config", default="paper", help="paper, tiny, demo or a path to a YAML config")
    parser.add_argument("--target", choices=("ldm", "classifier"), default="ldm",
                        help="which grid and normalisation of the config's preprocess section to use")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--workers", type=positive_int, default=2, help="worker processes (1 = in this process)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="process studies lacking HighB or ADC with the sequences they have (default: skip them)")
    parser.add_argument("--masks", type=Path, metavar="DIR",
                        help="gland masks for cases the manifest gives none: DIR/<case_id>.nii.gz (.nii, .mha, .nrrd), "
                             "e.g. PI-CAI's anatomical_delineations/whole_gland/AI/Bosma22b")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Returns 0 when every study was processed or reused, 1 when some were skipped (see the summary)."""
    from ..settings import load_config
    from .preprocess_batch import preprocess_manifest

    config = getattr(load_config(args.config).preprocess, args.target)
    summary = preprocess_manifest(
        args.manifest,
        config,
        args.out,
        workers=args.workers,
        allow_missing=args.allow_missing,
        progress=not args.no_progress,
        details={"config_name": str(args.config), "target": args.target},
        masks_dir=args.masks,
    )
    # The summary itself (counts, skipped cases and reasons) is logged by preprocess_manifest.
    print(f"manifest: {Path(args.out) / 'manifest.csv'}; summary: {Path(args.out) / 'preprocess_summary.json'}")
    return 1 if summary.skipped else 0
