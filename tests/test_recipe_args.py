"""The recipe's arguments: defaults = the documented setting, --help, one optimizer flag, and every bad
argument or missing data stopped with one message before any expensive step."""

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys

import pytest
from multi30k_fixtures import REPO, write_synthetic_corpus
from recipe_module import load_recipe_module

from fngd_hf import settings
from fngd_hf.translation.models import resolve_shape

DEFAULT_LEARNING_RATES = load_recipe_module().DEFAULT_LEARNING_RATES  # recipes/learning_rates.py, as the recipe sees it

# Options that only decide how the final model is scored and saved, not how it is trained:
# the documented runs scored 500 greedy test sentences and rescored 1,000 with beam 4 afterwards
# (benchmarks/rescore.py); the recipe's defaults score every test sentence with beam 4 at once.
SCORING_ONLY = {"beam_size", "max_predict_samples", "test_splits", "save_strategy", "disable_tqdm", "output_dir"}


def fields_of(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def documented_command(method: str) -> list[str]:
    """The recipe flags of the method's shipped-default run in docs/results/full_multi30k.json (the README's
    full-data table), as benchmarks/convergence.py recorded them."""
    runs = json.loads((REPO / "docs" / "results" / "full_multi30k.json").read_text())["runs"]
    command = min((r["seed"], r["command"]) for r in runs if r["method"] == method and r["shipped_default"])[1]
    return shlex.split(command)[2:]  # without "python recipes/multi30k.py"


def test_defaults_reproduce_the_documented_full_data_run(tmp_path):
    """`multi30k.py --output_dir DIR` trains exactly the README's shipped-default FNGD full-data row."""
    recipe = load_recipe_module()
    command = documented_command("fngd")
    if not (REPO / command[command.index("--data_dir") + 1]).is_dir():  # no shared data beside this clone
        command[command.index("--data_dir") + 1] = str(write_synthetic_corpus(tmp_path / "data"))
    documented = recipe.parse_args(command)
    default = recipe.parse_args(["--output_dir", "out"])
    doc_model, doc_data, doc_train = map(fields_of, documented)
    model, data, train = map(fields_of, default)
    # Same model: the documented "small + overrides" is the "cpu" preset.
    assert resolve_shape(doc_model["preset"], **documented[0].overrides()) == resolve_shape(model["preset"], **default[0].overrides())
    shape = {"preset", "d_model", "ffn_dim", "attention_heads", "encoder_layers", "decoder_layers"}
    differ = {k for k in model if k not in shape and model[k] != doc_model[k]}
    # Same data: 29,000 pairs is all of Multi30K's training split; the Hub dataset instead of local files.
    assert doc_data["max_train_samples"] == 29000 and data["max_train_samples"] is None
    differ |= {k for k in data if k not in ("max_train_samples", "data_dir") and data[k] != doc_data[k]}
    for fields_ in (train, doc_train):  # None: FNGD's default for its step length, which the run spelled out
        fields_["fngd_adamw_lr"] = settings.default_rates(fields_["fngd_step_length"], adamw_lr=fields_["fngd_adamw_lr"])[1]
        fields_["fngd_normalize_directions"] = settings.resolve_normalize_directions(
            fields_["fngd_normalize_directions"], fields_["fngd_step_length"])
        fields_["fngd_damping"] = settings.default_damping(
            fields_["fngd_step_length"], fields_["fngd_damping_mode"], fields_["fngd_damping"])
    differ |= {k for k in train if train[k] != doc_train[k]}
    assert differ <= SCORING_ONLY, differ
    # The settings that matter, spelled out (they are what the issue found wrong before).
    args = default[2]
    assert (args.per_device_train_batch_size, args.num_train_epochs, args.seed, args.learning_rate) == (64, 4, 0, 6e-3)
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    assert (args.fngd_step_length, args.fngd_adamw_lr, args.warmup_steps, scheduler) == ("muon", None, 0.05, "linear")
    assert (args.optimizer, args.generation_num_beams, default[1].vocab_size, default[1].max_eval_samples) == ("fngd", 1, 6000, 500)
    assert default[0].beam_size == 4 and default[1].max_predict_samples is None  # full test splits, beam 4


def test_the_trust_region_step_gets_its_own_default_rate():
    """--fngd_step_length trust_region without --learning_rate: the paper step's measured rate, not Muon's."""
    recipe = load_recipe_module()
    args = recipe.parse_args(["--output_dir", "out", "--fngd_step_length", "trust_region"])[2]
    assert (args.fngd_step_length, args.learning_rate) == ("trust_region", 1e-2)
    paper = recipe.parse_args([str(REPO / "recipes" / "configs" / "fngd_paper.yaml"), "--output_dir", "out"])[2]
    assert (paper.fngd_step_length, paper.learning_rate, paper.warmup_steps) == ("trust_region", 1e-2, 0)
    assert recipe.parse_args(["--output_dir", "out", "--optimizer", "muon"])[2].learning_rate == 5e-4


def test_report_to_is_plainly_none(monkeypatch):
    """No silent switch on whatever happens to be importable: the default is none, with a hint."""
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_tensorboard_available", lambda: True)
    recipe = load_recipe_module(fresh=True)
    args = recipe.parse_args(["--output_dir", "out"])[2]
    assert args.report_to == []  # TrainingArguments' normal form of "none"
    assert recipe.parse_args(["--output_dir", "out", "--report_to", "tensorboard"])[2].report_to == ["tensorboard"]
    assert "--report_to tensorboard" in recipe.REPORT_TO_HINT
    assert "--report_to tensorboard" in recipe.format_help(recipe.build_parser())


def test_help_shows_the_recipe_options_first_with_true_defaults(capsys):
    recipe = load_recipe_module()
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_args(["--help"])
    assert exit_info.value.code == 0
    short = capsys.readouterr().out
    with pytest.raises(SystemExit):
        recipe.parse_args(["--help-all"])
    everything = capsys.readouterr().out
    assert len(short.splitlines()) < 300 < len(everything.splitlines())
    order = [short.index(f"\n  {flag} ") for flag in ("--preset", "--data_dir", "--optimizer", "--output_dir")]
    assert order == sorted(order)  # model, data, optimizer, then the Trainer's options
    assert "--optim " not in short and "--optim_target_modules" not in short and "--help-all" in short
    assert "--no_source_check" not in everything  # one spelling per option
    lr_help = " ".join(short[short.index("--learning_rate"):short.index("--fngd_damping ")].split())
    assert "5e-05" not in lr_help and "fngd 0.006" in lr_help and "trust_region: 0.01" in lr_help and "adamw 0.0005" in lr_help
    # Every default the short help shows is the value the recipe really uses.
    parser = recipe.build_parser()
    values = {}
    for obj in recipe.parse_args(["--output_dir", "out"]):
        values.update(fields_of(obj))
    shown = [a for _, actions in recipe.help_sections(parser, everything=False) for a in actions]
    assert len(shown) > 50
    for action in shown:
        if action.default is argparse.SUPPRESS:
            continue
        value = values[action.dest]
        value = [] if action.dest == "report_to" and value == [] else getattr(value, "value", value)
        expected = [] if action.default == ["none"] else action.default
        assert value == expected, (action.dest, action.default, value)


def test_a_config_file_default_is_shown_and_used(tmp_path, capsys):
    recipe = load_recipe_module()
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.02\nnum_train_epochs: 7\n")
    with pytest.raises(SystemExit):
        recipe.parse_args([str(config), "--help"])
    text = capsys.readouterr().out
    assert "(default: 7)" in " ".join(text.split("--num_train_epochs")[1].split("--max_steps")[0].split())
    assert "This config file sets 0.02." in " ".join(text.split("--learning_rate")[1].split("--fngd_damping ")[0].split())
    args = recipe.parse_args([str(config), "--output_dir", "o"])[2]
    assert (args.learning_rate, args.num_train_epochs) == (0.02, 7)


def test_one_way_to_choose_the_optimizer(tmp_path):
    recipe = load_recipe_module()
    with pytest.raises(recipe.UsageError, match="--optimizer"):
        recipe.parse_args(["--output_dir", "o", "--optim", "adafactor"])
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"optim": "adamw_torch", "optimizer": "adamw"}))
    with pytest.raises(recipe.UsageError, match="--optimizer"):
        recipe.parse_args([str(config), "--output_dir", "o"])
    for optimizer in DEFAULT_LEARNING_RATES:
        args = recipe.parse_args(["--output_dir", "o", "--optimizer", optimizer])[2]
        assert args.optimizer == optimizer and args.learning_rate == DEFAULT_LEARNING_RATES[optimizer]


