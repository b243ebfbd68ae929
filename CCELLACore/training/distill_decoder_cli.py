"""``ccella distill-decoder``: distil a light decoder from a model folder's full decoder and add it to the folder.

Usage:
    ccella distill-decoder --model runs/ldm/model --manifest data/prep/manifest.csv --work runs/distill
    ccella distill-decoder --model runs/ldm/model --manifest ... --work ... --channels 16 32 64 --steps 4000

Adds ``light_decoder.safetensors`` to the model folder and its record (architecture, PSNR/SSIM against the full
decoder on held-out exams, decode times, whether it met the quality bar) to ``model.json``; ``ccella generate
--decoder light`` uses it, ``--decoder auto`` (the default) only when it met the bar. A re-run of the same command
resumes from ``<work>/checkpoints``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ..cli import positive_int

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model folder with an autoencoder (the teacher)")
    parser.add_argument("--manifest", required=True, type=Path,
                        help="manifest written by `ccella preprocess --target ldm` on the model's grid")
    parser.add_argument("--work", required=True, type=Path, help="folder for checkpoints and distill.json")
    parser.add_argument("--steps", type=positive_int, help="optimiser steps (default 2000)")
    parser.add_argument("--batch-size", type=positive_int, help="latent crops per step (default 4)")
    parser.add_argument("--crop", type=positive_int, nargs=3, metavar=("X", "Y", "Z"),
                        help="latent crop per sample (default 16 16 16 = 64^3 voxels)")
    parser.add_argument("--whole", action="store_true", help="train on whole latents instead of crops")
    parser.add_argument("--channels", type=positive_int, nargs="+", help="student channels per level "
                        "(default: the full decoder's / 4, e.g. 16 32 64 for MAISI)")
    parser.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, help="seed (default 0)")
    parser.add_argument("--stop-after", type=positive_int,
                        help="stop after this step with a checkpoint (train in pieces)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .distill_decoder import DistillConfig, distill_decoder, with_overrides

    cfg = with_overrides(DistillConfig(), steps=args.steps, batch_size=args.batch_size,
                         crop=tuple(args.crop) if args.crop else None, lr=args.lr, seed=args.seed,
                         num_channels=tuple(args.channels) if args.channels else None)
    if args.whole:
        cfg = replace(cfg, crop=None)
    record = distill_decoder(args.model, args.manifest, args.work, cfg, device=args.device,
                             stop_after=args.stop_after, progress=not args.no_progress)
    if record is None:
        print(f"{args.work}: stopped at step {args.stop_after}; run the same command again to continue")
        return 0
    q = record["quality"]
    print(f"{args.model}: light decoder {record['config']['num_channels']} added; against the full decoder on "
          f"{q['held_out_exams']} held-out exams: PSNR {q['psnr_db']:.2f} dB, SSIM {q['ssim']:.4f}, "
          f"{q['full_decode_s'] / max(q['light_decode_s'], 1e-9):.1f}x faster; quality bar "
          f"{json.dumps(record['quality_bar'])} {'met' if record['meets_quality_bar'] else 'NOT met'}")
    return 0
