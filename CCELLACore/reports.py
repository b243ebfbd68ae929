"""Radiology report rules, in one place: what counts as empty, the length limit, file decoding and hashing.

Reports are patient data. Nothing here logs or puts report text into an error message: errors name the source
(``--report``, a file name, a case id), the limit and positions only.

- Empty (``None``, ``""`` or whitespace only) means "no report": training uses it for the unconditional branch;
  ``generate`` refuses it and points to ``--unconditional`` (callers check :func:`is_empty_report`).
- More than :data:`REPORT_CHAR_LIMIT` characters is refused (:class:`ReportError` naming the limit and the source).
  Reports longer than the text encoder's token limit are truncated by the encoder, keeping the end (the impression).
- Non-ASCII text (µ, ≥, accents) is ordinary text; bytes that are not valid UTF-8 are an error naming the file and
  the byte position, and so is valid UTF-8 holding control characters (NUL, ESC, ...: binary data, not a report).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .errors import CCELLAError

__all__ = [
    "REPORT_CHAR_LIMIT",
    "ReportError",
    "is_empty_report",
    "check_report",
    "read_report_file",
    "report_hash",
]

#: Longest report accepted, in characters (about 10x a long prostate MRI report).
REPORT_CHAR_LIMIT = 20_000

# C0 controls other than tab, line feed, form feed and carriage return, and DEL: no typed report holds them.
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")

# A UTF-8 character takes at most 4 bytes: a file larger than this certainly exceeds the limit.
_MAX_REPORT_BYTES = 4 * REPORT_CHAR_LIMIT + 3  # + a byte-order mark


class ReportError(CCELLAError):
    """A report cannot be used (too long, not text, not UTF-8). The message never contains the report text."""


def is_empty_report(text: str | None) -> bool:
    """``True`` for ``None``, ``""`` and whitespace-only text: the exam has no report."""
    return text is None or not text.strip()


def check_report(text: str, *, source: str = "--report") -> str:
    """Validate one report and return it unchanged.

    Args:
        text: the report; empty reports are the caller's decision (see :func:`is_empty_report`).
        source: what to name in errors: ``"--report"``, a file name or ``"case <id>"``.

    Raises:
        ReportError: not a string, longer than :data:`REPORT_CHAR_LIMIT` characters, holding characters that
            cannot be written as UTF-8 (lone surrogates from a mis-decoded file) or control characters other than
            tab, line and page breaks.
    """
    if not isinstance(text, str):
        raise ReportError(f"{source}: a report must be text, got {type(text).__name__}")
    if len(text) > REPORT_CHAR_LIMIT:
        raise ReportError(
            f"{source}: report has {len(text)} characters, above the limit of {REPORT_CHAR_LIMIT} characters; "
            "shorten it (the findings and impression are what the model uses)"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ReportError(f"{source}: report has a character that is not valid Unicode at position {exc.start}") from None
    control = _CONTROL.search(text)
    if control:
        raise ReportError(f"{source}: report has the control character U+{ord(control.group()):04X} at position "
                          f"{control.start()}; a report must be plain text (binary data?)")
    return text


def read_report_file(path: str | Path) -> str:
    """Read a UTF-8 report file (a leading byte-order mark is dropped) and validate it with :func:`check_report`.

    Raises:
        ReportError: the file is missing, too large, or not valid UTF-8 (naming the byte position and line).
    """
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: report file not found")
    size = path.stat().st_size
    if size > _MAX_REPORT_BYTES:
        # Refuse before reading: whatever the encoding, this many bytes hold more characters than the limit.
        raise ReportError(
            f"{path}: report file is {size} bytes, more than the limit of {REPORT_CHAR_LIMIT} characters allows"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ReportError(
            f"{path}: not valid UTF-8 at byte {exc.start} (line {line}); save the report as UTF-8 text"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return check_report(text, source=str(path))


def report_hash(text: str) -> str:
    """First 16 hex digits of the SHA-256 of the UTF-8 report: identifies a report in records without revealing it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