def test_the_shuffled_source_check_is_the_recipes_option():
    """--source_check / --source_gap_min belong to the recipe (fngd_hf's training arguments know nothing of them)."""
    recipe = load_recipe_module()
    model_args, _, training_args = recipe.parse_args(["--output_dir", "o", "--source_check", "False",
                                                      "--source_gap_min", "0.2"])
    assert (model_args.source_check, model_args.source_gap_min) == (False, 0.2)
    assert not hasattr(training_args, "source_check") and not hasattr(training_args, "source_gap_min")
    model_args = recipe.parse_args(["--output_dir", "o"])[0]
    assert (model_args.source_check, model_args.source_gap_min) == (True, 0.05)
    assert recipe.source_check_result({"eval_source_collapsed": 0.0, "eval_source_gap": 0.3}, model_args) == {
        "ran": True, "passed": True, "source_gap": 0.3, "min_gap": 0.05}
    assert recipe.source_check_result({"eval_loss": 1.0}, model_args) == {"ran": False, "passed": None}


BAD_ARGUMENTS = [
    (["--preset", "big"], "invalid choice: 'big'"),
    (["--d_model", "30", "--attention_heads", "4"], "not divisible"),
    (["--vocab_size", "100"], "--vocab_size"),
    (["--beam_size", "0"], "--beam_size"),
    (["--max_eval_samples", "0"], "--max_eval_samples"),
    (["--test_splits", "test_2099"], "test_2099"),
    (["--source_lang", "de", "--target_lang", "de"], "must differ"),
    (["--push_to_hub", "True"], "--hub_model_id"),
    (["--fngd_damping", "-1"], "fngd_damping"),
    (["--source_gap_min", "-1"], "--source_gap_min"),
    (["--optimizer", "adam"], "invalid choice: 'adam'"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--resume_from_checkpoint", "no/such/checkpoint"], "--resume_from_checkpoint"),
    (["--data_dir", "no/such/folder"], "--data_dir"),
    ([], "--output_dir is required"),
]


@pytest.fixture
def no_expensive_step(monkeypatch):
    """Any data loading, tokenizer training or model building fails the test."""
    recipe = load_recipe_module()

    def reached(*_, **__):
        raise AssertionError("an expensive step ran before the arguments were checked")

    for name in ("load_multi30k", "train_tokenizer", "build_model", "RecipeTrainer"):
        monkeypatch.setattr(recipe, name, reached)
    return recipe


@pytest.mark.parametrize(("flags", "message"), BAD_ARGUMENTS)
def test_bad_arguments_stop_before_any_expensive_step(no_expensive_step, tmp_path, flags, message):
    output = [] if not flags and message.startswith("--output_dir") else ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(no_expensive_step.UsageError) as error:
        no_expensive_step.main([*output, "--data_dir", str(tmp_path), *flags])
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_incomplete_data_dir_names_the_flag_and_the_files(monkeypatch, tmp_path):
    recipe = load_recipe_module()
    data = write_synthetic_corpus(tmp_path / "data", sizes={"train": 8, "val": 4})
    (data / "val.de").unlink()

    def reached(*_, **__):
        raise AssertionError("tokenizer training ran")

    monkeypatch.setattr(recipe, "train_tokenizer", reached)
    with pytest.raises(recipe.UsageError) as error:
        recipe.main(["--output_dir", str(tmp_path / "out"), "--data_dir", str(data)])
    message = str(error.value)
    assert message.startswith(f"--data_dir {data}: missing file") and "val.de" in message
    assert all(name in message for name in ("train.en", "train.de", "val.en", "test_2016_flickr"))
    assert not (tmp_path / "out").exists()


def test_no_hub_and_no_data_dir_is_one_message_without_traceback(tmp_path):
    """README command 1 on a machine without Hub access: one line naming --data_dir, exit code 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"),  # nothing cached: the dataset is out of reach
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(REPO / "recipes" / "multi30k.py"), "--output_dir", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("multi30k.py: error:")]
    assert len(errors) == 1 and len(lines) <= 2, lines
    assert "bentrevett/multi30k" in errors[0] and "--data_dir" in errors[0]
    assert "train.en" in errors[0] and "val.de" in errors[0]
    assert not (tmp_path / "out").exists()  # nothing was started
