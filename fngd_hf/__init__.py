"""fngd_hf: inverse-free fast natural gradient descent for Hugging Face Transformers."""

from .accelerator import attach_accelerator
from .layers import select_modules
from .cwngd import CWNGD
from .kfac import KFAC
from .optimizer import FNGD
from .sngd import SNGD
from .trainer import FNGDTrainer, FNGDTrainingArguments

__all__ = ["CWNGD", "FNGD", "KFAC", "SNGD", "FNGDTrainer", "FNGDTrainingArguments",
           "attach_accelerator", "select_modules"]
__version__ = "0.1.0"
