"""``ccella synthesize``: one synthetic exam per real exam of a manifest, as the paper does, for training classifiers.

One process::

    ccella synthesize --manifest data/inst1.csv --model runs/ldm/model --out synth/inst1

Sharded over GPUs (each rank generates every world_size-th exam; rank 0 merges)::

    torchrun --standalone --nproc_per_node=4 Training/synthesize.py --manifest ... --model ... --out ...

Exam k of the manifest uses seed ``--seed + k`` whatever the number of processes, so the result does not depend on
how the work was split. Finished exams (their ``generation.json`` is written last) are skipped when the job runs
again. The merged ``manifest.csv`` labels each synthetic exam with the class the model predicted from the report
(label source ``predicted``; the reference's ``PIRADS_synth``). Sampler, steps and guidance default to the model's
``sampling:`` config, as in ``ccella generate`` and ``ccella honour``. Privacy: synthetic exams are named by
a hash of the source case, and their records hold hashes of the case and report, not the text or identifiers,
unless ``--keep-report`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

from ..cli import add_decoder_argument, positive_int
from ..data.batch import BatchSummary
from ..data.manifest import read_manifest, write_manifest
from ..data.study import LabelSource, Study
from ..fileio import read_json, remove_orphaned_temporaries
from ..reports import ReportError, is_empty_report, report_hash
from .generate_cli import DEMO_MODEL_DIR, write_generation

__all__ = ["add_arguments", "run", "synthetic_id"]

logger = logging.getLogger("CCELLACore")

DONE_FILE = "generation.json"


def synthetic_id(real_id: str) -> str:
    """A stable, non-identifying name for the synthetic twin of a real case or patient."""
    return "syn_" + hashlib.sha256(real_id.encode("utf-8")).hexdigest()[:16]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, required=True, help="manifest of the real exams (their reports)")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="model directory (default: demo model)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--splits", nargs="*", default=None, help="only these splits (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="exam k of the manifest uses seed + k")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--sampler", default=None, help="sampler (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--keep-report", action="store_true",
                        help="copy report text into the outputs (default: hashes only)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_decoder_argument(parser)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--audit", action="store_true", help="then run the memorisation audit of `ccella evaluate` "
                        "on the written exams against the manifest's training exams (<out>/audit.json)")


def _synthetic_study(study: Study, case_dir: Path, record: dict, keep_report: bool) -> Study:
    probability = float(record["predicted_csPCa_probability"])
    return Study(
        case_id=case_dir.name,
        patient_id=synthetic_id(study.patient_id),
        institution=study.institution,
        split=study.split,
        images={seq: case_dir / name for seq, name in record["files"].items()},
        report=(study.report or "") if keep_report else "",
        label=int(probability >= 0.5),
        label_source=LabelSource.PREDICTED,
    )


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..training.distributed import init_distributed
    from .generation import CCELLAPipeline

    ctx = init_distributed(args.device)
    manifest = read_manifest(args.manifest)
    studies = [s for s in manifest.studies if args.splits is None or s.split in args.splits]
    summary = BatchSummary("synthesize")
    summary.extend(manifest.problems)
    pipe = CCELLAPipeline.from_pretrained(args.model, device=ctx.device, decoder=args.decoder)
    mine = list(enumerate(studies))[ctx.rank :: ctx.world_size]
    for k, study in tqdm(mine, desc="synthesize", unit="exam", disable=args.no_progress or not ctx.is_main):
        case_dir = args.out / "cases" / synthetic_id(study.case_id)
        if (case_dir / DONE_FILE).is_file():
            summary.reused.append(study.case_id)
            continue
        # Killed mid-exam before: its volumes are made again; a file a kill cut short was never renamed into place.
        remove_orphaned_temporaries(case_dir)
        unconditional = is_empty_report(study.report)
        try:
            output = pipe(None if unconditional else study.report, seed=args.seed + k, steps=args.steps,
                          sampler=args.sampler, guidance=args.guidance, unconditional=unconditional)
        except ReportError as exc:
            summary.skip(study.case_id, str(exc))
            continue
        output.settings.update({"source_case_hash": synthetic_id(study.case_id),
                                "source_report_hash": None if unconditional else report_hash(study.report)})
        write_generation(output, study.report if args.keep_report else None, case_dir)
        summary.done.append(study.case_id)
    ctx.barrier()
    if ctx.is_main:
        # Merge: every finished exam, whichever rank (or earlier run) made it.
        remove_orphaned_temporaries(args.out)  # of a run killed while it wrote the manifest or summary
        merged = []
        for study in studies:
            case_dir = args.out / "cases" / synthetic_id(study.case_id)
            if (case_dir / DONE_FILE).is_file():
                merged.append(_synthetic_study(study, case_dir, read_json(case_dir / DONE_FILE), args.keep_report))
        write_manifest(merged, args.out / "manifest.csv")
        summary.details.update({"n_synthetic": len(merged), "world_size": ctx.world_size,
                                "model_hash": pipe.model_hash, "decoder": pipe.autoencoder.decoder_name})
        summary.write(args.out / "synthesize_summary.json")
        print(f"{args.out / 'manifest.csv'}: {len(merged)} synthetic exams; {summary}")
        if args.audit:
            from ..evaluation.memorisation import write_audit

            write_audit(args.manifest, args.out / "manifest.csv", args.out / "audit.json",
                        progress=not args.no_progress)
    ctx.barrier()
    return 1 if summary.skipped else 0
