#!/usr/bin/env python
"""Multi30K translation with FNGD (or AdamW/SGD for comparison) on the Hugging Face Trainer.

    accelerate launch recipes/multi30k.py [config.json|config.yaml] [--flag value ...]

A config file gives defaults; command-line flags override it. Example:

    accelerate launch recipes/multi30k.py --output_dir out/m30k --data_dir shared/data/multi30k \\
        --preset small --optimizer fngd --num_train_epochs 10 --per_device_train_batch_size 64

Writes to output_dir: the final model in Hub layout (config.json, generation_config.json,
model.safetensors, tokenizer files, README.md model card), results.json, and one
predictions_<split>.<lang> file per test split.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import DataCollatorForSeq2Seq, HfArgumentParser, set_seed
from transformers.integrations import is_tensorboard_available
from transformers.trainer_utils import get_last_checkpoint

from fngd_hf.data import DEFAULT_DATASET_NAME, load_multi30k, test_split_names
from fngd_hf.evaluation import (
    decode_ids,
    make_compute_metrics,
    metric_signatures,
    score_translations,
)
from fngd_hf.model_card import write_model_card
from fngd_hf.models import build_model, resolve_shape
from fngd_hf.tokenization import load_tokenizer, train_tokenizer
from fngd_hf.trainer import DEFAULT_LEARNING_RATES
from fngd_hf.trainer import FNGDTrainer as RecipeTrainer, FNGDTrainingArguments as RecipeTrainingArguments

logger = logging.getLogger("multi30k")

@dataclass
class DataArguments:
    dataset_name: str = field(default=DEFAULT_DATASET_NAME, metadata={"help": "Hub dataset (used when no data_dir)"})
    data_dir: str | None = field(default=None, metadata={"help": "folder with raw train.en, val.de, test_2016_flickr.en, ..."})
    source_lang: str = "en"
    target_lang: str = "de"
    max_train_samples: int | None = None
    max_eval_samples: int | None = field(default=None, metadata={"help": "cap on validation examples"})
    max_predict_samples: int | None = field(default=None, metadata={"help": "cap on examples of each test split"})
    test_splits: list[str] | None = field(
        default=None, metadata={"help": "test splits to translate at the end (default: every one present)"}
    )
    max_source_length: int = 128
    max_target_length: int = 128
    vocab_size: int = field(default=8000, metadata={"help": "joint BPE vocabulary size (ignored with tokenizer_name)"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "existing tokenizer instead of training one"})


@dataclass
class ModelArguments:
    preset: str = field(default="small", metadata={"help": "paper | small | tiny"})
    d_model: int | None = None
    ffn_dim: int | None = None
    attention_heads: int | None = None
    encoder_layers: int | None = None
    decoder_layers: int | None = None
    dropout: float | None = None
    attention_dropout: float | None = None
    activation_dropout: float | None = None
    max_position_embeddings: int | None = None
    beam_size: int = field(default=4, metadata={"help": "beams for the final test-set translations"})
    max_generation_length: int = 128

    def overrides(self) -> dict:
        """Shape fields given on the command line (None = keep the preset's value)."""
        names = ("d_model", "ffn_dim", "attention_heads", "encoder_layers", "decoder_layers", "dropout",
                 "attention_dropout", "activation_dropout", "max_position_embeddings")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


# Recipe defaults (a config file and flags override them): evaluate/save once per epoch, with BLEU.
RECIPE_DEFAULTS = {
    "do_train": True,
    "do_eval": True,
    "do_predict": True,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "predict_with_generate": True,
    "logging_steps": 50,
    "report_to": ["tensorboard"] if is_tensorboard_available() else ["none"],
}


def load_config_file(path: str) -> dict:
    """A JSON or YAML mapping of argument name -> value."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        config = json.loads(text)
    else:
        import yaml

        config = yaml.safe_load(text)
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values")
    return config


def parse_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, training arguments) from [config file] + flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeTrainingArguments))
    defaults = dict(RECIPE_DEFAULTS)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        config = load_config_file(argv.pop(0))
        known = {action.dest for action in parser._actions}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown keys in config file: {sorted(unknown)}")
        defaults.update(config)
    parser.set_defaults(**defaults)
    for action in parser._actions:  # a value from the config satisfies a required flag
        if action.dest in defaults:
            action.required = False
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if not training_args.output_dir:
        raise ValueError("--output_dir is required")
    given = "learning_rate" in defaults or any(a.split("=")[0] in ("--learning_rate", "--learning-rate") for a in argv)
    if not given:  # the Trainer's 5e-5 suits none of these methods: use the method's measured default
        training_args.learning_rate = DEFAULT_LEARNING_RATES[training_args.optimizer]
    return model_args, data_args, training_args


def setup_logging(training_args) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Our own numbers are logged on the main process; transformers keeps its own (passive) level.
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


def find_checkpoint(training_args) -> str | None:
    """Checkpoint to resume from: the explicit one, else the last in output_dir (if any)."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    output_dir = Path(training_args.output_dir)
    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def get_tokenizer(data_args, train_split, output_dir: str, checkpoint: str | None, is_local_main: bool):
    """Given tokenizer, else the one saved with the checkpoint (resume), else train one on train."""
    if data_args.tokenizer_name:
        return load_tokenizer(data_args.tokenizer_name)
    if checkpoint and (Path(checkpoint) / "tokenizer_config.json").is_file():
        return load_tokenizer(checkpoint)
    if not is_local_main:  # the local main process trained and saved it first (main_process_first)
        return load_tokenizer(output_dir)
    tokenizer = train_tokenizer(
        train_split, [data_args.source_lang, data_args.target_lang], vocab_size=data_args.vocab_size,
        model_max_length=max(data_args.max_source_length, data_args.max_target_length),
    )
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def tokenize_splits(raw, tokenizer, data_args):
    """input_ids/attention_mask from the source, labels from the target, truncated separately."""

    def preprocess(batch):
        inputs = tokenizer(batch[data_args.source_lang], max_length=data_args.max_source_length, truncation=True)
        labels = tokenizer(text_target=batch[data_args.target_lang], max_length=data_args.max_target_length, truncation=True)
        inputs["labels"] = labels["input_ids"]
        return inputs

    return raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names, desc="tokenize")


