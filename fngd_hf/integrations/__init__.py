"""The optimizers in Hugging Face's training loops: ``FNGDTrainer`` and its arguments, a plain accelerate
loop (``attach_accelerator``), and each rank's statistics in checkpoints."""

from .accelerator import attach_accelerator
from .arguments import FNGDTrainingArguments
from .trainer import FNGDTrainer

__all__ = ["FNGDTrainer", "FNGDTrainingArguments", "attach_accelerator"]
