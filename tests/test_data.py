"""Multi30K loading: raw files (plain and .gz), Hub layout, errors, and the real data when present."""

import datasets
import pytest
from multi30k_fixtures import REAL_DATA, real_data_available, write_lines

from fngd_hf.translation import data
from fngd_hf.translation.data import load_multi30k, read_lines


def make_corpus(folder, tests=("test_2016_flickr",), gz=()):
    """train (3 pairs), val (2 pairs) and the given test sets; stems in ``gz`` are gzipped."""
    folder.mkdir(parents=True, exist_ok=True)
    content = {
        "train": (["  A dog runs. ", "Two\tmen.", "A cat."], ["Ein Hund läuft.", "Zwei\tMänner. ", "Eine Katze."]),
        "val": (["A man.", "A boy."], ["Ein Mann.", "Ein Junge."]),
    }
    for stem in tests:
        content[stem] = (["A girl."], ["Ein Mädchen."])
    for stem, (en, de) in content.items():
        write_lines(folder / f"{stem}.en", en, compress=stem in gz)
        write_lines(folder / f"{stem}.de", de, compress=stem in gz)
    return folder


def test_raw_files_load_into_named_splits(tmp_path):
    dataset = load_multi30k(data_dir=make_corpus(tmp_path, tests=("test_2016_flickr", "test_2018_flickr")))
    assert list(dataset) == ["train", "validation", "test_2016_flickr", "test_2018_flickr"]
    assert dataset["train"].column_names == ["en", "de"]
    assert dataset["train"]["en"] == ["A dog runs.", "Two\tmen.", "A cat."]  # stripped, tab kept
    assert dataset["train"]["de"][1] == "Zwei\tMänner."
    assert dataset["validation"].num_rows == 2
    assert data.test_split_names(dataset) == ["test_2016_flickr", "test_2018_flickr"]


def test_gzip_files_read_like_plain_ones(tmp_path):
    plain = load_multi30k(data_dir=make_corpus(tmp_path / "plain"))
    packed = load_multi30k(data_dir=make_corpus(tmp_path / "gz", gz=("train", "val", "test_2016_flickr")))
    for split in plain:
        assert plain[split].to_dict() == packed[split].to_dict()


def test_lines_split_only_on_newline(tmp_path):
    path = tmp_path / "x.de"
    path.write_text("a\x0cb\u2028c\n\n  d\t e \n", encoding="utf-8")
    assert read_lines(path) == ["a\x0cb\u2028c", "", "d\t e"]


def test_both_directions(tmp_path):
    folder = make_corpus(tmp_path)
    de_en = load_multi30k(data_dir=folder, source_lang="de", target_lang="en")
    assert de_en["train"].column_names == ["de", "en"]
    assert de_en["train"][0] == {"de": "Ein Hund läuft.", "en": "A dog runs."}


def test_mismatched_line_counts_name_the_files(tmp_path):
    folder = make_corpus(tmp_path)
    write_lines(folder / "val.de", ["Ein Mann."])
    with pytest.raises(ValueError, match=r"val\.en has 2 lines.*val\.de has 1"):
        load_multi30k(data_dir=folder)


def test_missing_required_file_is_named(tmp_path):
    folder = make_corpus(tmp_path)
    (folder / "val.de").unlink()
    with pytest.raises(ValueError, match=r"missing file .*val\.de"):
        load_multi30k(data_dir=folder)


def test_absent_language_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing file .*train\.fr"):
        load_multi30k(data_dir=make_corpus(tmp_path), source_lang="fr", target_lang="de")


def test_one_sided_test_set_is_an_error(tmp_path):
    folder = make_corpus(tmp_path)
    write_lines(folder / "test_2017_mscoco.en", ["A bus."])
    with pytest.raises(ValueError, match=r"test_2017_mscoco\.de"):
        load_multi30k(data_dir=folder)


