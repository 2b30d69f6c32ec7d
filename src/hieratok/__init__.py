"""hieratok: multi-scale and hierarchical visual tokenizers, and the generators on their latents."""

from .distributions import DiagonalGaussian
from .tokenizers import HieraTok, HieraTokConfig
from .version import __version__

__all__ = ["HieraTok", "HieraTokConfig", "DiagonalGaussian", "__version__"]
