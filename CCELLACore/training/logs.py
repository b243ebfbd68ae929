"""Training logs: a CSV file always, TensorBoard when it is installed. Only the main process writes."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger"]

logger = logging.getLogger("CCELLACore")


class MetricsLogger:
    """Append rows of scalars to ``<dir>/metrics.csv`` (resumable: rows after ``resume_step`` are dropped first).

    Args:
        directory: the run's folder.
        enabled: False on ranks other than 0.
        resume_step: the step a resumed run restarts after; rows logged beyond it by the crashed run are removed so
            the CSV reads as one uninterrupted run.
    """

    def __init__(self, directory: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(directory) / "metrics.csv"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            with self.path.open(newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(float(r.get("step", 0))) <= resume_step]
            self._rewrite(rows)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:  # optional dependency
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(directory) / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard missing or broken: CSV only
            self._tb = None

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
        with self.path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def log(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        existing: list[dict[str, Any]] = []
        header: list[str] = []
        if self.path.exists():
            with self.path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
        if header and set(row) - set(header):
            # A new column: rewrite with the union of columns (rare: only when a metric first appears).
            with self.path.open(newline="", encoding="utf-8") as f:
                existing = list(csv.DictReader(f))
            self._rewrite(existing + [row])
        else:
            new = not header
            fields = header or list(row)
            with self.path.open("a", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=fields, restval="")
                if new:
                    writer.writeheader()
                writer.writerow(row)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
