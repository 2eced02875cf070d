#!/usr/bin/env python
"""Multi30K translation with FNGD (or a peer, AdamW or SGD) on the Hugging Face Trainer.

    python recipes/multi30k.py --output_dir DIR [config.json|config.yaml] [--flag value ...]
    accelerate launch recipes/multi30k.py ...     (several processes)

With no other flag the recipe trains the README's documented CPU setting (preset ``cpu``: Marian
d_model 128, 2+2 layers; batch 64, 4 epochs, seed 0, FNGD at its defaults) on all of Multi30K
and scores every test split with beam search. A config file gives defaults; flags override it.
``--help`` lists the recipe's own options, ``--help-all`` every Trainer option as well.

Writes to output_dir: the final model in Hub layout (config.json, generation_config.json,
model.safetensors, tokenizer files, translation_pipeline.py, README.md model card),
results.json, and one predictions_<split>.<lang> file per test split.

Exit codes: 0 done; 2 a bad argument or missing data (one message, before any training);
3 the model failed the final shuffled-source check (all files are still written).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
import torch
import transformers
from transformers import DataCollatorForSeq2Seq, HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

from fngd_hf.integrations import FNGDTrainer as RecipeTrainer, FNGDTrainingArguments as RecipeTrainingArguments
from fngd_hf.translation.data import (
    DEFAULT_DATASET_NAME,
    TEST_SETS,
    cap_splits,
    check_language_pair,
    expected_files,
    load_multi30k,
    test_split_names,
)
from fngd_hf.translation.evaluation import (
    ShuffledSourceCheck,
    decode_ids,
    make_compute_metrics,
    metric_signatures,
    score_translations,
)
from fngd_hf.translation.model_card import write_model_card
from fngd_hf.translation.models import PRESETS, build_model, resolve_shape
from fngd_hf.translation.pipeline import save_translation_pipeline
from fngd_hf.translation.tokenization import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

RECIPES = Path(__file__).resolve().parent
if str(RECIPES) not in sys.path:  # recipes/ is not a package; run as a script, the recipe's folder is on the path
    sys.path.insert(0, str(RECIPES))
from learning_rates import DEFAULT_LEARNING_RATES, FNGD_FAMILY, default_learning_rate  # noqa: E402  (the benchmark's result, the recipe's default)

logger = logging.getLogger("multi30k")

EXIT_USAGE = 2
EXIT_COLLAPSED = 3
TRAIN_SECONDS_DEFINITION = (
    "wall clock of trainer.train() in this process without its evaluations; checkpoint saving counts, "
    "and a resumed run counts from the resume"
)


class UsageError(ValueError):
    """A bad argument or unavailable data: reported as one message without a traceback (exit code 2)."""


@dataclass
class DataArguments:
    dataset_name: str = field(
        default=DEFAULT_DATASET_NAME, metadata={"help": "Hub dataset, used when no --data_dir is given (needs Hub access)."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with the official raw Multi30K files (train.en, train.de, val.*, test_2016_flickr.*, "
                          "...; plain or .gz). Needs no network."},
    )
    source_lang: str = field(default="en", metadata={"help": "Source language code (a column / file suffix)."})
    target_lang: str = field(default="de", metadata={"help": "Target language code."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N pairs (default: all)."})
    max_eval_samples: int | None = field(
        default=500,
        metadata={"help": "Validate on the first N pairs (the documented runs used 500 of 1,014; the card says how many)."},
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Score the first N sentences of each test split (default: all)."}
    )
    test_splits: list[str] | None = field(
        default=None,
        metadata={"help": f"Test splits to translate at the end, from {', '.join(TEST_SETS)} (default: every one present)."},
    )
    max_source_length: int = field(default=128, metadata={"help": "Truncate sources to this many tokens."})
    max_target_length: int = field(default=128, metadata={"help": "Truncate targets to this many tokens."})
    vocab_size: int = field(
        default=6000, metadata={"help": "Joint BPE vocabulary size (ignored with --tokenizer_name)."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "An existing tokenizer (folder or Hub name) instead of training one."}
    )


@dataclass
class ModelArguments:
    preset: str = field(
        default="cpu",
        metadata={
            "help": "Model size: cpu (d_model 128, FFN 512, 4 heads, 2+2 layers: the README's CPU convergence setting), "
                    "small (256/1024/4/3+3), paper (512/2048/8/6+6, Transformer-base), tiny (tests).",
            "choices": list(PRESETS),
        },
    )
    d_model: int | None = field(default=None, metadata={"help": "Override the preset's model width (default: the preset's)."})
    ffn_dim: int | None = field(default=None, metadata={"help": "Override the preset's FFN width (default: the preset's)."})
    attention_heads: int | None = field(default=None, metadata={"help": "Override the preset's (default: the preset's)."})
    encoder_layers: int | None = field(default=None, metadata={"help": "Override the preset's (default: the preset's)."})
    decoder_layers: int | None = field(default=None, metadata={"help": "Override the preset's (default: the preset's)."})
    dropout: float | None = field(default=None, metadata={"help": "Override the preset's (default: the preset's, 0.1)."})
    attention_dropout: float | None = field(default=None, metadata={"help": "Override (default: the preset's, 0)."})
    activation_dropout: float | None = field(default=None, metadata={"help": "Override (default: the preset's, 0)."})
    max_position_embeddings: int | None = field(default=None, metadata={"help": "Override (default: the preset's)."})
    beam_size: int = field(
        default=4,
        metadata={"help": "Beams for the final validation and test translations, and the saved generation config "
                          "(what .generate() uses). Validation during training: --generation_num_beams."},
    )
    max_generation_length: int = field(default=128, metadata={"help": "Longest generated translation, in tokens."})
    source_check: bool = field(
        default=True,
        metadata={
            "help": "At every evaluation also compute the validation loss with sources shuffled across each batch "
            "and log the gap; a gap below source_gap_min flags a model that ignores its input."
        },
    )
    source_gap_min: float = field(
        default=0.05, metadata={"help": "Shuffled-source loss gap (nats/token) below which a model counts as collapsed."}
    )
    fail_on_collapse: bool = field(
        default=True,
        metadata={"help": "Exit with code 3 when the final shuffled-source check finds a model that ignores its source "
                          "(every file is written either way; the card says the check failed)."},
    )

    def overrides(self) -> dict:
        """Shape fields given on the command line (None = keep the preset's value)."""
        names = ("d_model", "ffn_dim", "attention_heads", "encoder_layers", "decoder_layers", "dropout",
                 "attention_dropout", "activation_dropout", "max_position_embeddings")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


# Recipe defaults for Trainer options (a config file and flags override them): the setting of the
# README's documented CPU runs (benchmarks/convergence.py --setting cpu), evaluated once per epoch.
RECIPE_DEFAULTS = {
    "do_train": True,
    "do_eval": True,
    "do_predict": True,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "num_train_epochs": 4,
    "seed": 0,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "predict_with_generate": True,
    "generation_num_beams": 1,  # greedy validation during training, as documented; the end uses --beam_size
    "logging_steps": 50,
    "warmup_steps": 0.05,  # 5 % of the steps: the documented runs of every method but the trust-region FNGD
    "report_to": ["none"],
}
REPORT_TO_HINT = "Logging integrations are off (--report_to none); add --report_to tensorboard (pip install tensorboard) for curves."

# Help sections: the recipe's own options first, then the Trainer options it sets or that matter most.
OPTIMIZER_OPTIONS = ["optimizer", "learning_rate"] + [
    f.name for f in fields(RecipeTrainingArguments) if f.name.startswith("fngd_")
] + ["optim_args"]
TRAINING_OPTIONS = [
    "output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
    "label_smoothing_factor", "seed", "eval_strategy", "save_strategy", "save_total_limit", "logging_steps",
    "generation_num_beams", "report_to", "bf16", "use_cpu", "resume_from_checkpoint", "push_to_hub", "hub_model_id",
    "do_train", "do_eval", "do_predict",
]
HELP_OVERRIDES = {
    "learning_rate": "Peak learning rate. Default: the optimizer's own ("
    + ", ".join(f"{name} {rate:g}" for name, rate in DEFAULT_LEARNING_RATES.items())
    + "; fngd, ngd and cwngd with --fngd_step_length trust_region: "
    + f"{default_learning_rate('fngd', 'trust_region'):g}).",
    "optim": "Not used by this recipe (an error if given): choose the optimizer with --optimizer.",
    "report_to": "Logging integrations (tensorboard, wandb, ...). The recipe's default is none; "
    "--report_to tensorboard needs `pip install tensorboard`.",
    "generation_num_beams": "Beams for the validation BLEU after each epoch (recipe default 1: greedy, as in the "
    "documented runs). The final scores use --beam_size.",
    "output_dir": "Where the model, its card, results.json and checkpoints go (required).",
    "optim_args": "Settings of kfac, sngd and shampoo as key=value pairs, e.g. 'damping=0.1,inverse_update_freq=10'.",
    "max_grad_norm": "Clip norm, 0 = off. For the natural-gradient methods it clips the applied update of the layers "
    "they manage and the gradients of their AdamW part; for adamw and sgd the gradients.",
    "push_to_hub": "At the end, upload the final folder (model, card, tokenizer, pipeline file; no checkpoints) to "
    "--hub_model_id.",
    "resume_from_checkpoint": "Checkpoint folder to resume from (default: the last checkpoint-* in --output_dir, "
    "if there is one).",
}


class RecipeHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """One option spelling per line, and no "(default: ...)" where the help already states the default."""

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        option = action.option_strings[0]
        if action.nargs == 0:
            return option
        return f"{option} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class RecipeParser(HfArgumentParser):
    """HfArgumentParser whose errors raise :class:`UsageError` (one message) instead of printing the usage."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def load_config_file(path: str) -> dict:
    """A JSON or YAML mapping of argument name -> value."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        if path.endswith(".json"):
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except Exception as error:  # OSError, JSONDecodeError, yaml.YAMLError: all "cannot read it"
        raise UsageError(f"cannot read the config file {path}: {error}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} must hold a mapping of argument names to values")
    return config


def build_parser(config: dict | None = None) -> RecipeParser:
    """The recipe's parser with its defaults (and a config file's) applied, so every shown default is the real one."""
    parser = RecipeParser(
        (ModelArguments, DataArguments, RecipeTrainingArguments),
        prog="multi30k.py",
        usage="%(prog)s [config.json|yaml] --output_dir DIR [--data_dir DIR] [options]",
        description="Train a Transformer on Multi30K with FNGD and score it with BLEU/chrF.",
        formatter_class=RecipeHelpFormatter,
        add_help=False,
    )
    actions = {}
    for action in parser._actions:
        actions.setdefault(action.dest, action)  # the flag itself, not its --no_ twin
    for dest, text in HELP_OVERRIDES.items():
        actions[dest].help = text
    # --optim is refused below, so the optimizer's help must not send users to it.
    actions["optimizer"].help = (actions["optimizer"].help or "").replace(
        "adamw: the Trainer's own optimizer (`optim`)", "adamw: the Trainer's AdamW")
    # Suppressed defaults: absent from the namespace unless given, so "given" needs no guessing from argv.
    actions["learning_rate"].default = argparse.SUPPRESS
    actions["optim"].default = argparse.SUPPRESS
    actions["output_dir"].default = argparse.SUPPRESS
    for action in parser._actions:
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = argparse.SUPPRESS  # the --no_x twin of a boolean: --x False says the same
        if action.choices and len(", ".join(map(str, action.choices))) > 60 and action.dest != "optim":
            action.metavar = action.dest.upper()
            action.help = f"{action.help or ''} One of: {', '.join(map(str, action.choices))}."
    defaults = {**RECIPE_DEFAULTS, **(config or {})}
    parser.set_defaults(**defaults)
    for dest, value in (config or {}).items():  # a help text that states a default must show the config's
        if dest in actions and "default" in (actions[dest].help or "").lower():
            actions[dest].help += f" This config file sets {value}."
    for action in parser._actions:  # a value from the config satisfies a required flag
        if action.dest in defaults:
            action.required = False
    return parser


def help_sections(parser: RecipeParser, everything: bool) -> list[tuple[str, list]]:
    """(title, actions) in the order --help shows them."""
    by_dest: dict[str, list] = {}
    for action in parser._actions:
        by_dest.setdefault(action.dest, []).append(action)

    def pick(dests):
        return [a for d in dests for a in by_dest.get(d, []) if a.help is not argparse.SUPPRESS]

    model = [f.name for f in fields(ModelArguments)]
    data = [f.name for f in fields(DataArguments)]
    sections = [
        ("Model, decoding and the shuffled-source check (the recipe's options)", pick(model)),
        ("Data (the recipe's options)", pick(data)),
        ("Optimizer (fngd_hf's options)", pick(OPTIMIZER_OPTIONS)),
        ("Training (Trainer options; defaults are the recipe's)", pick(TRAINING_OPTIONS)),
    ]
    if everything:
        shown = set(model + data + OPTIMIZER_OPTIONS + TRAINING_OPTIONS)
        rest = [d for d in by_dest if d not in shown and d != "help"]
        sections.append(("Every other Seq2SeqTrainingArguments option (the Trainer's defaults)", pick(rest)))
    return sections


def format_help(parser: RecipeParser, everything: bool = False) -> str:
    formatter = parser._get_formatter()
    formatter.add_usage(parser.usage, [], [])
    formatter.add_text(parser.description)
    formatter.add_text(
        "With no option but --output_dir it trains the README's documented CPU setting. Booleans: --flag or --flag False. "
        "A config file (JSON/YAML mapping of option names) gives defaults; flags override it. " + REPORT_TO_HINT
    )
    for title, actions in help_sections(parser, everything):
        formatter.start_section(title)
        formatter.add_arguments(actions)
        formatter.end_section()
    if not everything:
        formatter.add_text("--help-all also lists every other Trainer option (Seq2SeqTrainingArguments).")
    return formatter.format_help()


def parse_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, training arguments) from [config file] + flags, all validated.

    Raises :class:`UsageError` for anything wrong; ``--help`` / ``--help-all`` print and exit 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config = {}
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        config = load_config_file(argv.pop(0))
    parser = build_parser(config)
    unknown = set(config) - {action.dest for action in parser._actions}
    if unknown:
        raise UsageError(f"unknown keys in config file: {sorted(unknown)}")
    if "--help-all" in argv or "-h" in argv or "--help" in argv:
        print(format_help(parser, everything="--help-all" in argv))
        raise SystemExit(0)
    namespace = vars(parser.parse_args(argv))
    if "optim" in namespace:
        raise UsageError(
            "--optim (the Trainer's optimizer name) is not used by this recipe: choose the optimizer with --optimizer "
            "{" + ",".join(DEFAULT_LEARNING_RATES) + "} (adamw is the Trainer's AdamW)"
        )
    if "output_dir" not in namespace or not namespace["output_dir"]:
        raise UsageError("--output_dir is required")
    if "learning_rate" not in namespace:  # the Trainer's 5e-5 suits none of these methods: the method's own
        if namespace["optimizer"] not in DEFAULT_LEARNING_RATES:
            raise UsageError(f"--optimizer {namespace['optimizer']} has no default learning rate: give --learning_rate")
        try:
            namespace["learning_rate"] = default_learning_rate(namespace["optimizer"], namespace.get("fngd_step_length"))
        except ValueError as error:  # a config file's fngd_step_length misses argparse's choices
            raise UsageError(str(error)) from None
    outputs = []
    for dtype in (ModelArguments, DataArguments, RecipeTrainingArguments):
        inputs = {f.name: namespace[f.name] for f in fields(dtype) if f.init and f.name in namespace}
        try:
            outputs.append(dtype(**inputs))
        except ValueError as error:  # the arguments' own checks (FNGDTrainingArguments, TrainingArguments)
            raise UsageError(str(error).strip().splitlines()[0]) from None
    validate_args(*outputs)
    return tuple(outputs)


