"""Exceptions raised by CCELLACore.

Every error names what the user can act on: the file, the case or the config key.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CCELLAError", "ConfigError", "VolumeError", "ManifestError", "DataError"]


class CCELLAError(Exception):
    """Base class of every error CCELLACore raises on purpose."""


class ConfigError(CCELLAError):
    """A config file is missing, malformed, or has an unknown key or a value of the wrong type."""

    def __init__(self, message: str, *, file: str | Path | None = None, key: str | None = None):
        self.file = None if file is None else str(file)
        self.key = key
        where = []
        if key:
            where.append(f"key '{key}'")
        if file:
            where.append(f"in {file}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class VolumeError(CCELLAError):
    """An image file cannot be read or written, or its content is unusable (not 3D, NaN/Inf voxels, ...)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ManifestError(CCELLAError):
    """A manifest (or an importer's source table) is malformed as a whole: unknown column, unreadable file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class DataError(CCELLAError):
    """One case cannot be used; names the case so that a batch can report it and go on."""

    def __init__(self, case_id: str, reason: str):
        self.case_id = case_id
        self.reason = reason
        super().__init__(f"case {case_id}: {reason}")
