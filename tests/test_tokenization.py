"""Joint BPE tokenizer: special tokens, exact detokenization, save/reload offline."""

import random

import datasets
import pytest
from multi30k_fixtures import synthetic_pair
from transformers import AutoTokenizer

from fngd_hf.translation.tokenization import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

SENTENCES = [
    "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    "A man in an orange hat starring at something.",
    '"Zwei männliche Personen spielen in einer \tWasserfontäne."',
    "Ünïcödé ☃ — never seen: ß, é, 日本.",
    "Spaces  inside   stay.",
]


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    pairs = [synthetic_pair(rng) for _ in range(200)]
    train = datasets.Dataset.from_dict({"en": [e for e, _ in pairs] + SENTENCES[1:2], "de": [d for _, d in pairs] + SENTENCES[:1]})
    return train_tokenizer(train, ["en", "de"], vocab_size=400)


def test_special_tokens(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == SPECIAL_TOKENS
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token) == ("<pad>", "</s>", "<unk>", "<s>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert len(tokenizer) <= 400


def test_every_sequence_ends_with_eos(tokenizer):
    assert tokenizer("Ein Hund.").input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer(text_target="Ein Hund.").input_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("sentence", SENTENCES)
def test_decode_gives_back_the_text(tokenizer, sentence):
    ids = tokenizer(sentence).input_ids
    assert tokenizer.unk_token_id not in ids  # byte-level: no unknowns even for unseen characters
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence


def test_save_and_reload_offline(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.pad_token_id == 0 and reloaded.eos_token_id == 1 and reloaded.bos_token_id == 3
    for sentence in SENTENCES:
        ids = reloaded(sentence).input_ids
        assert ids == tokenizer(sentence).input_ids
        assert reloaded.decode(ids, skip_special_tokens=True) == sentence
    assert load_tokenizer(str(tmp_path)).eos_token_id == 1


def test_bad_arguments():
    train = datasets.Dataset.from_dict({"en": ["a"], "de": ["b"]})
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(train, ["en", "de"], vocab_size=100)
    with pytest.raises(ValueError, match="column 'fr'"):
        train_tokenizer(train, ["fr"], vocab_size=300)
    with pytest.raises(ValueError, match="at least one"):
        train_tokenizer(train, [], vocab_size=300)
