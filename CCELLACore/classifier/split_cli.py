"""``ccella split``: patient-level train/val/test splits stratified by institution and label, seeded.

Usage:
    ccella split --manifest picai.csv --out picai_split.csv
    ccella split --manifest picai.csv --out picai_split.csv --seed 1 --fractions 0.8 0.05 0.15 --overwrite

All studies of a patient land in one split; the manifest's other columns are kept. A manifest that already has
splits is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace
from pathlib import Path

__all__ = ["add_arguments", "run", "split_manifest"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, type=Path, help="manifest CSV to split")
    parser.add_argument("--out", required=True, type=Path, help="the new manifest CSV (paths rewritten relative to it)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed: same seed, same splits")
    parser.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.05, 0.15),
                        metavar=("TRAIN", "VAL", "TEST"), help="patient fractions (default the paper's 0.8 0.05 0.15)")
    parser.add_argument("--overwrite", action="store_true", help="replace splits the manifest already has")


def split_manifest(manifest_path, out_path, *, fractions=(0.8, 0.05, 0.15), seed: int = 0,
                   overwrite: bool = False) -> dict[tuple[str, str], int]:
    """Split a manifest's patients; returns ``{(split, label), n_studies}``.

    Raises:
        ManifestError: the manifest already has splits (without ``overwrite``), or bad fractions.
    """
    from ..data.manifest import read_manifest, write_manifest
    from ..errors import ManifestError
    from .split import stratified_patient_split

    manifest = read_manifest(manifest_path)
    for problem in manifest.problems:
        raise ManifestError(manifest_path, f"case {problem.case_id}: {problem.reason}; fix the row first "
                            "(a split must not silently drop studies)")
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ManifestError(manifest_path, f"--fractions must be non-negative with a positive sum, got {list(fractions)}")
    already = [s.case_id for s in manifest.studies if s.split]
    if already and not overwrite:
        raise ManifestError(manifest_path, f"{len(already)} studies already have a split (e.g. {already[0]}); "
                            "give --overwrite to replace them")
    split_of = stratified_patient_split(manifest.studies, fractions, seed)
    studies = [replace(s, split=split_of[s.patient_id]) for s in manifest.studies]
    write_manifest(studies, out_path)
    return dict(sorted(Counter((s.split, "?" if s.label is None else str(s.label)) for s in studies).items()))


def run(args: argparse.Namespace) -> int:
    counts = split_manifest(args.manifest, args.out, fractions=tuple(args.fractions), seed=args.seed,
                            overwrite=args.overwrite)
    parts = []
    for split in ("train", "val", "test"):
        by_label = {label: n for (s, label), n in counts.items() if s == split}
        parts.append(f"{split} {sum(by_label.values())} (" + ", ".join(f"label {k}: {v}" for k, v in
                                                                         sorted(by_label.items())) + ")")
    print(f"{args.out}: " + "; ".join(parts))
    return 0
