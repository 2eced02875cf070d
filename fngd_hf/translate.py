"""Translate with a saved model folder.

transformers 5 removed ``pipeline("translation")``; this is the same thing in a few lines
(tokenize, ``generate`` with the saved generation config, decode), and works on 4.x too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer


def translation_pipeline_available() -> bool:
    """True on transformers versions that still ship ``pipeline('translation')``."""
    try:
        from transformers.pipelines import SUPPORTED_TASKS
    except ImportError:  # pragma: no cover - very old/new layouts
        return False
    return "translation" in SUPPORTED_TASKS


def load_translator(model_dir: str, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a folder written by ``save_pretrained`` (no network needed)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).to(device).eval()
    return model, tokenizer


@torch.no_grad()
def translate(
    model, tokenizer, texts: Sequence[str], batch_size: int = 32, max_source_length: int | None = None, **generate_kwargs
) -> list[str]:
    """Detokenized translations of ``texts``, in order."""
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not one string")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    outputs = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=max_source_length is not None,
            max_length=max_source_length,
        ).to(model.device)
        generated = model.generate(**batch, **generate_kwargs)
        outputs.extend(text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True))
    return outputs
