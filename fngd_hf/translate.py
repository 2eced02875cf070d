"""Translate with a saved model folder, and ``pipeline("translation")`` on transformers 5.

transformers 5 removed the ``translation`` pipeline task. Importing ``fngd_hf`` registers
:class:`TranslationPipeline` under that name when the installed transformers lacks it, so
``pipeline("translation", model=folder)`` works as it did on 4.x (same output format:
``[{"translation_text": ...}]``). :func:`translate` does the same without the pipeline machinery.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import transformers.pipelines
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY


def translation_pipeline_available() -> bool:
    """True when ``pipeline('translation')`` resolves: transformers 4.x, or after :func:`register_translation_pipeline`."""
    return "translation" in PIPELINE_REGISTRY.get_supported_tasks()


class TranslationPipeline(Pipeline):
    """Seq2seq translation: tokenize, ``generate`` with the model's generation config, decode.

    ``pipeline("translation", model=folder)(["A dog runs."])`` returns ``[{"translation_text": ...}]``;
    one string in gives a one-element list, as on transformers 4.x. Generation parameters
    (``num_beams=``, ``max_length=``, ...) go to ``generate``; ``max_source_length`` truncates the input.
    """

    _pipeline_calls_generate = True
    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def _sanitize_parameters(self, max_source_length: int | None = None, **generate_kwargs):
        if max_source_length is not None and max_source_length <= 0:
            raise ValueError(f"max_source_length must be positive, got {max_source_length}")
        return {"max_source_length": max_source_length}, {"generate_kwargs": generate_kwargs}, {}

    def __call__(self, inputs, **kwargs):
        if isinstance(inputs, str):
            return [super().__call__(inputs, **kwargs)[0]]
        if not (isinstance(inputs, Sequence) and all(isinstance(text, str) for text in inputs)):
            raise ValueError("TranslationPipeline takes a string or a list of strings")
        return [result[0] for result in super().__call__(list(inputs), **kwargs)]

    def preprocess(self, text: str, max_source_length: int | None = None):
        return self.tokenizer(
            text, return_tensors="pt", truncation=max_source_length is not None, max_length=max_source_length
        )

    def _forward(self, model_inputs, generate_kwargs=None):
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs or {})
        return {"output_ids": self.model.generate(**model_inputs, **generate_kwargs)}

    def postprocess(self, model_outputs):
        texts = self.tokenizer.batch_decode(model_outputs["output_ids"], skip_special_tokens=True)
        return [{"translation_text": text.strip()} for text in texts]


def register_translation_pipeline() -> None:
    """Make ``pipeline("translation")`` resolve to :class:`TranslationPipeline` if transformers has no such task.

    transformers 5 also lists the task in ``transformers.pipelines.REMOVED_TASKS`` so that
    ``pipeline()`` refuses it before looking at the registry; only that one entry is taken out.
    """
    if translation_pipeline_available():
        return
    PIPELINE_REGISTRY.register_pipeline(
        "translation", pipeline_class=TranslationPipeline, pt_model=AutoModelForSeq2SeqLM, type="text"
    )
    removed = getattr(transformers.pipelines, "REMOVED_TASKS", None)
    if isinstance(removed, dict):
        removed.pop("translation", None)


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


register_translation_pipeline()
