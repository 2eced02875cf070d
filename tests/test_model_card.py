"""Model card: Hub YAML metadata (language, tags, datasets, model-index) and a truthful text: what was
evaluated, where the data came from, the shuffled-source check, readable optimizer settings, no paths."""

import pytest
import yaml

from fngd_hf.translation.model_card import absolute_paths, build_model_card, write_model_card

RESULTS = {"test_2016_flickr": {"bleu": 35.123, "chrf": 61.0}, "test_2017_mscoco": {"bleu": 25.5, "chrf": 52.25}}
# test_2016_flickr: the first 500 of 1,000 sentences, greedy; test_2017_mscoco: all of it, beam 4.
EVALUATED = {"test_2016_flickr": {"sentences": 500, "total": 1000, "num_beams": 1},
             "test_2017_mscoco": {"sentences": 461, "total": 461, "num_beams": 4}}
FNGD_SETTINGS = {"optimizer": "fngd", "class": "fngd_hf.fngd.FNGD", "damping": "0.1 (relative)",
                 "momentum": 0.9, "trust ratio": 1.0}
PASSED = {"ran": True, "passed": True, "source_gap": 2.5, "min_gap": 0.05}
FAILED = {"ran": True, "passed": False, "source_gap": 0.004, "min_gap": 0.05}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def card(**overrides):
    kwargs = dict(model_name="me/m30k", source_lang="en", target_lang="de", results=RESULTS, evaluated=EVALUATED,
                  optimizer_settings=FNGD_SETTINGS, source_check=PASSED)
    kwargs.update(overrides)
    return build_model_card(**kwargs).content


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n")[1].split("\n## ")[0]


def test_card_metadata(tmp_path):
    path = write_model_card(
        tmp_path, model_name="me/m30k", source_lang="en", target_lang="de", results=RESULTS, evaluated=EVALUATED,
        optimizer_settings=FNGD_SETTINGS, dataset_id="bentrevett/multi30k", model_settings={"preset": "small"},
        training_settings={"epochs": 3}, metric_signatures={"bleu": "nrefs:1|tok:13a"}, source_check=PASSED,
    )
    assert path.name == "README.md"
    text = path.read_text(encoding="utf-8")
    meta = front_matter(text)
    assert meta["language"] == ["en", "de"]
    assert {"translation", "fngd"} <= set(meta["tags"]) and "failed-source-check" not in meta["tags"]
    assert meta["datasets"] == ["bentrevett/multi30k"]
    assert set(meta["metrics"]) == {"bleu", "chrf"}
    entries = meta["model-index"][0]["results"]
    scores = {(e["dataset"]["split"], m["type"]): m["value"] for e in entries for m in e["metrics"]}
    # The 500-sentence subset is named as one, never as the whole split.
    assert scores == {("test_2016_flickr[:500]", "bleu"): 35.12, ("test_2016_flickr[:500]", "chrf"): 61.0,
                      ("test_2017_mscoco", "bleu"): 25.5, ("test_2017_mscoco", "chrf"): 52.25}
    assert all(e["task"]["type"] == "translation" and e["dataset"]["type"] == "bentrevett/multi30k" for e in entries)
    names = {e["dataset"]["split"]: e["dataset"]["name"] for e in entries}
    assert names["test_2016_flickr[:500]"] == "Multi30K test_2016_flickr (first 500 of 1000 sentences)"
    assert names["test_2017_mscoco"] == "Multi30K test_2017_mscoco"
    assert "Optimizer used: **FNGD" in text and "| damping | 0.1 (relative) |" in text
    evaluation = section(text, "Evaluation")
    assert "| test_2016_flickr | first 500 of 1,000 | 1 | 35.12 | 61.00 |" in evaluation
    assert "| test_2017_mscoco | all 461 | 4 | 25.50 | 52.25 |" in evaluation
    assert "Shuffled-source check: **passed**" in evaluation
    assert "the Hub dataset [`bentrevett/multi30k`]" in text


def test_local_data_is_called_local_files_and_never_a_hub_dataset():
    text = card(dataset_id=None)
    meta = front_matter(text)
    assert "datasets" not in meta and "bentrevett" not in text
    assert "Data: local files" in text
    assert all(e["dataset"]["name"].endswith(", local files") for e in meta["model-index"][0]["results"])


