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
                        help="total optimiser steps of the run (overrides the config; sets the LR schedule)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop with a checkpoint at this step; the same command without it resumes")
    parser.add_argument("--init", type=Path, default=None,
                        help="model directory to start from (fine-tuning; its U-Net may take fewer inputs)")
    parser.add_argument("--init-new-autoencoder", action="store_true",
                        help="--init's model was trained on another autoencoder, e.g. one whose encoder --autoencoder "
                             "fine-tuned: allowed, with the latent scale factors computed afresh")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train_ldm.lr=2e-4 (repeatable)")
    parser.add_argument("--institution", help="train on this institution's rows of the manifest only")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..settings import load_config
    from .ldm import train_ldm

    config = load_config(args.config, args.set)
    model_dir = train_ldm(config, args.manifest, args.autoencoder, args.out, device=args.device,
                          max_steps=args.max_steps, stop_after=args.stop_after, progress=not args.no_progress,
                          init=args.init, institution=args.institution,
                          init_new_autoencoder=args.init_new_autoencoder)
    print(f"model written to {model_dir}" if model_dir else f"stopped; checkpoint in {args.out / 'checkpoints'}")
    return 0
