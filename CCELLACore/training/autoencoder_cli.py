"""``ccella train-autoencoder``: train (or fine-tune) the MAISI-architecture autoencoder on preprocessed exams.

Usage:
    ccella train-autoencoder --config demo --manifest prep/manifest.csv --out runs/ae
    ccella train-autoencoder --config tiny --manifest prep/manifest.csv --out runs/ae --max-steps 20 --device cpu
    torchrun --standalone --nproc_per_node=4 Training/train_autoencoder.py --config paper --manifest ... --out ...

Writes ``<out>/checkpoints/`` (a re-run of the same command resumes exactly), ``<out>/metrics.csv`` and the model
directory ``<out>/model`` (component ``autoencoder``), which ``ccella train-ldm --autoencoder <out>/model`` takes.
To fine-tune NVIDIA's MAISI weights, set ``autoencoder.weights_path`` (the architecture must match). To fine-tune only
the decoder of a trained model, keeping its latents (then ``ccella replace-decoder`` puts it into a generator)::

    ccella train-autoencoder --config demo --manifest prep/manifest.csv --out runs/decoder --max-steps 1000 \
        --set autoencoder.weights_path=runs/ae/model/autoencoder.safetensors --set train_autoencoder.train_encoder=false
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import positive_int

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="paper", help="paper, tiny, demo or a path to a YAML config")
    parser.add_argument("--manifest", required=True, type=Path,
                        help="manifest written by `ccella preprocess --target ldm`")
    parser.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, metrics.csv, model/)")
    parser.add_argument("--max-steps", type=positive_int, help="optimiser steps (default: the config's)")
    parser.add_argument("--stop-after", type=positive_int,
                        help="stop after this step with a checkpoint (train a long schedule in pieces)")
    parser.add_argument("--institution", help="train on this institution's rows of the manifest only")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train_autoencoder.lr=3e-4 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..settings import load_config
    from .autoencoder import train_autoencoder

    from .distributed import print_run_end

    config = load_config(args.config, args.set)
    model_dir = train_autoencoder(config, args.manifest, args.out, device=args.device, max_steps=args.max_steps,
                                  stop_after=args.stop_after, progress=not args.no_progress,
                                  institution=args.institution)
    print_run_end(model_dir, args.out)
    return 0
