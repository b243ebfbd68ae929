"""``ccella generate``: synthetic exams from reports, written as NIfTI (or NRRD) + a PNG preview + a JSON sidecar.

Examples::

    ccella generate --report "PI-RADS 5 lesion in the left peripheral zone, mid gland, 18 mm." --out exam1
    ccella generate --report-file report.txt --seed 3 --steps 30 --guidance 2.0 --out exam2 --format nrrd
    ccella generate --reports reports.json --out batch          # a JSON list of strings or {"id", "report"}
    ccella generate --unconditional --out exam3
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from ..cli import add_decoder_argument, add_precision_argument, precision_dtype
from ..errors import CCELLAError
from ..fileio import atomic_write_json, read_json
from ..reports import ReportError, read_report_file

__all__ = ["add_arguments", "run", "DEMO_MODEL_DIR", "write_generation"]

logger = logging.getLogger("CCELLACore")

#: The embedded demo model (trained on the phantom world; see its README.md).
DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "demo_model"

_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--report", help="the report text (quote it)")
    src.add_argument("--report-file", type=Path, help="a UTF-8 text file holding one report")
    src.add_argument("--reports", type=Path, help="a JSON list of reports (strings or {\"id\", \"report\"}) or a "
                     ".txt file with one report per line")
    src.add_argument("--unconditional", action="store_true", help="generate without a report (null condition)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR,
                        help="model directory (default: the embedded demo model)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); batch item k uses seed + k")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the model's sampling config; DDPM: up to 1000)")
    parser.add_argument("--sampler", default=None, help="ddpm, ddim, dpm-solver++ (noise models) or rflow "
                        "(velocity models); default: the model's sampling config")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (1 = none; default: the model's sampling config)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="noise levels t/T (1 = pure noise) where guidance applies (default: the model's)")
    parser.add_argument("--side-scale", type=float, default=None,
                        help="how firmly the report's side places the lesion (side-map models; 1 = as trained; "
                        "default: the model's)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=None,
                        help="output voxel spacing in mm (default: the training set's median)")
    parser.add_argument("--format", choices=sorted(_FORMATS), default="nifti", help="volume file format")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_precision_argument(parser)
    add_decoder_argument(parser)
    parser.add_argument("--decode-tile", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="decode in tiles of this many LATENT voxels (e.g. 32 32 32) to cap memory "
                        "(a 256x256x128 volume fits 6 GiB with 32 32 32; docs/speed.md)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read_reports(args) -> list[tuple[str, str | None]]:
    """(name, report) pairs; None = unconditional."""
    if args.unconditional:
        return [("exam", None)]
    if args.report is not None:
        return [("exam", args.report)]
    if args.report_file is not None:
        return [("exam", read_report_file(args.report_file))]
    path: Path = args.reports
    if path.suffix.lower() == ".json":
        items = read_json(path)
        if not isinstance(items, list):
            raise CCELLAError(f"{path}: expected a JSON list of reports")
        out = []
        for k, item in enumerate(items):
            if isinstance(item, str):
                out.append((f"exam_{k:04d}", item))
            elif isinstance(item, dict) and isinstance(item.get("report"), str):
                out.append((_safe_name(str(item.get("id", f"exam_{k:04d}"))), item["report"]))
            else:
                raise CCELLAError(f"{path}: item {k} must be a string or an object with a 'report' string")
        return out
    lines = [line for line in read_report_file(path).splitlines() if line.strip()]
    return [(f"exam_{k:04d}", line) for k, line in enumerate(lines)]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "exam"


def write_generation(output, report: str | None, out_dir: Path, fmt: str = "nifti") -> dict:
    """Write one generated exam: a volume per sequence, ``preview.png`` and ``generation.json`` (the sidecar)."""
    from ..data.volume import write_volume
    from ..visualize import write_montage

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, volume in output.exam.volumes.items():
        files[name] = write_volume(volume, out_dir / f"{name.lower()}{_FORMATS[fmt]}").name
    write_montage(output.exam, out_dir / "preview.png")
    sidecar = {
        "synthetic": True,
        "note": "SYNTHETIC exam generated by CCELLA++ from a report; not a real patient; not for diagnosis",
        "report": report,  # the user's own input, needed to reproduce the exam (docs/design.md, privacy)
        "predicted_csPCa_probability": output.class_probability,
        **output.settings,
        "files": files,
        "preview": "preview.png",
        "units": {"ADC": "10^-6 mm^2/s", "AxT2": "arbitrary (model reference intensity)",
                  "HighB": "arbitrary (model reference intensity)"},
    }
    atomic_write_json(out_dir / "generation.json", sidecar)
    return sidecar


def run(args: argparse.Namespace) -> int:
    from .generation import CCELLAPipeline

    reports = _read_reports(args)
    if not args.model.is_dir():
        raise CCELLAError(f"{args.model}: model directory not found (train one with ccella train-ldm, or use the "
                          "embedded demo model by leaving out --model)")
    dtype = precision_dtype(args.precision)
    from ..models.light_decoder import DecodeTiling

    tiling = DecodeTiling(roi=tuple(args.decode_tile)) if args.decode_tile else None
    pipe = CCELLAPipeline.from_pretrained(args.model, device=args.device, dtype=dtype, decoder=args.decoder,
                                          decode_tiling=tiling)
    single = len(reports) == 1
    failures = 0
    for k, (name, report) in enumerate(reports):
        out_dir = args.out if single else args.out / name
        try:
            output = pipe(report, seed=args.seed + k, steps=args.steps, sampler=args.sampler,
                          guidance=args.guidance, guidance_interval=args.guidance_interval,
                          side_scale=args.side_scale,
                          spacing=tuple(args.spacing) if args.spacing else None,
                          unconditional=report is None, progress=not args.no_progress)
        except ReportError as exc:
            if single:
                raise
            failures += 1
            logger.error("%s: %s", name, exc)
            continue
        sidecar = write_generation(output, report, out_dir, args.format)
        print(f"{out_dir}: {', '.join(sidecar['files'].values())}, preview.png, generation.json "
              f"(P(csPCa) = {output.class_probability:.2f})")
    return 1 if failures else 0
