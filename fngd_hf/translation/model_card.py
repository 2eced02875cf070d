"""Hub-style ``README.md`` model card for a Multi30K translation model.

The YAML header (language, tags, datasets, metrics, model-index) is what the Hub indexes; the
text states what was really evaluated (split, sentences, beams), where the data came from, the
outcome of the shuffled-source check and the optimizer settings that were really used, all taken
from values the caller fills from the live run, so the card cannot drift from the training code.
A card never holds a local absolute path: :func:`build_model_card` refuses one.
"""

from __future__ import annotations

import re
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
FAILED_CHECK_TAG = "failed-source-check"
# dataset_type of the model-index when the data came from local files rather than a Hub dataset.
LOCAL_DATASET_TYPE = "multi30k"
# An example sentence per source language for the usage snippet (English otherwise).
EXAMPLES = {
    "en": ["A dog runs on the beach.", "Two men are playing football in a park."],
    "de": ["Ein Hund läuft am Strand.", "Zwei Männer spielen Fußball in einem Park."],
    "fr": ["Un chien court sur la plage.", "Deux hommes jouent au football dans un parc."],
    "cs": ["Pes běží po pláži.", "Dva muži hrají fotbal v parku."],
}
# A POSIX path from the root or home, or a Windows drive path (URLs' "//host/..." do not match).
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(?:~?/(?:[\w.@+-]+/)+[\w.@+-]*|[A-Za-z]:\\)")


def absolute_paths(text: str) -> list[str]:
    """Local absolute paths in ``text`` (a card must not leak where a run happened)."""
    return ABSOLUTE_PATH.findall(text)


def check_results(results: Mapping[str, Mapping[str, float]], evaluated: Mapping[str, Mapping[str, int]]) -> None:
    """results: split -> {"bleu": x, "chrf": y}; evaluated: split -> {"sentences", "total", "num_beams"}."""
    for split, scores in results.items():
        if not scores or not set(scores) <= set(METRIC_NAMES):
            raise ValueError(f"results[{split!r}] must have keys from {sorted(METRIC_NAMES)}, got {sorted(scores or {})}")
        for name, value in scores.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"results[{split!r}][{name!r}] must be a number, got {value!r}")
        if split not in evaluated:
            raise ValueError(f"evaluated[{split!r}] is missing: say how many sentences and beams gave its scores")
    for split, info in evaluated.items():
        check_evaluated(split, info)


def check_evaluated(split: str, info: Mapping[str, int]) -> None:
    missing = {"sentences", "total", "num_beams"} - set(info)
    if missing:
        raise ValueError(f"evaluated[{split!r}] lacks {sorted(missing)}")
    if not 0 < info["sentences"] <= info["total"] or info["num_beams"] < 1:
        raise ValueError(f"evaluated[{split!r}] = {dict(info)} is not 0 < sentences <= total with num_beams >= 1")


def is_subset(info: Mapping[str, int]) -> bool:
    return info["sentences"] < info["total"]


def split_label(split: str, info: Mapping[str, int]) -> str:
    """The split as the model-index names it: ``test_2016_flickr`` or ``test_2016_flickr[:500]`` for the first 500."""
    return f"{split}[:{info['sentences']}]" if is_subset(info) else split


def sentences_text(info: Mapping[str, int]) -> str:
    if is_subset(info):
        return f"first {info['sentences']:,} of {info['total']:,}"
    return f"all {info['total']:,}"


def data_source_text(dataset_id: str | None) -> str:
    if dataset_id:
        return f"the Hub dataset [`{dataset_id}`](https://huggingface.co/datasets/{dataset_id})"
    return "local files (the official raw release of Multi30K Task 1)"


def eval_results(
    results: Mapping[str, Mapping[str, float]],
    evaluated: Mapping[str, Mapping[str, int]],
    dataset_id: str | None,
    source_lang: str,
    target_lang: str,
) -> list[EvalResult]:
    """One model-index entry per (test split, metric); a subset is named as one (``split[:n]``)."""
    entries = []
    for split, scores in results.items():
        info = evaluated[split]
        name = f"Multi30K {split}" + (f" (first {info['sentences']} of {info['total']} sentences)" if is_subset(info) else "")
        if not dataset_id:
            name += ", local files"
        for metric, value in scores.items():
            entries.append(EvalResult(
                task_type="translation",
                task_name=f"Translation {source_lang}-{target_lang}",
                dataset_type=dataset_id or LOCAL_DATASET_TYPE,
                dataset_name=name,
                dataset_split=split_label(split, info),
                dataset_args={"source_lang": source_lang, "target_lang": target_lang},
                metric_type=metric,
                metric_name=f"{METRIC_NAMES[metric]} ({info['num_beams']} beam{'s' if info['num_beams'] > 1 else ''})",
                metric_value=round(float(value), 2),
            ))
    return entries


