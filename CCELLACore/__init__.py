"""CCELLACore: the pure-Python core of CCELLA++ (no Qt, no Slicer, no GPU needed to import).

Heavy parts (torch, MONAI, transformers) load on first use, so ``import CCELLACore`` and ``ccella --help`` are fast.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["CCELLAConfig", "load_config", "CCELLAPipeline", "__version__"]

_LAZY = {
    "CCELLAConfig": "CCELLACore.settings",
    "load_config": "CCELLACore.settings",
    "CCELLAPipeline": "CCELLACore.pipelines.generation",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'CCELLACore' has no attribute {name!r}")
