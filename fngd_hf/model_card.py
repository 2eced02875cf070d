"""Hub-style ``README.md`` model card for a Multi30K translation model.

The YAML header (language, tags, datasets, metrics, model-index) is what the Hub indexes; the
text states the optimizer and settings that were really used, taken from a dict the caller fills
from the live run, so the card cannot drift from the training code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

OPTIMIZER_NAMES = {
    "fngd": "FNGD (inverse-free fast natural gradient descent, fngd_hf)",
    "ngd": "NGD (natural gradient descent with per-step refreshed coefficients, fngd_hf)",
    "cwngd": "CW-NGD (component-wise natural gradient descent, fngd_hf)",
    "kfac": "K-FAC (Kronecker-factored natural gradient, fngd_hf)",
    "sngd": "SNGD (structured natural gradient with local Fisher layers, fngd_hf)",
    "shampoo": "Shampoo (pytorch-optimizer) with AdamW for the non-matrix parameters",
    "adamw": "AdamW",
    "sgd": "SGD",
}
METRIC_NAMES = {"bleu": "BLEU", "chrf": "chrF"}
BASE_TAGS = ["translation", "fngd", "multi30k", "marian", "seq2seq"]


def check_results(results: Mapping[str, Mapping[str, float]]) -> None:
    """results: split -> {"bleu": x, "chrf": y}; every value a number (empty: no test set was scored)."""
    for split, scores in results.items():
        if not scores or not set(scores) <= set(METRIC_NAMES):
            raise ValueError(f"results[{split!r}] must have keys from {sorted(METRIC_NAMES)}, got {sorted(scores or {})}")
        for name, value in scores.items():
            if not isinstance(value, (int, float)):
                raise ValueError(f"results[{split!r}][{name!r}] must be a number, got {value!r}")


def eval_results(
    results: Mapping[str, Mapping[str, float]], dataset_id: str, source_lang: str, target_lang: str
) -> list[EvalResult]:
    """One model-index entry per (test split, metric)."""
    return [
        EvalResult(
            task_type="translation",
            task_name=f"Translation {source_lang}-{target_lang}",
            dataset_type=dataset_id,
            dataset_name=f"Multi30K {split}",
            dataset_split=split,
            dataset_args={"source_lang": source_lang, "target_lang": target_lang},
            metric_type=metric,
            metric_name=METRIC_NAMES[metric],
            metric_value=round(float(value), 2),
        )
        for split, scores in results.items()
        for metric, value in scores.items()
    ]


def settings_table(settings: Mapping[str, object]) -> str:
    """Markdown table of settings; non-scalar values are shown as JSON."""
    rows = ["| setting | value |", "| --- | --- |"]
    for key, value in settings.items():
        shown = value if isinstance(value, (str, int, float, bool, type(None))) else json.dumps(value, default=str)
        rows.append(f"| `{key}` | `{shown}` |")
    return "\n".join(rows)


def results_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table: one row per test split."""
    rows = ["| test set | BLEU | chrF |", "| --- | ---: | ---: |"]
    for split, scores in results.items():
        cells = [f"{scores[m]:.2f}" if m in scores else "-" for m in ("bleu", "chrf")]
        rows.append(f"| {split} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def card_text(
    model_name: str,
    source_lang: str,
    target_lang: str,
    dataset_id: str,
    results: Mapping[str, Mapping[str, float]],
    optimizer_settings: Mapping[str, object],
    model_settings: Mapping[str, object] | None,
    training_settings: Mapping[str, object] | None,
    metric_signatures: Mapping[str, str] | None,
    data_source: str | None = None,
) -> str:
    """The Markdown body of the card."""
    optimizer = str(optimizer_settings["optimizer"])
    optimizer_label = OPTIMIZER_NAMES.get(optimizer.lower(), optimizer)
    sections = [
        f"# {model_name}",
        f"A Transformer encoder-decoder (MarianMT architecture) trained from scratch on Multi30K "
        f"(Task 1) to translate {source_lang} → {target_lang}, with a joint BPE vocabulary trained on the "
        f"training split. It was trained with the **{optimizer_label}** optimizer.",
        "## Results",
        "Beam-search translations scored with sacreBLEU against the raw (untokenized, cased) references."
        if results else "No test set was scored for this model (the training run had no test split or skipped it).",
    ]
    if results:
        sections.append(results_table(results))
    if metric_signatures:
        sections.append("\n".join(f"- {METRIC_NAMES.get(k, k)} signature: `{v}`" for k, v in metric_signatures.items()))
    sections += ["## Optimizer", f"Optimizer used: **{optimizer_label}**. Settings:", settings_table(optimizer_settings)]
    if training_settings:
        sections += ["## Training", settings_table(training_settings)]
    if model_settings:
        sections += ["## Model", settings_table(model_settings)]
    sections += [
        "## Usage",
        "```python\n"
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{model_name}")\n'
        f'model = AutoModelForSeq2SeqLM.from_pretrained("{model_name}")\n'
        'batch = tokenizer(["A dog runs on the beach."], return_tensors="pt")\n'
        "print(tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True))\n"
        "```",
        "## Data and terms",
        "Multi30K (Elliott et al., 2016; 2017; Barrault et al., 2018). The data is partly derived from "
        "Flickr30K and is provided for non-commercial research and educational use; please cite the "
        "Multi30K papers. This model inherits those terms.",
    ]
    if data_source:
        sections.insert(-1, f"Data used for this run: {data_source}.")
    return "\n\n".join(sections) + "\n"


def build_model_card(
    *,
    model_name: str,
    source_lang: str,
    target_lang: str,
    results: Mapping[str, Mapping[str, float]],
    optimizer_settings: Mapping[str, object],
    dataset_id: str = "bentrevett/multi30k",
    model_settings: Mapping[str, object] | None = None,
    training_settings: Mapping[str, object] | None = None,
    metric_signatures: Mapping[str, str] | None = None,
    license: str | None = None,
    extra_tags: list[str] | None = None,
    data_source: str | None = None,
) -> ModelCard:
    """A ModelCard (YAML metadata + text); ``optimizer_settings`` must contain ``optimizer``."""
    if "optimizer" not in optimizer_settings:
        raise ValueError("optimizer_settings must contain the key 'optimizer' (the optimizer actually used)")
    check_results(results)
    optimizer = str(optimizer_settings["optimizer"]).lower()
    tags = list(dict.fromkeys(BASE_TAGS + [optimizer] + list(extra_tags or [])))
    data = ModelCardData(
        language=[source_lang, target_lang],
        license=license,
        library_name="transformers",
        pipeline_tag="translation",
        tags=tags,
        datasets=[dataset_id],
        metrics=sorted({m for scores in results.values() for m in scores}),
        model_name=model_name,
        eval_results=eval_results(results, dataset_id, source_lang, target_lang) or None,
    )
    body = card_text(
        model_name, source_lang, target_lang, dataset_id, results,
        optimizer_settings, model_settings, training_settings, metric_signatures, data_source,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(output_dir: str | Path, **kwargs) -> Path:
    """Build the card (see ``build_model_card``) and save it as ``output_dir/README.md``."""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_model_card(**kwargs).save(path)
    return path
