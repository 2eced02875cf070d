"""fngd_hf: inverse-free fast natural gradient descent for Hugging Face Transformers."""

from .cwngd import CWNGD
from .fngd import FNGD
from .integrations import FNGDTrainer, FNGDTrainingArguments, attach_accelerator
from .kfac import KFAC
from .layers import select_modules
from .sngd import SNGD

__all__ = ["CWNGD", "FNGD", "KFAC", "SNGD", "FNGDTrainer", "FNGDTrainingArguments",
           "attach_accelerator", "select_modules"]
__version__ = "0.1.0"
