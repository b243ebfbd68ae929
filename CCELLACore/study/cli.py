"""``ccella domain-adaptation``: the domain-adaptation study (pretrain on Institution 1 real or synthetic exams,
fine-tune on fractions of Institution 2, compare with training from scratch), resumable.

Example::

    ccella domain-adaptation --config tiny --out runs/study_tiny

``--config`` is a shipped study config (``tiny``, ``demo``: ``CCELLACore/configs/study_<name>.yaml``) or a YAML path.
Run the same command again after a crash: finished cells are skipped, the unfinished run resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

__all__ = ["add_arguments", "run"]

logger = logging.getLogger("CCELLACore")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import positive_int

    parser.add_argument("--config", required=True, help="study config: tiny, demo (configs/study_<name>.yaml) or a YAML path")
    parser.add_argument("--out", type=Path, required=True, help="study folder (data, runs, cells, table, figures)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    parser.add_argument("--stop-after-cells", type=positive_int, default=None,
                        help="stop after this many cells (run again to continue)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from .config import load_study_config
    from .runner import run_study

    config = load_study_config(args.config)
    summary = run_study(config, args.out, device=args.device, progress=not args.no_progress,
                        stop_after_cells=args.stop_after_cells)
    if summary.get("complete"):
        print(f"{args.out}: {summary['cells']} cells; table {args.out / 'table.md'}, statistics "
              f"{args.out / 'statistics.md'}, figures {', '.join(summary['figures'])}")
    return 0