def validate_args(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Everything that can be checked before data, tokenizer or model exist (each failure: UsageError)."""
    try:
        resolve_shape(model_args.preset, **model_args.overrides())
        check_language_pair(data_args.source_lang, data_args.target_lang)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if model_args.source_gap_min < 0:
        raise UsageError(f"--source_gap_min must be >= 0, got {model_args.source_gap_min}")
    if model_args.beam_size < 1:
        raise UsageError(f"--beam_size must be >= 1, got {model_args.beam_size}")
    if model_args.max_generation_length <= 1:
        raise UsageError(f"--max_generation_length must be > 1, got {model_args.max_generation_length}")
    if training_args.generation_num_beams is not None and training_args.generation_num_beams < 1:
        raise UsageError(f"--generation_num_beams must be >= 1, got {training_args.generation_num_beams}")
    for name in ("max_train_samples", "max_eval_samples", "max_predict_samples", "max_source_length", "max_target_length"):
        value = getattr(data_args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be positive, got {value}")
    if data_args.max_eval_samples is not None and data_args.max_eval_samples < 2 and training_args.do_eval:
        raise UsageError("--max_eval_samples must be >= 2: the shuffled-source check pairs targets with other sources")
    smallest = len(SPECIAL_TOKENS) + 256 + 1
    if data_args.tokenizer_name is None and data_args.vocab_size < smallest:
        raise UsageError(f"--vocab_size must be at least {smallest} (special tokens + the byte alphabet), got {data_args.vocab_size}")
    unknown = [name for name in data_args.test_splits or [] if name not in TEST_SETS]
    if unknown:
        raise UsageError(f"--test_splits {unknown}: known test splits are {', '.join(TEST_SETS)}")
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise UsageError("--push_to_hub needs --hub_model_id NAME (the recipe pushes the final folder there)")
    if training_args.resume_from_checkpoint and not Path(training_args.resume_from_checkpoint).is_dir():
        raise UsageError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint} is not a folder")
    if data_args.data_dir is not None and not Path(data_args.data_dir).is_dir():
        raise UsageError(
            f"--data_dir {data_args.data_dir} is not a folder. It must hold the official raw Multi30K files: "
            f"{expected_files(data_args.source_lang, data_args.target_lang)}."
        )


def setup_logging(training_args) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Our own numbers are logged on the main process; transformers keeps its own (passive) level.
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


def load_data(data_args) -> tuple[datasets.DatasetDict, dict[str, int]]:
    """(the splits, capped as asked; each split's full size). Unavailable data is a UsageError naming --data_dir."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # no page of retry warnings before the one message below
    try:
        full = load_multi30k(dataset_name=data_args.dataset_name, data_dir=data_args.data_dir,
                             source_lang=data_args.source_lang, target_lang=data_args.target_lang)
    except ValueError as error:
        needs = f"the official raw Multi30K files: {expected_files(data_args.source_lang, data_args.target_lang)}"
        if data_args.data_dir is not None:
            raise UsageError(f"--data_dir {data_args.data_dir}: {error}. The folder must hold {needs}.") from None
        raise UsageError(
            f"{error}. Without Hub access pass --data_dir DIR, a folder with {needs}."
        ) from None
    finally:
        hub_logger.setLevel(level)
    sizes = {name: len(split) for name, split in full.items()}
    raw = cap_splits(full, data_args.max_train_samples, data_args.max_eval_samples, data_args.max_predict_samples)
    return raw, sizes


def find_checkpoint(training_args) -> str | None:
    """Checkpoint to resume from: the explicit one, else the last in output_dir (if any)."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    output_dir = Path(training_args.output_dir)
    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def get_tokenizer(data_args, train_split, output_dir: str, checkpoint: str | None, is_local_main: bool):
    """Given tokenizer, else the one saved with the checkpoint (resume), else train one on train."""
    if data_args.tokenizer_name:
        try:
            return load_tokenizer(data_args.tokenizer_name)
        except (OSError, ValueError) as error:
            raise UsageError(f"--tokenizer_name {data_args.tokenizer_name}: {str(error).splitlines()[0]}") from None
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


def base_lr(group: dict) -> float:
    """A param group's configured rate: "lr" holds the scheduled value at the end of training."""
    return float(group.get("initial_lr", group["lr"]))


def optimizer_settings(trainer, training_args) -> dict:
    """What was really used, as short readable rows (label -> value) for the card and results.json."""
    name = training_args.optimizer
    settings: dict[str, object] = {"optimizer": name}
    optimizer = unwrap_optimizer(trainer.optimizer) if trainer.optimizer is not None else None
    if optimizer is not None:
        settings["class"] = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    scheduler = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    settings["learning rate"] = (
        f"{training_args.learning_rate:g} peak, {scheduler} schedule, {training_args.warmup_steps:g} warmup steps"
    )
    groups = list(getattr(optimizer, "param_groups", []))
    natural = next((g for g in groups if g.get("fngd")), None)
    plain = [g for g in groups if not g.get("fngd")]
    clip = training_args.max_grad_norm
    if natural is not None:
        modules = getattr(optimizer, "managed_modules", None)
        settings["layers it manages"] = f"{len(modules)} Linear layers" if modules is not None else "its Linear layers"
        if "damping" in natural:
            mode = natural.get("damping_mode", "")
            settings["damping"] = f"{natural['damping']:g} ({mode}{': λ = damping·‖K‖_F' if mode == 'relative' else ''})"
        if "momentum" in natural:
            settings["momentum"] = f"{natural['momentum']:g}" + (" (Nesterov)" if natural.get("nesterov") else "")
        if name in FNGD_FAMILY:
            share = getattr(optimizer, "share_coefficients", False)
            settings["coefficients"] = (
                f"from the first epoch, reused after (by {optimizer.share_by}, {optimizer.scale_mode} scale)"
                if share else "recomputed every step (no sharing)"
            )
            settings["step length"] = {
                "muon": "muon: Muon's orthogonalised, RMS-matched step along the natural gradient",
                "trust_region": "trust_region: lr times the natural gradient, within the trust region",
                "adamw": "adamw: AdamW's update length along the natural gradient (grafting)",
            }[optimizer.step_length]
            if getattr(optimizer, "normalize_directions", False):
                settings["step length"] += "; directions normalised per layer before momentum"
        if "trust_ratio" in natural:
            settings["trust ratio"] = natural["trust_ratio"] if natural["trust_ratio"] is not None else "off"
        settings["weight decay"] = f"{natural.get('weight_decay', 0.0):g} (managed layers), {training_args.weight_decay:g} (AdamW part)"
        if plain:
            betas = plain[0].get("betas", (training_args.adam_beta1, training_args.adam_beta2))
            settings["AdamW part (embeddings, LayerNorms)"] = (
                f"lr {base_lr(plain[0]):g}, betas {betas[0]:g}/{betas[1]:g}, eps {plain[0].get('eps', training_args.adam_epsilon):g}"
            )
        settings["update clip (max_grad_norm)"] = (
            f"{clip:g}: the applied update of the managed layers, and the AdamW part's gradients" if clip else "off"
        )
        if name in FNGD_FAMILY:
            settings["statistics dtype"] = training_args.fngd_stat_dtype
    else:
        first = plain[0] if plain else {}
        if "betas" in first:
            settings["betas"] = f"{first['betas'][0]:g}/{first['betas'][1]:g}"
        if "eps" in first:
            settings["eps"] = first["eps"]
        if "momentum" in first:
            settings["momentum"] = first["momentum"]
        settings["weight decay"] = f"{training_args.weight_decay:g} (biases and LayerNorms exempt)"
        settings["gradient clip (max_grad_norm)"] = f"{clip:g}" if clip else "off"
    if name in ("kfac", "sngd", "shampoo") and training_args.optim_args:
        settings["optim_args"] = training_args.optim_args
    return settings


def count_text(used: int, total: int) -> str:
    return f"{used:,} (all)" if used == total else f"first {used:,} of {total:,}"


def training_settings(training_args, used: dict[str, int], sizes: dict[str, int], dataset_id: str | None,
                      train_seconds: float | None) -> dict:
    batch = training_args.per_device_train_batch_size
    total = batch * training_args.world_size * training_args.gradient_accumulation_steps
    settings = {
        "data": f"Hub dataset {dataset_id}" if dataset_id else "local files (official raw Multi30K release)",
        "training pairs": count_text(used["train"], sizes["train"]),
        "epochs": training_args.num_train_epochs if training_args.max_steps <= 0 else f"{training_args.max_steps} steps",
        "batch size": f"{total} ({batch} per device × {training_args.world_size} process(es) × "
                      f"{training_args.gradient_accumulation_steps} accumulation)",
        "label smoothing": training_args.label_smoothing_factor,
        "precision": "bf16 autocast" if training_args.bf16 else "float32",
        "seed": training_args.seed,
    }
    if train_seconds is not None:
        settings["training time"] = f"{train_seconds:.0f} s ({TRAIN_SECONDS_DEFINITION})"
    return settings


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
        raise UsageError(f"--test_splits {missing} not in the data; present: {present}")
    return list(wanted)


def evaluate_test_splits(trainer, tokenized, raw, sizes, data_args, model_args, output_dir: Path) -> dict:
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
        results[split] = {**scores, "examples": len(references), "total_examples": sizes[split],
                          "num_beams": model_args.beam_size}
        if trainer.is_world_process_zero():
            path = output_dir / f"predictions_{split}.{data_args.target_lang}"
            path.write_text("".join(one_line(h) + "\n" for h in hypotheses), encoding="utf-8")
            logger.info("%s: BLEU %.2f chrF %.2f (%s sentences, %d beams)", split, scores["bleu"], scores["chrf"],
                        count_text(len(references), sizes[split]), model_args.beam_size)
    return results


def source_check_result(validation: dict | None, model_args: ModelArguments) -> dict:
    """The final shuffled-source check as results.json and the card report it."""
    if not validation or "eval_source_collapsed" not in validation:
        return {"ran": False, "passed": None}
    return {"ran": True, "passed": not bool(validation["eval_source_collapsed"]),
            "source_gap": validation["eval_source_gap"], "min_gap": model_args.source_gap_min}


def collapse_message(results: dict, training_args, output_dir: Path) -> str:
    """One message: what failed, that nothing was lost, and what to change."""
    check = results["source_check"]
    bleu = results.get("validation", {}).get("eval_bleu")
    return (
        f"the final shuffled-source check failed: giving each validation target another sentence's source raised "
        f"the loss by only {check['source_gap']:.3g} nats/token (threshold {check['min_gap']:g}), so the model "
        f"ignores its source{f' (validation BLEU {bleu:.1f})' if bleu is not None else ''}. The model, its card "
        f"(marked as failed) and results.json are in {output_dir}. Train again with a lower --learning_rate "
        f"(this run: {training_args.learning_rate:g}) or a larger --per_device_train_batch_size (this run: "
        f"{training_args.per_device_train_batch_size}), or for longer if it barely trained; "
        f"--fail_on_collapse False keeps exit code 0."
    )


def push_final_model(folder: str | Path, repo_id: str, token: str | None = None, private: bool | None = None, api=None) -> str:
    """Upload the final model folder (not checkpoints or logs) to the Hub; returns the commit URL."""
    if not repo_id:
        raise UsageError("--hub_model_id is required with --push_to_hub")
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


def run(model_args: ModelArguments, data_args: DataArguments, training_args, hub_api=None) -> dict:
    """Train, evaluate and write everything; returns what results.json holds."""
    setup_logging(training_args)
    output_dir = Path(training_args.output_dir)
    # The recipe pushes the final folder itself (with its model card), not the Trainer's checkpoints.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    set_seed(training_args.seed)
    checkpoint = find_checkpoint(training_args) if training_args.do_train else None
    if checkpoint:
        logger.info("resuming from %s", checkpoint)

    with training_args.main_process_first(desc="load Multi30K"):
        raw, sizes = load_data(data_args)
    if training_args.do_predict:
        chosen_test_splits(raw, data_args.test_splits)  # a wrong name fails now, not after training
    used = {name: len(split) for name, split in raw.items()}
    dataset_id = None if data_args.data_dir is not None else data_args.dataset_name
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
        # After every evaluation: eval_shuffled_source_loss, eval_source_gap, eval_source_collapsed.
        callbacks=[ShuffledSourceCheck(min_gap=model_args.source_gap_min)] if model_args.source_check else None,
    )

    results = {"source_lang": data_args.source_lang, "target_lang": data_args.target_lang,
               "optimizer": training_args.optimizer,
               "data": {"source": f"hub:{dataset_id}" if dataset_id else "local files",
                        "examples": {name: {"used": used[name], "total": sizes[name]} for name in sizes}},
               "definitions": {"train_seconds": TRAIN_SECONDS_DEFINITION}}
    train_seconds = None
    if training_args.do_train:
        if training_args.report_to in (["none"], "none", []):
            logger.info(REPORT_TO_HINT)
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # model + tokenizer + generation config into output_dir
        if trainer.is_world_process_zero():  # users without fngd_hf: pipeline(model=..., trust_remote_code=True)
            save_translation_pipeline(output_dir)
        # One time figure: train_runtime (and the speeds from it) include the evaluations during training.
        metrics = {k: v for k, v in train_result.metrics.items()
                   if k not in ("train_runtime", "train_samples_per_second", "train_steps_per_second")}
        train_seconds = metrics.get("train_seconds")
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results["train"] = metrics
        if train_seconds is not None:
            logger.info("training took %.1f s (%s)", train_seconds, TRAIN_SECONDS_DEFINITION)
    if training_args.do_eval:
        metrics = trainer.evaluate(num_beams=model_args.beam_size, max_length=model_args.max_generation_length)
        metrics.pop("train_seconds", None)  # the trainer's clock runs on after train(): not a training time
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        metrics["eval_examples"], metrics["eval_total_examples"] = used["validation"], sizes["validation"]
        metrics["eval_num_beams"] = model_args.beam_size
        trainer.log_metrics("eval", metrics)
        results["validation"] = metrics
    if training_args.do_predict:
        results["test"] = evaluate_test_splits(trainer, tokenized, raw, sizes, data_args, model_args, output_dir)
    results["source_check"] = source_check_result(results.get("validation"), model_args)
    results["optimizer_settings"] = optimizer_settings(trainer, training_args)

    if trainer.is_world_process_zero():
        results["metric_signatures"] = metric_signatures()
        (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        if training_args.do_train or results.get("test"):  # the card says when no test set was scored
            validation = results.get("validation")
            write_model_card(
                output_dir,
                model_name=training_args.hub_model_id or output_dir.resolve().name,
                source_lang=data_args.source_lang,
                target_lang=data_args.target_lang,
                results={split: {"bleu": s["bleu"], "chrf": s["chrf"]} for split, s in results.get("test", {}).items()},
                evaluated={split: {"sentences": s["examples"], "total": s["total_examples"], "num_beams": s["num_beams"]}
                           for split, s in results.get("test", {}).items()},
                validation={"sentences": used["validation"], "total": sizes["validation"], "num_beams": model_args.beam_size,
                            "loss": validation["eval_loss"], "bleu": validation.get("eval_bleu"),
                            "chrf": validation.get("eval_chrf")} if validation else None,
                source_check=results["source_check"],
                optimizer_settings=results["optimizer_settings"],
                dataset_id=dataset_id,
                model_settings={"architecture": "MarianMTModel", "preset": model_args.preset,
                                **vars(resolve_shape(model_args.preset, **model_args.overrides())),
                                "vocab_size": len(tokenizer), "parameters": model.num_parameters()},
                training_settings=training_settings(training_args, used, sizes, dataset_id, train_seconds),
                metric_signatures=results["metric_signatures"],
                with_pipeline=(output_dir / "translation_pipeline.py").is_file(),
            )
        if push_to_hub:
            url = push_final_model(output_dir, training_args.hub_model_id, training_args.hub_token,
                                   training_args.hub_private_repo, api=hub_api)
            logger.info("pushed to %s", url)
    return results


def main(argv: list[str] | None = None, hub_api=None) -> dict:
    """Parse, validate, run; raises :class:`UsageError` for bad arguments or missing data."""
    return run(*parse_args(argv), hub_api=hub_api)


def cli(argv: list[str] | None = None) -> int:
    """The command line: one message and a non-zero exit code for a usage error or a collapsed model."""
    try:
        model_args, data_args, training_args = parse_args(argv)
        results = run(model_args, data_args, training_args)
    except UsageError as error:
        print(f"multi30k.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if results["source_check"].get("passed") is False:
        message = collapse_message(results, training_args, Path(training_args.output_dir))
        if model_args.fail_on_collapse:
            print(f"multi30k.py: error: {message}", file=sys.stderr)
            return EXIT_COLLAPSED
        logger.warning(message)
    return 0


if __name__ == "__main__":
    try:
        code = cli()
    finally:
        # gloo's worker threads abort the interpreter at exit (SIGABRT) if the group is still alive.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(code)
