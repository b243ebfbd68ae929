"""``ccella classify``: p(clinically significant cancer) and a Grad-CAM saliency map for exams of any geometry.

Usage:
    ccella classify --model CCELLACore/demo_classifier --axt2 t2.nii.gz --highb hb.nii.gz --adc adc.nii.gz --out res
    ccella classify --model runs/cls/model --study case_folder --out res     # axt2.*, highb.*, adc.* inside
    ccella classify --model runs/cls/model --manifest test.csv --split test --out res_test

Writes ``<out>/classification.json`` (``probability``, model name and hash) and ``<out>/saliency.nii.gz`` on the AxT2
input's grid; with ``--manifest`` one folder per case under ``<out>/cases/`` plus ``classifications.csv`` and
``classify_summary.json`` (AUC/AP where labels exist).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_arguments", "run", "DEFAULT_MODEL"]

#: The small phantom-trained classifier shipped with the package.
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "demo_classifier"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="classifier model directory (default: the shipped demo classifier)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--axt2", type=Path, help="axial T2 volume (NIfTI, NRRD or MHA; any geometry)")
    source.add_argument("--study", type=Path, help="folder holding axt2.*, highb.*, adc.* (also t2w/hbv names)")
    source.add_argument("--manifest", type=Path, help="manifest CSV: classify every listed exam")
    parser.add_argument("--highb", type=Path, help="high-b DWI volume (3-channel models)")
    parser.add_argument("--adc", type=Path, help="ADC map in 10^-6 mm^2/s (3-channel models)")
    parser.add_argument("--split", nargs="+", help="with --manifest: only these splits (e.g. test)")
    parser.add_argument("--institution", help="with --manifest: only this institution")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--no-saliency", action="store_true", help="skip the Grad-CAM map (faster)")
    parser.add_argument("--saliency-layer", default=None, help="EfficientNet stage for Grad-CAM (default _blocks.4)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import CCELLAError
    from .classify import classify_files, classify_manifest, find_study_files
    from .model import load_classifier_dir
    from .saliency import DEFAULT_LAYER

    if args.manifest is None and (args.split or args.institution):
        raise CCELLAError("--split and --institution apply to --manifest only")
    if args.axt2 is None and (args.highb or args.adc):
        raise CCELLAError("--highb/--adc go with --axt2; a --study folder or a --manifest names its own files")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    if args.model == DEFAULT_MODEL and not (DEFAULT_MODEL / "model.json").is_file():
        raise CCELLAError(f"{DEFAULT_MODEL}: the demo classifier is not built in this checkout; run "
                          "`bash Training/build_demo_classifier.sh` or give --model DIR")
    model = load_classifier_dir(args.model, device)
    layer = args.saliency_layer or DEFAULT_LAYER
    if args.manifest is not None:
        summary = classify_manifest(model, args.manifest, args.out, splits=tuple(args.split or ()),
                                    institution=args.institution, saliency=not args.no_saliency, layer=layer,
                                    device=device, progress=not args.no_progress)
        metrics = summary.get("metrics") or {}
        text = f"{summary['n_classified']} classified, {summary['n_skipped']} skipped"
        if metrics.get("auc") is not None:
            text += f"; AUC {metrics['auc']:.3f}, AP {metrics['ap']:.3f}"
        print(f"{text}; {Path(args.out) / 'classifications.csv'}")
        return 0
    if args.study is not None:
        files = find_study_files(args.study)
        case_id = args.study.resolve().name
    else:
        files = {"AxT2": args.axt2, "HighB": args.highb, "ADC": args.adc}
        case_id = None
    result = classify_files(model, {k: v for k, v in files.items() if v is not None}, args.out, case_id=case_id,
                            saliency=not args.no_saliency, layer=layer, device=device)
    print(json.dumps({"probability": round(result["probability"], 4), "model": result["model"]["name"],
                      "out": str(args.out)}))
    return 0
