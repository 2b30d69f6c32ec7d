"""hieratok: multi-scale and hierarchical visual tokenizers, and the generators on their latents."""

__version__ = "0.1.0"

from .distributions import DiagonalGaussian  # noqa: E402
from .tokenizers import HieraTok, HieraTokConfig  # noqa: E402

__all__ = ["HieraTok", "HieraTokConfig", "DiagonalGaussian", "__version__"]
