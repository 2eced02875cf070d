"""End to end: run recipes/multi30k.py on a few hundred pairs, reload its output offline,
check results.json and the model card; a collapsed run; push to a fake Hub; resume; config file + flags."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from multi30k_fixtures import REAL_DATA, REPO, real_data_available, write_synthetic_corpus
from recipe_module import RECIPE, load_recipe_module
from transformers import pipeline

from fngd_hf.translation.model_card import absolute_paths
from fngd_hf.translation.pipeline import load_translator, translate  # also registers pipeline("translation")

# One epoch on 200 pairs leaves a tiny model that ignores its source (the shuffled-source check
# says so), so these plumbing runs keep exit code 0 with --fail_on_collapse False; the collapse
# itself is tested in test_collapsed_run_fails_loudly_and_keeps_everything.
TINY_ARGS = [
    "--preset", "tiny", "--max_train_samples", "200", "--max_eval_samples", "16", "--max_predict_samples", "16",
    "--vocab_size", "400", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16",
    "--max_generation_length", "16", "--beam_size", "2", "--learning_rate", "3e-3",
    "--use_cpu", "--disable_tqdm", "True", "--logging_steps", "5",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if real_data_available():
        return REAL_DATA.resolve()
    return write_synthetic_corpus(tmp_path_factory.mktemp("multi30k"))


def expected_test_splits(data_dir):
    stems = ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr")
    return {s for s in stems if (data_dir / f"{s}.de").exists() or (data_dir / f"{s}.de.gz").exists()}


def run_recipe(output_dir, data_dir, optimizer, *extra, returncode=0):
    """Run the recipe as a user would; returns (output_dir, stdout + stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "TOKENIZERS_PARALLELISM": "false",
           # tiny model: one thread is as fast, and spinning OpenMP threads crawl when the CPUs are shared
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(RECIPE), "--output_dir", str(output_dir), "--data_dir", str(data_dir),
               "--optimizer", optimizer, "--num_train_epochs", "1", *TINY_ARGS, *extra]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == returncode, done.stdout[-3000:] + done.stderr[-5000:]
    return output_dir, done.stdout + done.stderr


def card_meta(output_dir) -> dict:
    return yaml.safe_load((output_dir / "README.md").read_text(encoding="utf-8").split("---\n")[1])


def check_card_is_truthful(output_dir, data_dir, results):
    """What was evaluated, where the data came from, no local paths, one training time."""
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert absolute_paths(card) == [] and str(data_dir) not in card and str(output_dir) not in card
    assert "local files" in card and "bentrevett" not in card and "datasets" not in card_meta(output_dir)
    for split, scores in results["test"].items():
        assert scores["num_beams"] == 2
        if scores["examples"] < scores["total_examples"]:  # a subset is named as one, never as the split
            assert f"| {split} | first {scores['examples']} of {scores['total_examples']:,} | 2 |" in card
        else:
            assert f"| {split} | all {scores['total_examples']:,} | 2 |" in card
    entries = card_meta(output_dir)["model-index"][0]["results"]
    labels = {e["dataset"]["split"] for e in entries}
    assert labels == {s if v["examples"] == v["total_examples"] else f"{s}[:{v['examples']}]"
                      for s, v in results["test"].items()}
    assert "AutoModelForSeq2SeqLM.from_pretrained" in card and "model.generate(**batch)" in card
    # One definition of the training time, in results.json, the card and the printed line.
    seconds = results["train"]["train_seconds"]
    assert "train_runtime" not in results["train"] and "train_seconds" not in results["validation"]
    assert results["definitions"]["train_seconds"] in card
    assert f"| training time | {seconds:.0f} s (" in card
    return card