def test_empty_file_is_named(tmp_path):
    folder = make_corpus(tmp_path)
    (folder / "train.en").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.en has no lines"):
        load_multi30k(data_dir=folder)


def test_bad_arguments(tmp_path):
    folder = make_corpus(tmp_path)
    with pytest.raises(ValueError, match="differ"):
        load_multi30k(data_dir=folder, source_lang="en", target_lang="en")
    with pytest.raises(ValueError, match="not a directory"):
        load_multi30k(data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="positive"):
        load_multi30k(data_dir=folder, max_train_samples=0)
    with pytest.raises(ValueError, match="dataset_name or data_dir"):
        load_multi30k(dataset_name=None)


def test_sample_caps_keep_order(tmp_path):
    dataset = load_multi30k(data_dir=make_corpus(tmp_path), max_train_samples=2, max_eval_samples=1, max_test_samples=5)
    assert dataset["train"]["en"] == ["A dog runs.", "Two\tmen."]
    assert dataset["validation"]["en"] == ["A man."]
    assert dataset["test_2016_flickr"].num_rows == 1


def test_hub_layout_renames_test_split(monkeypatch):
    def fake_load_dataset(name, cache_dir=None):
        assert name == "bentrevett/multi30k"
        split = lambda n: datasets.Dataset.from_dict({"en": ["A dog."] * n, "de": ["Ein Hund."] * n})  # noqa: E731
        return datasets.DatasetDict({"train": split(4), "validation": split(2), "test": split(3)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_multi30k(max_train_samples=3)
    assert list(dataset) == ["train", "validation", "test_2016_flickr"]
    assert dataset["train"].num_rows == 3
    with pytest.raises(ValueError, match="language 'fr' absent"):
        load_multi30k(source_lang="fr")


def test_unreachable_hub_dataset_is_one_clear_error(monkeypatch):
    def offline(name, cache_dir=None):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)\nmore lines of detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataUnavailableError) as error:
        load_multi30k()
    assert str(error.value) == ("could not load the Hub dataset 'bentrevett/multi30k': "
                                "Couldn't reach 'bentrevett/multi30k' on the Hub (OfflineModeIsEnabled)")
    assert isinstance(error.value, ValueError)


def test_missing_files_and_what_a_folder_must_hold(tmp_path):
    folder = make_corpus(tmp_path)
    (folder / "train.de").unlink()
    with pytest.raises(data.DataUnavailableError, match=r"missing file .*train\.de \(or train\.de\.gz\)"):
        load_multi30k(data_dir=folder)
    text = data.expected_files("de", "en")
    assert text.startswith("train.de, train.en, val.de, val.en (required)")
    assert all(f"{stem}.*" in text for stem in data.TEST_SETS)


def test_cap_splits_keeps_the_full_sizes_apart(tmp_path):
    full = load_multi30k(data_dir=make_corpus(tmp_path, tests=("test_2016_flickr", "test_2018_flickr")))
    capped = data.cap_splits(full, max_train_samples=1, max_eval_samples=5, max_test_samples=1)
    assert {name: split.num_rows for name, split in capped.items()} == {
        "train": 1, "validation": 2, "test_2016_flickr": 1, "test_2018_flickr": 1}
    assert full["train"].num_rows == 3  # the caller still knows what it left out


@pytest.mark.skipif(not real_data_available(), reason="real Multi30K not present")
def test_real_multi30k():
    dataset = load_multi30k(data_dir=REAL_DATA)
    sizes = {name: split.num_rows for name, split in dataset.items()}
    assert sizes == {"train": 29000, "validation": 1014, "test_2016_flickr": 1000, "test_2017_flickr": 1000,
                     "test_2017_mscoco": 461, "test_2018_flickr": 1071}
    assert "\t" in dataset["train"][7365]["de"]  # train.de line 7366 keeps its TAB
    assert dataset["train"][0]["en"] == "Two young, White males are outside near many bushes."
    for split in dataset.values():
        for column in ("en", "de"):
            assert all(text and text == text.strip() for text in split[column])
