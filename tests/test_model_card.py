"""Model card: Hub YAML metadata (language, tags, datasets, model-index) and a truthful optimizer section."""

import pytest
import yaml

from fngd_hf.model_card import build_model_card, write_model_card

RESULTS = {"test_2016_flickr": {"bleu": 35.123, "chrf": 61.0}, "test_2017_mscoco": {"bleu": 25.5, "chrf": 52.25}}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_metadata(tmp_path):
    path = write_model_card(
        tmp_path, model_name="me/m30k", source_lang="en", target_lang="de", results=RESULTS,
        optimizer_settings={"optimizer": "fngd", "fngd_damping": 0.001, "betas": [0.9, 0.999]},
        model_settings={"preset": "small"}, training_settings={"num_train_epochs": 3},
        metric_signatures={"bleu": "nrefs:1|tok:13a"},
    )
    assert path.name == "README.md"
    text = path.read_text(encoding="utf-8")
    meta = front_matter(text)
    assert meta["language"] == ["en", "de"]
    assert {"translation", "fngd"} <= set(meta["tags"])
    assert meta["datasets"] == ["bentrevett/multi30k"]
    assert set(meta["metrics"]) == {"bleu", "chrf"}
    entries = meta["model-index"][0]["results"]
    scores = {(e["dataset"]["split"], m["type"]): m["value"] for e in entries for m in e["metrics"]}
    assert scores == {("test_2016_flickr", "bleu"): 35.12, ("test_2016_flickr", "chrf"): 61.0,
                      ("test_2017_mscoco", "bleu"): 25.5, ("test_2017_mscoco", "chrf"): 52.25}
    assert all(e["task"]["type"] == "translation" for e in entries)
    assert "Optimizer used: **FNGD" in text and "| `fngd_damping` | `0.001` |" in text
    assert "| test_2017_mscoco | 25.50 | 52.25 |" in text


def test_card_names_the_optimizer_actually_used():
    card = build_model_card(model_name="x", source_lang="de", target_lang="en", results=RESULTS,
                            optimizer_settings={"optimizer": "adamw", "lr": 5e-4})
    assert "Optimizer used: **AdamW**" in card.content
    assert "FNGD" not in card.content.split("## Optimizer")[1].split("## Usage")[0]
    meta = front_matter(card.content)
    assert meta["language"] == ["de", "en"] and "adamw" in meta["tags"] and "fngd" in meta["tags"]


def test_card_errors():
    kwargs = dict(model_name="x", source_lang="en", target_lang="de")
    with pytest.raises(ValueError, match="optimizer"):
        build_model_card(results=RESULTS, optimizer_settings={"lr": 1}, **kwargs)
    untested = build_model_card(results={}, optimizer_settings={"optimizer": "kfac"}, **kwargs)  # no test split
    assert "model-index" not in front_matter(untested.content) and "No test set was scored" in untested.content
    assert "Optimizer used: **K-FAC" in untested.content
    with pytest.raises(ValueError, match="keys from"):
        build_model_card(results={"test": {"ter": 1.0}}, optimizer_settings={"optimizer": "sgd"}, **kwargs)
    with pytest.raises(ValueError, match="number"):
        build_model_card(results={"test": {"bleu": "high"}}, optimizer_settings={"optimizer": "sgd"}, **kwargs)
