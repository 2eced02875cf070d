"""Model presets and the saved model's offline reload (Auto classes, translate helper, pipeline)."""

import random

import datasets
import pytest
import torch
from multi30k_fixtures import synthetic_pair
from transformers import AutoModelForSeq2SeqLM, GenerationConfig, MarianMTModel, pipeline

from fngd_hf.translation.models import PRESETS, build_model, resolve_shape
from fngd_hf.translation.pipeline import load_translator, translate, translation_pipeline_available
from fngd_hf.translation.tokenization import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    pairs = [synthetic_pair(rng) for _ in range(100)]
    return train_tokenizer(datasets.Dataset.from_dict({"en": [e for e, _ in pairs], "de": [d for _, d in pairs]}), ["en", "de"], vocab_size=300)


def test_presets_have_the_documented_shapes():
    assert PRESETS["paper"].d_model == 512 and PRESETS["paper"].ffn_dim == 2048
    assert PRESETS["paper"].attention_heads == 8 and PRESETS["paper"].encoder_layers == PRESETS["paper"].decoder_layers == 6
    assert PRESETS["small"].d_model == 256 and PRESETS["tiny"].d_model == 32


def test_overrides_and_errors():
    shape = resolve_shape("tiny", d_model=64, encoder_layers=1, dropout=None)
    assert (shape.d_model, shape.encoder_layers, shape.dropout) == (64, 1, PRESETS["tiny"].dropout)
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_shape("huge")
    with pytest.raises(ValueError, match="divisible"):
        resolve_shape("tiny", d_model=33)
    with pytest.raises(ValueError, match="unknown model fields"):
        resolve_shape("tiny", width=3)
    with pytest.raises(ValueError, match="dropout"):
        resolve_shape("tiny", dropout=1.5)


def test_build_model_uses_tokenizer_ids(tokenizer):
    model = build_model(tokenizer, "tiny", max_length=20, num_beams=3, seed=0)
    config = model.config
    assert isinstance(model, MarianMTModel)
    assert config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (0, 1, 3)
    assert (config.d_model, config.encoder_ffn_dim, config.encoder_attention_heads) == (32, 64, 2)
    assert model.generation_config.num_beams == 3 and model.generation_config.max_length == 20
    assert model.generation_config.decoder_start_token_id == 3
    batch = tokenizer(["A dog runs."], text_target=["Ein Hund läuft."], return_tensors="pt")
    assert torch.isfinite(model(**batch).loss)


def test_saved_model_reloads_offline(tokenizer, tmp_path):
    model = build_model(tokenizer, "tiny", max_length=12, num_beams=2, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    assert GenerationConfig.from_pretrained(tmp_path).num_beams == 2
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)
    translator, loaded_tokenizer = load_translator(str(tmp_path))
    outputs = translate(translator, loaded_tokenizer, ["A dog runs.", "A man sleeps here."])
    assert len(outputs) == 2 and all(isinstance(text, str) for text in outputs)
    # transformers 5 removed the task; importing fngd_hf registers it again (4.x has its own).
    assert translation_pipeline_available()
    translator_pipeline = pipeline("translation", model=str(tmp_path))
    piped = translator_pipeline(["A dog runs.", "A man sleeps here."])
    assert [row["translation_text"] for row in piped] == outputs
    assert translator_pipeline("A dog runs.") == piped[:1]
    with pytest.raises(ValueError, match="list of strings"):
        translator_pipeline([1, 2])
    with pytest.raises(ValueError, match="list of strings"):
        translate(translator, loaded_tokenizer, "A dog.")
