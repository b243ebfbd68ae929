"""The progress protocol between a job's child process and its parent: one JSON object per stdout line.

Every protocol line carries ``"ccella": 1`` so that anything else a library prints (warnings, tracebacks) is told
apart and kept as a plain log line. Events::

    {"ccella": 1, "event": "stage",    "stage": "load_model", "label": "Loading the model", "elapsed": 0.1}
    {"ccella": 1, "event": "progress", "stage": "sample", "step": 3, "total": 30, "elapsed": 4.2, "eta": 37.8}
    {"ccella": 1, "event": "log",      "message": "CUDA: 2.1 GiB free, running on the CPU"}
    {"ccella": 1, "event": "result",   "out_dir": "...", "files": {...}, ...}
    {"ccella": 1, "event": "error",    "kind": "gpu_memory", "message": "...", "hint": "..."}

``elapsed`` is seconds since the job started; ``eta`` is seconds left in the current stage, from the mean time per
step so far. Messages never contain report text (the report travels in a file, never in argv or on stdout).

Standard library only: the parent imports this before torch or any other optional package is installed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["PROTOCOL_KEY", "PROTOCOL_VERSION", "STAGES", "ERROR_KINDS", "Event", "parse_line", "ProgressWriter"]

PROTOCOL_KEY = "ccella"
PROTOCOL_VERSION = 1

#: Stage name -> the label a GUI shows, in the order a generation goes through them.
STAGES: dict[str, str] = {
    "check_device": "Checking the device",
    "load_model": "Loading the model",
    "encode_report": "Encoding the report",
    "sample": "Sampling",
    "decode": "Decoding AxT2, HighB and ADC",
    "write": "Writing the files",
}

#: Error kinds a parent can act on: ``gpu_memory`` and ``no_cuda`` -> offer the CPU; ``input`` -> fix a setting;
#: ``internal`` -> a bug (the log holds the traceback).
ERROR_KINDS = ("gpu_memory", "no_cuda", "input", "internal")

_EVENTS = ("stage", "progress", "log", "result", "error")


@dataclass(frozen=True)
class Event:
    """One parsed line.

    Attributes:
        kind: ``stage``, ``progress``, ``log``, ``result`` or ``error``; a line that is not a protocol line is a
            ``log`` event with ``protocol=False``.
        data: the JSON object (for plain lines: ``{"message": line}``).
        protocol: whether the line was a protocol line.
    """

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    protocol: bool = True

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def message(self) -> str:
        return str(self.data.get("message", ""))


def parse_line(line: str) -> Event:
    """Parse one line of child output. Never raises: whatever is not a valid protocol line is a plain log line."""
    text = line.rstrip("\r\n")
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get(PROTOCOL_KEY) == PROTOCOL_VERSION and obj.get("event") in _EVENTS:
            data = {k: v for k, v in obj.items() if k not in (PROTOCOL_KEY, "event")}
            return Event(obj["event"], data)
    return Event("log", {"message": text}, protocol=False)


class ProgressWriter:
    """Child side: writes protocol lines to ``stream`` (default: stdout), flushed one by one.

    Args:
        stream: where to write; the parent reads the child's stdout.
        clock: seconds, monotonic (tests pass a fake clock to check the ETA arithmetic).
    """

    def __init__(self, stream: TextIO | None = None, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock
        self.start = clock()
        self._stage_start = self.start
        self._stage = ""

    def _write(self, event: str, **data: Any) -> None:
        line = json.dumps({PROTOCOL_KEY: PROTOCOL_VERSION, "event": event, **data}, ensure_ascii=True)
        self.stream.write(line + "\n")
        self.stream.flush()

    def elapsed(self) -> float:
        return round(self.clock() - self.start, 3)

    def stage(self, name: str, label: str | None = None) -> None:
        """Enter a stage (see :data:`STAGES`); ``label`` defaults to the stage's own label."""
        self._stage, self._stage_start = name, self.clock()
        self._write("stage", stage=name, label=label or STAGES.get(name, name), elapsed=self.elapsed())

    def progress(self, step: int, total: int) -> None:
        """``step`` of ``total`` done in the current stage; the ETA extrapolates the mean time per step."""
        spent = self.clock() - self._stage_start
        eta = spent / step * (total - step) if step > 0 else None
        self._write("progress", stage=self._stage, step=int(step), total=int(total), elapsed=self.elapsed(),
                    eta=None if eta is None else round(eta, 3))

    def log(self, message: str) -> None:
        self._write("log", message=message)

    def result(self, **data: Any) -> None:
        self._write("result", elapsed=self.elapsed(), **data)

    def error(self, message: str, kind: str = "internal", hint: str = "") -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"error kind must be one of {ERROR_KINDS}, got {kind!r}")
        self._write("error", kind=kind, message=message, hint=hint, elapsed=self.elapsed())
