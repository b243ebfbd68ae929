"""CCELLACore: the pure-Python core of CCELLA++ (no Qt, no Slicer, no GPU needed to import)."""

__version__ = "0.1.0"