def check_output(output_dir, data_dir, optimizer, log=""):
    names = {p.name for p in output_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "README.md", "results.json"} <= names
    results = json.loads((output_dir / "results.json").read_text())
    splits = expected_test_splits(data_dir)
    assert set(results["test"]) == splits
    for split in splits:
        assert 0.0 <= results["test"][split]["bleu"] <= 100.0 and 0.0 <= results["test"][split]["chrf"] <= 100.0
        lines = (output_dir / f"predictions_{split}.de").read_text(encoding="utf-8").split("\n")
        assert len(lines) - 1 == results["test"][split]["examples"] <= 16  # one line per hypothesis
    validation = results["validation"]
    assert {"eval_loss", "eval_bleu", "eval_chrf", "eval_source_gap", "eval_source_collapsed"} <= set(validation)
    assert (validation["eval_examples"], validation["eval_num_beams"]) == (16, 2)
    assert results["optimizer"] == optimizer and results["data"]["source"] == "local files"

    meta = card_meta(output_dir)
    assert {"translation", "fngd", optimizer} <= set(meta["tags"]) and meta["language"] == ["en", "de"]
    check_card_is_truthful(output_dir, data_dir, results)
    printed = re.search(r"training took ([0-9.]+) s", log)
    assert printed and float(printed.group(1)) == pytest.approx(results["train"]["train_seconds"], abs=0.05)

    model, tokenizer = load_translator(str(output_dir))
    outputs = translate(model, tokenizer, ["A dog runs.", "Two men are outside."], max_length=16)
    assert len(outputs) == 2 and all(isinstance(text, str) for text in outputs)
    piped = pipeline("translation", model=str(output_dir), max_length=16)(["A dog runs.", "Two men are outside."])
    assert [row["translation_text"] for row in piped] == outputs
    return results


def test_recipe_adamw(tmp_path, data_dir):
    output_dir, log = run_recipe(tmp_path / "adamw", data_dir, "adamw", "--fail_on_collapse", "False")
    check_output(output_dir, data_dir, "adamw", log)
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert "Optimizer used: **AdamW**" in card and "| betas | 0.9/0.999 |" in card


@pytest.mark.parametrize(
    ("optimizer", "learning_rate"),
    [("adamw", "5e-3"),
     ("fngd", "1e-2"),
     ("fngd", "muon")],
)
def test_recipe_learns_a_toy_language_pair(tmp_path, optimizer, learning_rate):
    """On a word-for-word toy corpus a few epochs give high BLEU, and the shuffled-source check sees
    a model that uses its source (not collapsed)."""
    data_dir = write_synthetic_corpus(tmp_path / "toy", sizes={"train": 600, "val": 32, "test_2016_flickr": 32})
    # FNGD at the rates this toy was tuned at (1e-2, AdamW part too): "muon", the default step length; 1e-2, the
    # trust region's step.
    tuned = ["--learning_rate", "1e-2" if learning_rate == "muon" else learning_rate, "--warmup_steps", "20"]
    if optimizer == "fngd":
        tuned += ["--fngd_adamw_lr", "1e-2"]
    if optimizer == "fngd" and learning_rate == "1e-2":
        tuned += ["--fngd_step_length", "trust_region", "--fngd_trust_ratio", "1.0"]
    output_dir, _ = run_recipe(tmp_path / "toy_out", data_dir, optimizer, "--num_train_epochs", "8", "--vocab_size", "300",
                               "--max_train_samples", "600", *tuned,
                               "--max_generation_length", "40", "--eval_strategy", "no", "--save_strategy", "no")
    results = json.loads((output_dir / "results.json").read_text())
    assert results["validation"]["eval_source_collapsed"] == 0.0
    assert results["validation"]["eval_source_gap"] > 0.5
    assert results["source_check"]["passed"] is True  # and so the run exited 0 with fail_on_collapse on
    assert results["test"]["test_2016_flickr"]["bleu"] > 50
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert "Shuffled-source check: **passed**" in card and "failed the shuffled-source check" not in card
    assert "failed-source-check" not in card_meta(output_dir)["tags"]


def test_recipe_fngd(tmp_path, data_dir):
    output_dir, log = run_recipe(tmp_path / "fngd", data_dir, "fngd", "--fail_on_collapse", "False")
    check_output(output_dir, data_dir, "fngd", log)
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert "Optimizer used: **FNGD" in card and "| class | fngd_hf.fngd.FNGD |" in card
    optimizer_section = card.split("## Optimizer")[1].split("## Training")[0]
    assert "| damping | 10 (relative" in optimizer_section and "| trust ratio | off |" in optimizer_section
    assert "| step length | muon: Muon's orthogonalised" in optimizer_section
    assert "[" not in optimizer_section and "{" not in optimizer_section  # no per-group dumps
    assert len(optimizer_section.splitlines()) < 25


