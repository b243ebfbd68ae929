"""Atomic file output: a file appears complete or not at all, so a crash never leaves half a result."""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_bytes", "atomic_write_json", "read_json", "default_mode",
           "remove_orphaned_temporaries", "Journal"]


def default_mode(directory: bool = False) -> int:
    """The permissions an ordinary open()/mkdir() would give under the current umask (mkstemp/mkdtemp give 0600/0700,
    which would make every output private to its writer)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    ``suffix`` keeps the extension for writers that choose a format by name (``.nii.gz``, ``.png``). The temporary
    name holds this machine's name and process id (``.tmp-<host>-<pid>-…``): a process killed mid-write (SIGKILL
    runs no clean-up) leaves it behind, and :func:`remove_orphaned_temporaries` can tell it from one being written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temporary_prefix()}{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _temporary_prefix() -> str:
    return ".tmp-" + re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] + "-"


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: keep its files
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphaned_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that :func:`atomic_path` left in ``folder`` (not below it) in a process of this
    machine that no longer runs (killed mid-write); those of live processes, and of other machines sharing the
    folder, are kept (on Windows all are kept). Returns the removed paths."""
    folder = Path(folder)
    prefix = _temporary_prefix()
    removed = []
    for tmp in folder.glob(f"{prefix}*") if folder.is_dir() else ():  # the prefix holds no glob characters
        pid = tmp.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and tmp.is_file():
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:  # another process cleaned it first
                pass
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file; errors name the file (and line) instead of a bare decoder message."""
    from .errors import CCELLAError

    path = Path(path)
    if not path.is_file():
        raise CCELLAError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CCELLAError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise CCELLAError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


class Journal:
    """An append-only JSON-lines file of finished work items, so that a long loop killed at any moment resumes.

    The first line holds ``key`` (what the items depend on: settings, model hash); a journal written under another
    key is started again, never mixed in. Each :meth:`append` writes one line and fsyncs it. A process killed
    mid-line leaves a truncated last line: reading stops before it and opening the journal cuts it off, so a partial
    item is never taken for a finished one.

    Example:
        >>> journal = Journal(out / "generated.jsonl", key={"seed": 8000})      # doctest: +SKIP
        >>> done = journal.items()            # items of an earlier, killed run  # doctest: +SKIP
        >>> journal.append({"case": 3, "found": True})                         # doctest: +SKIP
    """

    def __init__(self, path: str | Path, key: Any):
        self.path = Path(path)
        self.key = json.loads(json.dumps(key))  # as it reads back (tuples become lists)
        self._items, end, stale = self._read()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if stale:
            atomic_write_text(self.path, json.dumps({"journal_key": self.key}) + "\n")
        else:
            with open(self.path, "r+b") as handle:  # drop a truncated last line
                handle.truncate(end)
        self.stale = stale

    def _read(self) -> tuple[list[Any], int, bool]:
        if not self.path.is_file():
            return [], 0, True
        items, end = [], 0
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle):
                if not line.endswith(b"\n"):
                    break
                try:
                    value = json.loads(line)
                except ValueError:
                    break
                if number == 0:
                    if not isinstance(value, dict) or value.get("journal_key") != self.key:
                        return [], 0, True
                else:
                    items.append(value)
                end += len(line)
        return (items, end, False) if end else ([], 0, True)

    def items(self) -> list[Any]:
        """The items of earlier runs under the same key, in the order they were appended."""
        return list(self._items)

    def append(self, item: Any) -> None:
        line = (json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8")
        with open(self.path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._items.append(json.loads(line))
