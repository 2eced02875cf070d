"""fngd_hf: inverse-free fast natural gradient descent for Hugging Face Transformers."""

from .layers import select_modules
from .cwngd import CWNGD
from .optimizer import FNGD

__all__ = ["CWNGD", "FNGD", "select_modules"]
__version__ = "0.1.0"
