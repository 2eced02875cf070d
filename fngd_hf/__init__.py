"""fngd_hf: inverse-free fast natural gradient descent for Hugging Face Transformers."""

from .layers import select_modules
from .optimizer import FNGD

__all__ = ["FNGD", "select_modules"]
__version__ = "0.1.0"
