"""Translate with a saved model folder, and ``pipeline("translation")`` on transformers 5.

transformers 5 removed the ``translation`` pipeline task. Importing ``fngd_hf.translation.pipeline``
(not ``fngd_hf`` itself) registers :class:`TranslationPipeline` under that name when the installed
transformers lacks it, so ``pipeline("translation", model=folder)`` works as it did on 4.x (same
output format: ``[{"translation_text": ...}]``). :func:`translate` does the same without the
pipeline machinery.

A checkpoint can carry the pipeline itself, for users who never install fngd_hf:
:func:`save_translation_pipeline` copies this file into the folder and names it in
``config.json`` (``custom_pipelines``), so ``pipeline(model=folder, trust_remote_code=True)``
loads it. This file therefore imports nothing but torch and transformers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

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


# The file name and class a checkpoint's config.json points to (``custom_pipelines``). The task is not
# called "translation": a custom task of that name would shadow the registered one above, and
# pipeline("translation", model=folder) would then demand trust_remote_code even with fngd_hf installed.
PIPELINE_FILE = "translation_pipeline.py"
CUSTOM_TASK = "custom-translation"
CUSTOM_PIPELINES = {
    CUSTOM_TASK: {
        "impl": f"{Path(PIPELINE_FILE).stem}.{TranslationPipeline.__name__}",
        "pt": ["AutoModelForSeq2SeqLM"],
        "type": "text",
    }
}


def save_translation_pipeline(model_dir: str | Path) -> Path:
    """Ship :class:`TranslationPipeline` inside a saved model folder as a custom pipeline.

    Copies this module to ``model_dir/translation_pipeline.py`` and adds ``custom_pipelines`` to
    ``model_dir/config.json``; then ``pipeline(model=model_dir, trust_remote_code=True)`` works on
    transformers 5 without fngd_hf installed. Returns the path of the copied file.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model_dir} has no config.json: save the model there first")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["custom_pipelines"] = CUSTOM_PIPELINES
    target = model_dir / PIPELINE_FILE
    shutil.copyfile(Path(__file__), target)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return target


# Only an explicit ``import fngd_hf.translation.pipeline`` registers the task: the copy a checkpoint ships
# is loaded under another module name and must not change the global pipeline registry.
if __name__ == "fngd_hf.translation.pipeline":
    register_translation_pipeline()
