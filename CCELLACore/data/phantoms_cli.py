"""``ccella phantoms``: write a procedural bpMRI data set (the phantom world) with manifest, truth and layouts.

Example::

    ccella phantoms --institution 1 --n 50 --seed 0 --out data/phantoms1
    ccella phantoms --institution 2 --n 50 --seed 0 --first-index 0 --out data/phantoms2 --layouts none
    ccella phantoms --config demo --institution 1 --n 1000 --seed 0 --out data/demo --layouts none --workers 2

Writes ``<out>/cases/<case_id>/{axt2,highb,adc,gland,lesion}.nii.gz``, ``<out>/manifest.csv`` (splits per patient),
``<out>/truth.json`` (per-case lesions, sectors, sizes, scores) and, unless ``--layouts none``, the authors' JSON,
PI-CAI and Prostate158 layouts. Resumable: a case whose five files exist is not rendered again (it would give the
same bytes). Same seed, same bytes, whatever the number of ``--workers``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import logging
from pathlib import Path

import numpy as np

from ..cli import positive_int
from ..fileio import atomic_write_json
from .manifest import write_manifest
from .phantoms import generate_phantom, get_institution, phantom_report, sample_truth
from .study import Study
from .volume import single_itk_thread, write_volume

__all__ = ["add_arguments", "run", "assign_splits", "LAYOUTS", "CASE_FILES", "PhantomGridConfig"]

logger = logging.getLogger("CCELLACore.phantoms")

LAYOUTS = ("authors_json", "picai", "prostate158")
#: file name per exam entry (sequence or mask) inside ``cases/<case_id>/``
CASE_FILES = {"AxT2": "axt2.nii.gz", "HighB": "highb.nii.gz", "ADC": "adc.nii.gz", "gland": "gland.nii.gz", "lesion": "lesion.nii.gz"}
_SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class PhantomGridConfig:
    """The AxT2 grid a model's phantoms are rendered on (``phantoms:`` in a config); None = the institution's default.

    A model trained on phantoms records it, so that ``ccella honour`` renders its real comparison exams on the same
    grid, and ``ccella phantoms --config`` builds its training data (the demo: 96 x 96 x 56 voxels at 1 mm, finer
    than its 64 x 64 x 32 training grid at 1 x 1 x 1.5 mm, so preprocessing only ever downsamples).
    """

    size: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.size is not None and (len(self.size) != 3 or min(self.size) < 4):
            raise ValueError(f"phantoms.size must be 3 integers >= 4, got {self.size}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"phantoms.spacing must be 3 positive numbers in mm, got {self.spacing}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--institution", type=int, choices=(1, 2), required=True, help="1 or 2: scanner/protocol profile")
    parser.add_argument("--n", type=int, required=True, help="number of studies (cases) to write")
    parser.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="AxT2 grid in voxels (default 64 64 32 for institution 1)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="AxT2 voxel size in mm (default 2 2 2 for institution 1)")
    parser.add_argument("--config", default=None,
                        help="take --size/--spacing from this config's phantoms: section (paper, demo, tiny or a YAML)")
    parser.add_argument("--seed", type=int, default=0, help="world seed: same seed, same bytes")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--first-index", type=int, default=0, help="index of the first case (disjoint ranges give disjoint cases)")
    parser.add_argument("--splits", type=float, nargs=3, default=(0.8, 0.05, 0.15), metavar=("TRAIN", "VAL", "TEST"), help="patient fractions per split")
    parser.add_argument("--multi-study-fraction", type=float, default=0.1, help="fraction of patients with two studies")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), help=f"layouts to export besides the manifest: {' '.join(LAYOUTS)}, or 'none'")
    parser.add_argument("--workers", type=positive_int, default=1, help="processes rendering cases (same bytes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def assign_splits(patient_ids: list[str], fractions, seed: int) -> dict[str, str]:
    """Patient -> split, in exact proportions over the given patients (rounded), shuffled by ``seed``.

    Every split with a positive fraction gets at least one patient when there are enough patients.
    """
    fractions = np.asarray(fractions, float)
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"--splits must be 3 non-negative fractions, got {list(fractions)}")
    fractions = fractions / fractions.sum()
    patients = sorted(set(patient_ids))
    order = np.random.default_rng([int(seed), 99]).permutation(len(patients))
    counts = np.floor(fractions * len(patients)).astype(int)
    for k in np.argsort(-(fractions * len(patients) - counts))[: len(patients) - counts.sum()]:
        counts[k] += 1
    for k in range(3):  # a requested split must not be empty when another has spare patients
        if fractions[k] > 0 and counts[k] == 0 and counts.max() > 1:
            counts[int(np.argmax(counts))] -= 1
            counts[k] += 1
    splits = np.repeat(np.arange(3), counts)
    return {patients[i]: _SPLIT_NAMES[int(splits[rank])] for rank, i in enumerate(order)}


def _render_case_files(index: int, institution: int, size, spacing, seed: int, multi_study_fraction: float,
                       folder: Path) -> None:
    """Render phantom case ``index`` and write its five files into ``folder`` (in this or a worker process)."""
    case = generate_phantom(index, institution, size, spacing, seed, multi_study_fraction=multi_study_fraction)
    for name, vol in (*case.exam.volumes.items(), *case.exam.masks.items()):
        write_volume(vol, folder / CASE_FILES[name])


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    profile = get_institution(args.institution)
    if args.config is not None:
        from ..settings import load_config

        grid = load_config(args.config).phantoms
        args.size = args.size if args.size is not None else grid.size
        args.spacing = args.spacing if args.spacing is not None else grid.spacing
    if args.n < 1 or args.first_index < 0:
        raise SystemExit("ccella phantoms: --n must be >= 1 and --first-index >= 0")
    if not 0 <= args.multi_study_fraction < 1:
        raise SystemExit("ccella phantoms: --multi-study-fraction must be in [0, 1)")
    if args.size is not None and min(args.size) < 4:
        raise SystemExit(f"ccella phantoms: --size must be at least 4 voxels per axis, got {args.size}")
    if args.spacing is not None and min(args.spacing) <= 0:
        raise SystemExit(f"ccella phantoms: --spacing must be positive, got {args.spacing}")
    layouts = [] if [x.lower() for x in args.layouts] == ["none"] else list(args.layouts)
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        raise SystemExit(f"ccella phantoms: unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)} or 'none'")
    out: Path = args.out
    indices = range(args.first_index, args.first_index + args.n)
    truths = [sample_truth(i, profile.institution, args.seed, multi_study_fraction=args.multi_study_fraction) for i in indices]
    split_of = assign_splits([t.patient_id for t in truths], args.splits, args.seed)

    todo = [(index, truth) for index, truth in zip(indices, truths)
            if not all((out / "cases" / truth.case_id / file).is_file() for file in CASE_FILES.values())]
    jobs = [(index, profile.institution, args.size, args.spacing, args.seed, args.multi_study_fraction,
             out / "cases" / truth.case_id) for index, truth in todo]
    bar = tqdm(total=len(jobs), desc="phantoms", unit="case", disable=args.no_progress)
    if args.workers == 1 or len(jobs) < 2:
        for job in jobs:
            _render_case_files(*job)
            bar.update(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # "spawn", as preprocessing: safe whatever the parent imported; each case is its own seeded draw.
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=single_itk_thread) as pool:
            for future in as_completed([pool.submit(_render_case_files, *job) for job in jobs]):
                future.result()
                bar.update(1)
    bar.close()
    reused = len(truths) - len(todo)

    studies: list[Study] = []
    truth_json: dict[str, dict] = {}
    for truth in truths:
        paths = {name: out / "cases" / truth.case_id / file for name, file in CASE_FILES.items()}
        report = phantom_report(truth, args.seed)  # the report render_case gives, re-drawn cheaply
        studies.append(
            Study(
                case_id=truth.case_id,
                patient_id=truth.patient_id,
                study_id=truth.study_id,
                institution=str(profile.institution),
                split=split_of[truth.patient_id],
                images={seq: paths[seq] for seq in ("AxT2", "HighB", "ADC")},
                masks={m: paths[m] for m in ("gland", "lesion")},
                report=report,
                pirads=truth.pirads,
                isup=truth.isup,
                label=truth.label,
                label_source=truth.label_source,
            )
        )
        truth_json[truth.case_id] = {**truth.to_dict(), "split": split_of[truth.patient_id], "has_report": bool(report)}

    write_manifest(studies, out / "manifest.csv")
    atomic_write_json(out / "truth.json", {"seed": args.seed, "institution": profile.institution, "cases": truth_json})
    for layout in layouts:
        from .layouts import export_layout  # written by the layouts engineer; imported only when asked for

        export_layout(studies, layout, out / layout)
    n_pos = sum(1 for s in studies if s.label == 1)
    logger.info(
        "wrote %d phantom case(s) to %s (%d already there, %d positive, %d patients); layouts: %s",
        len(studies), out, reused, n_pos, len(split_of), ", ".join(layouts) or "none",
    )
    return 0
