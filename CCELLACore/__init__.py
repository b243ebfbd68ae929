"""CCELLACore: the pure-Python core of CCELLA++ (no Qt, no Slicer, no GPU needed to import)."""

from .settings import CCELLAConfig, load_config

__version__ = "0.1.0"
__all__ = ["CCELLAConfig", "load_config", "__version__"]
