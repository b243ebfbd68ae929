"""``ccella train-classifier``: train the csPCa classifier (3D EfficientNet-B0) from scratch or fine-tune one.

Usage:
    ccella train-classifier --config paper --manifest inst1.csv --out runs/cls_inst1 --institution 1
    ccella train-classifier --config paper --manifest inst2.csv --out runs/cls_ft --init runs/cls_inst1/model \\
        --sequences AxT2 HighB ADC
    torchrun --standalone --nproc_per_node=4 Training/train_classifier.py --config paper --manifest ... --out ...

Writes ``<out>/cache/`` (exams on the classifier grid), ``<out>/checkpoints/`` (a re-run of the same command resumes
exactly), ``<out>/metrics.csv`` and the model directory ``<out>/model`` (best validation AP), which
``ccella classify --model`` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import positive_int
from ..data.study import SEQUENCES

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="paper",
                        help="classifier config: paper, demo, tiny (configs/classifier_<name>.yaml) or a YAML path")
    parser.add_argument("--manifest", required=True, type=Path,
                        help="manifest of labelled exams (any geometry; real or synthetic) with train/val splits")
    parser.add_argument("--out", required=True, type=Path, help="run folder (cache, checkpoints, metrics.csv, model/)")
    parser.add_argument("--init", type=Path, help="classifier model directory to fine-tune (lr and epochs: finetune_*)")
    parser.add_argument("--institution", help="use only this institution's rows (training and validation)")
    parser.add_argument("--sequences", nargs="+", choices=SEQUENCES,
                        help="input channels: AxT2 (1 channel) or AxT2 HighB ADC (default: the config's)")
    parser.add_argument("--val-manifest", type=Path, help="validate on this manifest's val rows instead")
    parser.add_argument("--cache", type=Path, help="prepared-exam cache (default <out>/cache; runs may share one)")
    parser.add_argument("--epochs", type=positive_int, help="epochs (default: the config's epochs / finetune_epochs)")
    parser.add_argument("--stop-after-epoch", type=positive_int,
                        help="stop after this epoch with a checkpoint (train a long schedule in pieces)")
    parser.add_argument("--name", help="the model's name (default: the --out folder's name)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..training.distributed import print_run_end
    from .config import load_classifier_config
    from .train import train_classifier

    config = load_classifier_config(args.config)
    model_dir = train_classifier(config, args.manifest, args.out, init=args.init, institution=args.institution,
                                 sequences=args.sequences, val_manifest=args.val_manifest, cache_dir=args.cache,
                                 epochs=args.epochs, stop_after_epoch=args.stop_after_epoch, device=args.device,
                                 name=args.name, progress=not args.no_progress)
    print_run_end(model_dir, args.out)
    return 0
