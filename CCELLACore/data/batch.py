"""Reporting for batch jobs (import, preprocess, synthesize): every skipped case with its reason, none silently."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json

__all__ = ["SkippedCase", "BatchSummary"]

logger = logging.getLogger("CCELLACore")


@dataclass(frozen=True)
class SkippedCase:
    """A case a batch job could not use, and why (the reason names the file where there is one)."""

    case_id: str
    reason: str


@dataclass
class BatchSummary:
    """What a batch job did: counts, the cases it skipped and free-form details; written as JSON."""

    job: str
    done: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)  # finished by an earlier run (resume)
    skipped: list[SkippedCase] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def skip(self, case_id: str, reason: str) -> None:
        # Case ids and file names only: never report text (privacy).
        logger.warning("skipped case %s: %s", case_id, reason)
        self.skipped.append(SkippedCase(case_id, reason))

    def extend(self, problems: list[SkippedCase]) -> None:
        for p in problems:
            self.skip(p.case_id, p.reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "n_done": len(self.done),
            "n_reused": len(self.reused),
            "n_skipped": len(self.skipped),
            "skipped": [asdict(s) for s in self.skipped],
            **self.details,
        }

    def write(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    def __str__(self) -> str:
        text = f"{self.job}: {len(self.done)} done, {len(self.reused)} already done, {len(self.skipped)} skipped"
        return text + "".join(f"\n  skipped {s.case_id}: {s.reason}" for s in self.skipped)
