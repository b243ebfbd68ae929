"""Helpers of the CCELLAPlusPlus Slicer module.

``scene`` (imported on demand, it needs ``slicer``) converts between CCELLACore exams and MRML nodes. This file
holds only what must work before any optional package is installed: reading ``Resources/requirements.txt`` and
finding which requirements are missing, without importing the packages (an import before an upgrade would pin the
old version in the running Slicer).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

__all__ = ["read_requirements", "missing_requirements", "protected_constraints"]

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements file, without comments, blank lines or pip options."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements that are not installed, or installed in a version outside the specifier.

    Versions come from ``importlib.metadata`` (nothing is imported). Without the ``packaging`` module the check
    falls back to "is it installed at all".
    """
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - Slicer and pip environments ship packaging
        Requirement = None

    missing = []
    for line in requirements:
        if Requirement is not None:
            requirement = Requirement(line)
            name, specifier = requirement.name, requirement.specifier
        else:  # pragma: no cover
            match = _NAME.match(line)
            name, specifier = (match.group(1) if match else line), None
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if specifier is not None and not specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def protected_constraints(packages: list[str]) -> list[str]:
    """pip constraint lines ``name==installed`` for the packages of ``packages`` that are installed.

    Given to ``pip install --constraint``, they keep pip from upgrading, downgrading or replacing what Slicer ships
    (numpy, scipy, SimpleITK, VTK) while it resolves the other requirements' dependencies. Packages that are not
    installed get no line (pip may not install them either way: they are not requirements).
    """
    lines = []
    for name in packages:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return lines
