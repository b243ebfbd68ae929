"""``ccella train-ldm``: see :mod:`CCELLACore.training.ldm` for what it does and how to run it on several GPUs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo", help="tiny, demo, paper or a YAML file (default demo)")
    parser.add_argument("--manifest", type=Path, required=True,
                        help="manifest written by `ccella preprocess --target ldm`")
    parser.add_argument("--autoencoder", type=Path, required=True,
                        help="autoencoder model directory (`ccella train-autoencoder` output)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (caches, checkpoints, metrics, model)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimiser steps in all (resume later with a larger value)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..settings import load_config
    from .ldm import train_ldm

    config = load_config(args.config)
    model_dir = train_ldm(config, args.manifest, args.autoencoder, args.out, device=args.device,
                          max_steps=args.max_steps, progress=not args.no_progress)
    print(f"model written to {model_dir}")
    return 0