def test_validation_line_says_what_was_evaluated():
    text = card(validation={"sentences": 500, "total": 1014, "num_beams": 4, "loss": 2.134, "bleu": 31.06, "chrf": None})
    assert "Validation (`val`, first 500 of 1,014 sentences, 4 beams): loss 2.13, BLEU 31.06." in text
    with pytest.raises(ValueError, match="validation"):
        card(validation={"sentences": 600, "total": 500, "num_beams": 1, "loss": 2.0})


def test_failed_source_check_is_on_top_of_the_card_and_in_the_tags():
    text = card(source_check=FAILED)
    body = text.split("---\n", 2)[2]
    assert body.split("\n\n")[1].startswith("> **Warning: this checkpoint failed the shuffled-source check.**")
    assert "Shuffled-source check: **failed**" in section(text, "Evaluation") and "0.004" in text
    assert "failed-source-check" in front_matter(text)["tags"]
    not_run = card(source_check={"ran": False, "passed": None})
    assert "Warning" not in not_run and "was not run" in not_run


def test_usage_is_the_stock_transformers_way():
    text = card()
    usage = section(text, "Usage")
    assert 'AutoTokenizer.from_pretrained("me/m30k")' in usage
    assert 'AutoModelForSeq2SeqLM.from_pretrained("me/m30k")' in usage and "model.generate(**batch)" in usage
    assert "trust_remote_code" not in usage  # no pipeline file shipped, none offered
    with_pipeline = section(card(with_pipeline=True), "Usage")
    assert 'pipeline(model="me/m30k", trust_remote_code=True)' in with_pipeline
    assert "Ein Hund" in section(card(source_lang="de", target_lang="en"), "Usage")


def test_optimizer_settings_are_a_short_readable_table():
    settings = {"optimizer": "adamw", "learning rate": "0.002 peak, linear schedule", "betas": [0.9, 0.999], "eps": 1e-8}
    optimizer = section(card(optimizer_settings=settings), "Optimizer")
    assert "Optimizer used: **AdamW**" in optimizer and "FNGD" not in optimizer
    assert "| betas | 0.9, 0.999 |" in optimizer and "| eps | 1e-08 |" in optimizer
    assert "| learning rate | 0.002 peak, linear schedule |" in optimizer
    with pytest.raises(ValueError, match="mapping"):  # a per-group dump is refused
        card(optimizer_settings={"optimizer": "fngd", "groups": {"fngd": {"lr": 0.01}, "adamw": {"lr": 0.01}}})


@pytest.mark.parametrize("leak", ["/home/me/data/multi30k", "~/runs/m30k", "C:\\Users\\me\\m30k"])
def test_no_absolute_path_reaches_a_card(leak):
    assert absolute_paths(f"data from {leak}.") != []
    with pytest.raises(ValueError, match="absolute path"):
        card(training_settings={"data": f"files in {leak}"})
    with pytest.raises(ValueError, match="absolute path"):
        card(model_name=leak)
    # Hub ids, URLs and relative names are not paths.
    assert absolute_paths(card(dataset_id="bentrevett/multi30k", model_name="me/m30k")) == []
    assert absolute_paths("see https://github.com/multi30k/dataset (data/task1/raw), 2.5 nats/token") == []


def test_card_errors():
    kwargs = dict(model_name="x", source_lang="en", target_lang="de")
    with pytest.raises(ValueError, match="optimizer"):
        build_model_card(results=RESULTS, evaluated=EVALUATED, optimizer_settings={"lr": 1}, **kwargs)
    untested = build_model_card(results={}, optimizer_settings={"optimizer": "kfac"}, **kwargs)  # no test split
    assert "model-index" not in front_matter(untested.content) and "No test split was scored" in untested.content
    assert "Optimizer used: **K-FAC" in untested.content
    with pytest.raises(ValueError, match="keys from"):
        build_model_card(results={"test": {"ter": 1.0}}, optimizer_settings={"optimizer": "sgd"}, **kwargs)
    with pytest.raises(ValueError, match="number"):
        build_model_card(results={"test": {"bleu": "high"}}, optimizer_settings={"optimizer": "sgd"}, **kwargs)
    with pytest.raises(ValueError, match="how many sentences"):  # scores without what gave them
        build_model_card(results=RESULTS, optimizer_settings={"optimizer": "sgd"}, **kwargs)
    with pytest.raises(ValueError, match="sentences <= total"):
        build_model_card(results={"test_2016_flickr": {"bleu": 1.0}}, optimizer_settings={"optimizer": "sgd"},
                         evaluated={"test_2016_flickr": {"sentences": 0, "total": 10, "num_beams": 1}}, **kwargs)