def test_collapsed_run_fails_loudly_and_keeps_everything(tmp_path, data_dir):
    """A model that ignores its source (here: barely trained) ends the run with exit code 3 and one message
    saying what to change; the model, results.json and a card saying it failed are all written."""
    output_dir, log = run_recipe(tmp_path / "collapsed", data_dir, "adamw", "--max_steps", "1", "--learning_rate", "1e-9",
                                 "--save_strategy", "no", returncode=3)
    errors = [line for line in log.splitlines() if line.startswith("multi30k.py: error:")]
    assert len(errors) == 1 and "Traceback" not in log
    assert "ignores its source" in errors[0] and "--learning_rate" in errors[0]
    assert "--per_device_train_batch_size" in errors[0] and "--fail_on_collapse False" in errors[0]
    results = check_output(output_dir, data_dir, "adamw", log)  # every file is there
    assert results["source_check"]["ran"] and results["source_check"]["passed"] is False
    assert results["source_check"]["source_gap"] < results["source_check"]["min_gap"]
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert card.split("\n# ")[1].split("\n\n")[1].startswith("> **Warning: this checkpoint failed the shuffled-source check.**")
    assert "Shuffled-source check: **failed**" in card and "failed-source-check" in card_meta(output_dir)["tags"]


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls, never touches the network."""

    calls = []

    def __init__(self, token=None, **_):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None, **_):
        FakeHfApi.calls.append(("create_repo", repo_id, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **_):
        files = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
        FakeHfApi.calls.append(("upload_folder", repo_id, files, ignore_patterns))
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_push_to_hub_and_resume_in_process(tmp_path, data_dir, monkeypatch, caplog):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    recipe = load_recipe_module()
    output_dir = tmp_path / "push"
    # --tokenizer_name: an existing tokenizer is used as is instead of training one.
    from fngd_hf.translation.data import load_multi30k
    from fngd_hf.translation.tokenization import train_tokenizer

    given = train_tokenizer(load_multi30k(data_dir=data_dir, max_train_samples=100)["train"], ["en", "de"], vocab_size=350)
    given.save_pretrained(tmp_path / "given_tokenizer")
    common = ["--tokenizer_name", str(tmp_path / "given_tokenizer"), "--output_dir", str(output_dir), "--data_dir", str(data_dir), "--optimizer", "adamw", *TINY_ARGS,
              "--fail_on_collapse", "False",
              "--max_train_samples", "64", "--max_predict_samples", "4", "--max_eval_samples", "4",
              "--max_generation_length", "6", "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "2"]
    recipe.main([*common, "--max_steps", "2", "--do_eval", "False"])
    assert (output_dir / "checkpoint-2").is_dir()
    assert json.loads((output_dir / "config.json").read_text())["vocab_size"] == len(given)
    assert recipe.find_checkpoint(recipe.parse_args([*common, "--max_steps", "3"])[2]) == str(output_dir / "checkpoint-2")

    # A second run with more steps resumes from checkpoint-2 and pushes the final folder.
    with caplog.at_level("INFO", logger="multi30k"):
        results = recipe.main([*common, "--max_steps", "3", "--do_eval", "False", "--push_to_hub", "True",
                               "--hub_model_id", "me/m30k-tiny", "--hub_token", "fake"])
    assert f"resuming from {output_dir / 'checkpoint-2'}" in caplog.text
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert results["train"]["epoch"] > 0
    assert FakeHfApi.calls[0] == ("create_repo", "me/m30k-tiny", True)
    kind, repo, files, ignore = FakeHfApi.calls[1]
    assert (kind, repo) == ("upload_folder", "me/m30k-tiny")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "translation_pipeline.py"} <= set(files)
    assert any(pattern.startswith("checkpoint-") for pattern in ignore)
    meta = yaml.safe_load((output_dir / "README.md").read_text(encoding="utf-8").split("---\n")[1])
    assert meta["model-index"][0]["name"] == "me/m30k-tiny"


def test_test_splits_are_chosen_and_checked():
    import datasets

    recipe = load_recipe_module()
    empty = datasets.Dataset.from_dict({"en": [], "de": []})
    raw = datasets.DatasetDict(train=empty, validation=empty, test_2016_flickr=empty, test_2017_mscoco=empty)
    assert recipe.chosen_test_splits(raw, None) == ["test_2016_flickr", "test_2017_mscoco"]
    assert recipe.chosen_test_splits(raw, ["test_2017_mscoco"]) == ["test_2017_mscoco"]
    with pytest.raises(ValueError, match="test_2018_flickr"):
        recipe.chosen_test_splits(raw, ["test_2018_flickr"])


def test_config_file_with_flag_overrides(tmp_path):
    recipe = load_recipe_module()
    config = tmp_path / "config.yaml"
    config.write_text("output_dir: out\npreset: tiny\nlearning_rate: 5e-4\noptimizer: adamw\nd_model: 64\n")
    model_args, data_args, training_args = recipe.parse_args([str(config), "--learning_rate", "1e-3", "--source_lang", "de", "--target_lang", "en"])
    assert model_args.preset == "tiny" and model_args.overrides() == {"d_model": 64}
    assert training_args.learning_rate == pytest.approx(1e-3) and training_args.output_dir == "out"
    assert (data_args.source_lang, data_args.target_lang) == ("de", "en")
    assert training_args.predict_with_generate and str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) == "epoch"
    json_config = tmp_path / "config.json"
    json_config.write_text(json.dumps({"output_dir": "out", "optimizer": "sgd", "num_beams_typo": 3}))
    with pytest.raises(ValueError, match="num_beams_typo"):
        recipe.parse_args([str(json_config)])


def test_learning_rate_defaults_to_the_methods_own(tmp_path):
    recipe = load_recipe_module()
    DEFAULT_LEARNING_RATES = recipe.DEFAULT_LEARNING_RATES  # recipes/learning_rates.py
    out = str(tmp_path / "o")
    for optimizer in ("fngd", "adamw", "kfac"):
        _, _, args = recipe.parse_args(["--output_dir", out, "--optimizer", optimizer])
        assert args.learning_rate == DEFAULT_LEARNING_RATES[optimizer]
    _, _, args = recipe.parse_args(["--output_dir", out, "--optimizer", "fngd", "--learning_rate", "0.3"])
    assert args.learning_rate == 0.3
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"output_dir": out, "learning_rate": 0.02}))
    _, _, args = recipe.parse_args([str(config)])
    assert args.learning_rate == 0.02


def test_paper_setting_by_name_matches_the_benchmark_variant(tmp_path):
    """recipes/configs/fngd_paper.yaml and convergence.py's "paper" variant are the same setting."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from convergence import VARIANT_FLAGS

    recipe = load_recipe_module()
    out = str(tmp_path / "o")
    _, _, by_name = recipe.parse_args([str(REPO / "recipes" / "configs" / "fngd_paper.yaml"), "--output_dir", out])
    _, _, by_flags = recipe.parse_args(["--output_dir", out, "--optimizer", "fngd", "--learning_rate", "0.01",
                                        *VARIANT_FLAGS["paper"]])
    _, _, default = recipe.parse_args(["--output_dir", out, "--optimizer", "fngd"])
    fields = ("optimizer", "learning_rate", "fngd_damping", "fngd_damping_mode", "fngd_share_coefficients",
              "fngd_share_by", "fngd_scale_mode", "fngd_trust_ratio", "max_grad_norm", "lr_scheduler_type")
    assert {f: getattr(by_name, f) for f in fields} == {f: getattr(by_flags, f) for f in fields}
    assert by_name.fngd_trust_ratio is None and by_name.max_grad_norm == 0.0 and by_name.fngd_damping == 1.0
    assert str(getattr(by_name.lr_scheduler_type, "value", by_name.lr_scheduler_type)) == "constant"
    # and the package defaults are a different setting (the test can fail)
    assert default.fngd_trust_ratio == "auto" and default.fngd_damping is None  # FNGD picks it by step length