def cell(value: object) -> str:
    """A table cell: numbers compact, lists comma-separated, ``|`` escaped."""
    if isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, int):
        text = f"{value:,}" if abs(value) >= 10_000 else str(value)
    elif isinstance(value, (list, tuple)):
        text = ", ".join(cell(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def settings_table(settings: Mapping[str, object], header: tuple[str, str] = ("setting", "value")) -> str:
    """Two-column Markdown table; a value that is itself a mapping is refused (per-group dumps are unreadable)."""
    rows = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    for key, value in settings.items():
        if isinstance(value, Mapping):
            raise ValueError(f"setting {key!r} is a mapping; give one readable value per row")
        rows.append(f"| {cell(key)} | {cell(value)} |")
    return "\n".join(rows)


def results_table(results: Mapping[str, Mapping[str, float]], evaluated: Mapping[str, Mapping[str, int]]) -> str:
    """Markdown table: one row per test split, with the sentences and beams that gave its scores."""
    rows = ["| test split | sentences scored | beams | BLEU | chrF |", "| --- | --- | ---: | ---: | ---: |"]
    for split, scores in results.items():
        info = evaluated[split]
        cells = [f"{scores[m]:.2f}" if m in scores else "-" for m in ("bleu", "chrf")]
        rows.append(f"| {split} | {sentences_text(info)} | {info['num_beams']} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def source_check_text(source_check: Mapping[str, object] | None) -> str:
    """One paragraph on the shuffled-source check (``ran``, ``passed``, ``source_gap``, ``min_gap``)."""
    if not source_check or not source_check.get("ran"):
        return "The shuffled-source check was not run at the end of training (no final validation)."
    gap, min_gap = float(source_check["source_gap"]), float(source_check["min_gap"])
    what = (
        f"The validation loss with each target paired with another sentence's source was {gap:.3g} nats/token "
        f"above the loss with the real sources (threshold {min_gap:g})"
    )
    if source_check.get("passed"):
        return f"Shuffled-source check: **passed**. {what}: the model uses its source sentence."
    return (
        f"Shuffled-source check: **failed**. {what}: the model ignores its source sentence and produces "
        "target-language text that does not translate the input."
    )


def usage_text(model_name: str, source_lang: str, with_pipeline: bool) -> list[str]:
    examples = EXAMPLES.get(source_lang, EXAMPLES["en"])
    sections = [
        "## Usage",
        "With transformers alone (nothing else to install):",
        "```python\n"
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{model_name}")\n'
        f'model = AutoModelForSeq2SeqLM.from_pretrained("{model_name}")\n'
        f"batch = tokenizer({examples!r}, return_tensors=\"pt\", padding=True)\n"
        "print(tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True))\n"
        "```",
        "`generate()` uses the beam search and length limit saved in `generation_config.json`.",
    ]
    if with_pipeline:
        sections += [
            "Transformers 5 has no built-in `translation` pipeline; this repository ships one "
            "(`translation_pipeline.py`, named in `config.json`), which runs only if you allow its code:",
            "```python\n"
            "from transformers import pipeline\n\n"
            f'translator = pipeline(model="{model_name}", trust_remote_code=True)\n'
            f"print(translator({examples!r}))  # [{{'translation_text': ...}}, ...]\n"
            "```",
        ]
    return sections


def card_text(
    model_name: str,
    source_lang: str,
    target_lang: str,
    dataset_id: str | None,
    results: Mapping[str, Mapping[str, float]],
    evaluated: Mapping[str, Mapping[str, int]],
    optimizer_settings: Mapping[str, object],
    model_settings: Mapping[str, object] | None,
    training_settings: Mapping[str, object] | None,
    metric_signatures: Mapping[str, str] | None,
    validation: Mapping[str, object] | None,
    source_check: Mapping[str, object] | None,
    with_pipeline: bool,
) -> str:
    """The Markdown body of the card."""
    optimizer = str(optimizer_settings["optimizer"])
    optimizer_label = OPTIMIZER_NAMES.get(optimizer.lower(), optimizer)
    failed = bool(source_check and source_check.get("ran") and source_check.get("passed") is False)
    sections = [f"# {model_name}"]
    if failed:
        sections.append(
            "> **Warning: this checkpoint failed the shuffled-source check.** It ignores its source sentence "
            "(it collapsed into a target-side language model), so it is not a usable translation model. "
            "See *Evaluation*."
        )
    sections.append(
        f"A Transformer encoder-decoder (MarianMT architecture) trained from scratch on Multi30K "
        f"(Task 1) to translate {source_lang} → {target_lang}, with a joint BPE vocabulary trained on the "
        f"training split. It was trained with the **{optimizer_label}** optimizer. "
        f"Data: {data_source_text(dataset_id)}."
    )
    sections += usage_text(model_name, source_lang, with_pipeline)
    sections.append("## Evaluation")
    if results:
        sections.append(
            "Scores from the end of the training run: beam-search translations of each test split, detokenized and "
            "scored with sacreBLEU against the raw (untokenized, cased) references. Only the sentences listed were "
            "scored; a row that says *first n of m* is a subset and not comparable with scores on the whole split."
        )
        sections.append(results_table(results, evaluated))
    else:
        sections.append("No test split was scored for this model (the run had no test split or skipped it).")
    if validation:
        check_evaluated("validation", validation)
        parts = [f"{name} {float(validation[key]):.2f}" for key, name in (("loss", "loss"), ("bleu", "BLEU"), ("chrf", "chrF"))
                 if validation.get(key) is not None]
        sections.append(
            f"Validation (`val`, {sentences_text(validation)} sentences, {validation['num_beams']} "
            f"beam{'s' if validation['num_beams'] > 1 else ''}): {', '.join(parts)}."
        )
    sections.append(source_check_text(source_check))
    if metric_signatures:
        sections.append("\n".join(f"- {METRIC_NAMES.get(k, k)} signature: `{v}`" for k, v in metric_signatures.items()))
    shown = {"optimizer": optimizer_label, **{k: v for k, v in optimizer_settings.items() if k != "optimizer"}}
    sections += ["## Optimizer", f"Optimizer used: **{optimizer_label}**.", settings_table(shown)]
    if training_settings:
        sections += ["## Training", settings_table(training_settings)]
    if model_settings:
        sections += ["## Model", settings_table(model_settings)]
    sections += [
        "## Data and terms",
        "Multi30K (Elliott et al., 2016; 2017; Barrault et al., 2018). The data is partly derived from "
        "Flickr30K and is provided for non-commercial research and educational use; please cite the "
        "Multi30K papers. This model inherits those terms.",
    ]
    return "\n\n".join(sections) + "\n"


def build_model_card(
    *,
    model_name: str,
    source_lang: str,
    target_lang: str,
    results: Mapping[str, Mapping[str, float]],
    optimizer_settings: Mapping[str, object],
    evaluated: Mapping[str, Mapping[str, int]] | None = None,
    dataset_id: str | None = None,
    model_settings: Mapping[str, object] | None = None,
    training_settings: Mapping[str, object] | None = None,
    metric_signatures: Mapping[str, str] | None = None,
    validation: Mapping[str, object] | None = None,
    source_check: Mapping[str, object] | None = None,
    with_pipeline: bool = False,
    license: str | None = None,
    extra_tags: list[str] | None = None,
) -> ModelCard:
    """A ModelCard (YAML metadata + text).

    ``optimizer_settings`` must contain ``optimizer`` (the name actually used); its other entries
    are rows of a two-column table. ``evaluated[split]`` = ``{"sentences", "total", "num_beams"}``
    for every split in ``results``. ``dataset_id`` is the Hub dataset the data came from, ``None``
    for local files. ``validation`` = ``{"sentences", "total", "num_beams", "loss", "bleu", "chrf"}``;
    ``source_check`` = ``{"ran", "passed", "source_gap", "min_gap"}``. ``with_pipeline``: the folder
    ships ``translation_pipeline.py`` (:func:`fngd_hf.translation.pipeline.save_translation_pipeline`).
    """
    if "optimizer" not in optimizer_settings:
        raise ValueError("optimizer_settings must contain the key 'optimizer' (the optimizer actually used)")
    evaluated = dict(evaluated or {})
    check_results(results, evaluated)
    optimizer = str(optimizer_settings["optimizer"]).lower()
    failed = bool(source_check and source_check.get("ran") and source_check.get("passed") is False)
    tags = list(dict.fromkeys(BASE_TAGS + [optimizer] + ([FAILED_CHECK_TAG] if failed else []) + list(extra_tags or [])))
    data = ModelCardData(
        language=[source_lang, target_lang],
        license=license,
        library_name="transformers",
        pipeline_tag="translation",
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        metrics=sorted({m for scores in results.values() for m in scores}) or None,
        model_name=model_name,
        eval_results=eval_results(results, evaluated, dataset_id, source_lang, target_lang) or None,
    )
    body = card_text(
        model_name, source_lang, target_lang, dataset_id, results, evaluated, optimizer_settings,
        model_settings, training_settings, metric_signatures, validation, source_check, with_pipeline,
    )
    text = f"---\n{data.to_yaml()}\n---\n\n{body}"
    leaked = absolute_paths(text)
    if leaked:
        raise ValueError(f"the model card would contain local absolute paths {leaked}; pass names, not paths")
    return ModelCard(text)


def write_model_card(output_dir: str | Path, **kwargs) -> Path:
    """Build the card (see ``build_model_card``) and save it as ``output_dir/README.md``."""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_model_card(**kwargs).save(path)
    return path