def unwrap_optimizer(optimizer):
    """The torch optimizer under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def group_settings(optimizer) -> dict:
    """Hyperparameters the param groups actually hold (the constructor defaults may be overridden per
    group, as Trainer does for weight decay). One value when all groups agree, else one per group."""
    settings = {}
    # "lr" is the scheduled value at the end of training; "initial_lr" (set by the scheduler) is the base.
    keys = {key for group in optimizer.param_groups for key in group if key not in ("params", "lr")}
    for key in sorted(keys):
        values = [group.get(key) for group in optimizer.param_groups]
        values = [list(v) if isinstance(v, tuple) else v for v in values]
        if not all(v is None or isinstance(v, (int, float, str, bool, list)) for v in values):
            continue  # tensors, callables: not settings
        settings[key] = values[0] if all(v == values[0] for v in values) else values
    return settings


def optimizer_settings(trainer, training_args) -> dict:
    """What was really used: the chosen name, the optimizer class, its param-group settings, the schedule."""
    settings = {"optimizer": getattr(training_args, "optimizer", str(training_args.optim))}
    if trainer.optimizer is not None:
        optimizer = unwrap_optimizer(trainer.optimizer)
        settings["optimizer_class"] = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        settings.update(group_settings(optimizer))
    for name, value in vars(training_args).items():
        if name.startswith("fngd_"):
            settings[name] = value
    scheduler = training_args.lr_scheduler_type
    settings.update(
        learning_rate=training_args.learning_rate,
        lr_scheduler_type=getattr(scheduler, "value", scheduler),
        warmup_steps=training_args.warmup_steps,
        max_grad_norm=training_args.max_grad_norm,
    )
    return settings


def training_settings(training_args, train_size: int) -> dict:
    return {
        "train_examples": train_size,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "world_size": training_args.world_size,
        "label_smoothing_factor": training_args.label_smoothing_factor,
        "seed": training_args.seed,
    }


def one_line(text: str) -> str:
    """Keep one hypothesis per line in prediction files even if the model emitted a newline."""
    return " ".join(text.split("\n"))


def chosen_test_splits(raw, wanted: list[str] | None) -> list[str]:
    """``--test_splits`` (default: every test split present), checked against what the data has."""
    present = test_split_names(raw)
    if wanted is None:
        return present
    missing = [name for name in wanted if name not in present]
    if missing:
        raise ValueError(f"--test_splits {missing} not in the data; present: {present}")
    return list(wanted)


def evaluate_test_splits(trainer, tokenized, raw, data_args, model_args, output_dir: Path) -> dict:
    """Beam-search translate the chosen test splits, score against raw references, write predictions."""
    results = {}
    for split in chosen_test_splits(raw, data_args.test_splits):
        output = trainer.predict(
            tokenized[split], metric_key_prefix=split,
            num_beams=model_args.beam_size, max_length=model_args.max_generation_length,
        )
        hypotheses = decode_ids(trainer.processing_class, output.predictions)
        references = raw[split][data_args.target_lang]
        scores = score_translations(hypotheses, references)
        results[split] = {**scores, "examples": len(references)}
        if trainer.is_world_process_zero():
            path = output_dir / f"predictions_{split}.{data_args.target_lang}"
            path.write_text("".join(one_line(h) + "\n" for h in hypotheses), encoding="utf-8")
            logger.info("%s: BLEU %.2f chrF %.2f (%d sentences)", split, scores["bleu"], scores["chrf"], len(references))
    return results


def push_final_model(folder: str | Path, repo_id: str, token: str | None = None, private: bool | None = None, api=None) -> str:
    """Upload the final model folder (not checkpoints or logs) to the Hub; returns the commit URL."""
    if not repo_id:
        raise ValueError("--hub_model_id is required with --push_to_hub")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model",
        commit_message="Multi30K translation model (fngd_hf recipe)",
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "*.pt", "*.pth"],
    )
    return str(getattr(commit, "commit_url", commit))


def main(argv: list[str] | None = None, hub_api=None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    output_dir = Path(training_args.output_dir)
    # The recipe pushes the final folder itself (with its model card), not the Trainer's checkpoints.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    set_seed(training_args.seed)
    checkpoint = find_checkpoint(training_args) if training_args.do_train else None
    if checkpoint:
        logger.info("resuming from %s", checkpoint)

    with training_args.main_process_first(desc="load Multi30K"):
        raw = load_multi30k(
            dataset_name=data_args.dataset_name, data_dir=data_args.data_dir,
            source_lang=data_args.source_lang, target_lang=data_args.target_lang,
            max_train_samples=data_args.max_train_samples, max_eval_samples=data_args.max_eval_samples,
            max_test_samples=data_args.max_predict_samples,
        )
    if training_args.do_predict:
        chosen_test_splits(raw, data_args.test_splits)  # a wrong name fails now, not after training
    output_dir.mkdir(parents=True, exist_ok=True)
    with training_args.main_process_first(desc="tokenizer"):
        tokenizer = get_tokenizer(data_args, raw["train"], str(output_dir), checkpoint, training_args.local_process_index == 0)
    with training_args.main_process_first(desc="tokenize"):
        tokenized = tokenize_splits(raw, tokenizer, data_args)

    model = build_model(
        tokenizer, model_args.preset, max_length=model_args.max_generation_length,
        num_beams=model_args.beam_size, **model_args.overrides(),
    )
    logger.info("model: %s preset, %.2fM parameters", model_args.preset, model.num_parameters() / 1e6)
    trainer = RecipeTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=make_compute_metrics(tokenizer, raw["validation"][data_args.target_lang]),
    )

    results = {"source_lang": data_args.source_lang, "target_lang": data_args.target_lang,
               "optimizer": getattr(training_args, "optimizer", str(training_args.optim))}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # model + tokenizer + generation config into output_dir
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results["train"] = train_result.metrics
    if training_args.do_eval:
        metrics = trainer.evaluate(num_beams=model_args.beam_size, max_length=model_args.max_generation_length)
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", metrics)
        results["validation"] = metrics
    if training_args.do_predict:
        results["test"] = evaluate_test_splits(trainer, tokenized, raw, data_args, model_args, output_dir)

    if trainer.is_world_process_zero():
        results["metric_signatures"] = metric_signatures()
        (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        if training_args.do_train or results.get("test"):  # the card says when no test set was scored
            write_model_card(
                output_dir,
                model_name=training_args.hub_model_id or output_dir.name,
                source_lang=data_args.source_lang,
                target_lang=data_args.target_lang,
                results={split: {"bleu": s["bleu"], "chrf": s["chrf"]} for split, s in results.get("test", {}).items()},
                optimizer_settings=optimizer_settings(trainer, training_args),
                dataset_id=data_args.dataset_name or DEFAULT_DATASET_NAME,
                model_settings={"architecture": "MarianMTModel", "preset": model_args.preset,
                                **vars(resolve_shape(model_args.preset, **model_args.overrides())),
                                "vocab_size": len(tokenizer), "parameters": model.num_parameters()},
                training_settings=training_settings(training_args, len(raw["train"])),
                metric_signatures=results["metric_signatures"],
                data_source=f"official raw files from {data_args.data_dir}" if data_args.data_dir else data_args.dataset_name,
            )
        if push_to_hub:
            url = push_final_model(output_dir, training_args.hub_model_id, training_args.hub_token,
                                   training_args.hub_private_repo, api=hub_api)
            logger.info("pushed to %s", url)
    return results


if __name__ == "__main__":
    try:
        main()
    finally:
        # gloo's worker threads abort the interpreter at exit (SIGABRT) if the group is still alive.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
