"""Multi30K (Task 1, English-German) as a ``datasets.DatasetDict``.

Two sources give the same layout (one string column per language):

* the Hub dataset ``bentrevett/multi30k`` (splits train / validation / test, columns ``en``/``de``);
  its ``test`` split is the 2016 Flickr test set, so it is renamed ``test_2016_flickr``;
* a local folder with the official raw files of github.com/multi30k/dataset
  (``train.{lang}``, ``val.{lang}``, ``test_2016_flickr.{lang}`` ..., plain or ``.gz``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import datasets

DEFAULT_DATASET_NAME = "bentrevett/multi30k"

# Raw file stem -> split name. train and val must exist; each test set is optional.
REQUIRED_RAW_SPLITS = {"train": "train", "val": "validation"}
TEST_SETS = ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr")

# Hub split name -> our split name (bentrevett's "test" is test_2016_flickr).
HUB_SPLIT_NAMES = {"train": "train", "validation": "validation", "test": "test_2016_flickr"}
RAW_FILES_URL = "https://github.com/multi30k/dataset (data/task1/raw)"


class DataUnavailableError(ValueError):
    """The data could not be loaded: a missing or broken file, or a Hub dataset out of reach."""


def expected_files(source_lang: str = "en", target_lang: str = "de") -> str:
    """What a raw-file folder must hold, in words, for error messages."""
    tests = ", ".join(f"{stem}.*" for stem in TEST_SETS)
    return (
        f"train.{source_lang}, train.{target_lang}, val.{source_lang}, val.{target_lang} (required) and any of "
        f"{tests} (optional), plain or .gz, as in {RAW_FILES_URL}"
    )


def check_language_pair(source_lang: str, target_lang: str) -> None:
    """Reject empty or identical language codes early, before any file is read."""
    if not source_lang or not target_lang:
        raise ValueError(f"source_lang and target_lang must be non-empty, got {source_lang!r}, {target_lang!r}")
    if source_lang == target_lang:
        raise ValueError(f"source_lang and target_lang must differ, both are {source_lang!r}")


def find_raw_file(data_dir: Path, stem: str, lang: str) -> Path | None:
    """Return ``stem.lang`` or ``stem.lang.gz`` in ``data_dir`` (plain wins), or None."""
    for name in (f"{stem}.{lang}", f"{stem}.{lang}.gz"):
        path = data_dir / name
        if path.is_file():
            return path
    return None


def read_lines(path: str | Path) -> list[str]:
    """Read one sentence per line, stripped.

    Splits on ``\\n`` only: ``str.splitlines`` would also break on form feeds, U+2028 etc.
    Tabs are ordinary characters (train.de line 7366 has one), never a field separator.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        text = handle.read()
    if text.startswith("\ufeff"):  # a BOM is not part of the first sentence
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the newline ending the last line does not start a new one
        lines.pop()
    if not lines:
        raise ValueError(f"{path} has no lines")
    return [line.strip() for line in lines]


def read_parallel(source_path: Path, target_path: Path) -> tuple[list[str], list[str]]:
    """Read two line-aligned files; a length mismatch means the pairs are broken."""
    source, target = read_lines(source_path), read_lines(target_path)
    if len(source) != len(target):
        raise ValueError(
            f"line counts differ: {source_path} has {len(source)} lines, {target_path} has {len(target)}"
        )
    return source, target


def raw_file_or_error(data_dir: Path, stem: str, lang: str) -> Path:
    """Find a file that must exist, with an error naming what was looked for."""
    path = find_raw_file(data_dir, stem, lang)
    if path is None:
        raise DataUnavailableError(f"missing file {data_dir / f'{stem}.{lang}'} (or {stem}.{lang}.gz)")
    return path


def load_raw_multi30k(data_dir: str | Path, source_lang: str = "en", target_lang: str = "de") -> datasets.DatasetDict:
    """Load the official raw files: train, validation, and one split per test set present."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataUnavailableError(f"data_dir {data_dir} is not a directory")
    splits = {}
    for stem, split in REQUIRED_RAW_SPLITS.items():
        src, tgt = read_parallel(raw_file_or_error(data_dir, stem, source_lang), raw_file_or_error(data_dir, stem, target_lang))
        splits[split] = datasets.Dataset.from_dict({source_lang: src, target_lang: tgt})
    for stem in TEST_SETS:
        src_path, tgt_path = find_raw_file(data_dir, stem, source_lang), find_raw_file(data_dir, stem, target_lang)
        if src_path is None and tgt_path is None:
            continue  # test sets are optional (older releases lack 2017/2018)
        if src_path is None or tgt_path is None:
            lang = source_lang if src_path is None else target_lang
            raise DataUnavailableError(f"missing file {data_dir / f'{stem}.{lang}'}: test set {stem} has only one side")
        src, tgt = read_parallel(src_path, tgt_path)
        splits[stem] = datasets.Dataset.from_dict({source_lang: src, target_lang: tgt})
    return datasets.DatasetDict(splits)


def load_hub_multi30k(
    dataset_name: str, source_lang: str, target_lang: str, cache_dir: str | None = None
) -> datasets.DatasetDict:
    """Load a Hub dataset with one column per language and rename its splits to ours."""
    try:
        raw = datasets.load_dataset(dataset_name, cache_dir=cache_dir)
    except Exception as error:  # offline, no network, unknown name: to the caller all mean "not available"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise DataUnavailableError(f"could not load the Hub dataset {dataset_name!r}: {reason}") from error
    renamed = {}
    for split, dataset in raw.items():
        for lang in (source_lang, target_lang):
            if lang not in dataset.column_names:
                raise ValueError(f"language {lang!r} absent from {dataset_name} split {split!r} (columns {dataset.column_names})")
        renamed[HUB_SPLIT_NAMES.get(split, split)] = dataset.select_columns([source_lang, target_lang])
    if "train" not in renamed or "validation" not in renamed:
        raise ValueError(f"{dataset_name} needs train and validation splits, has {sorted(raw)}")
    return datasets.DatasetDict(renamed)


def truncate(dataset: datasets.Dataset, max_samples: int | None) -> datasets.Dataset:
    """Keep the first ``max_samples`` rows (in order, so references stay aligned with files)."""
    if max_samples is None:
        return dataset
    if max_samples <= 0:
        raise ValueError(f"max samples must be positive, got {max_samples}")
    return dataset.select(range(min(max_samples, len(dataset))))


def test_split_names(dataset: datasets.DatasetDict) -> list[str]:
    """Names of the test splits, in their order in the DatasetDict."""
    return [name for name in dataset if name.startswith("test")]


def cap_splits(
    dataset: datasets.DatasetDict,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_test_samples: int | None = None,
) -> datasets.DatasetDict:
    """The first rows of each split: ``max_eval_samples`` caps validation, ``max_test_samples`` each test split."""
    caps = {"train": max_train_samples, "validation": max_eval_samples}
    return datasets.DatasetDict(
        {name: truncate(split, caps.get(name, max_test_samples)) for name, split in dataset.items()}
    )


def load_multi30k(
    dataset_name: str | None = DEFAULT_DATASET_NAME,
    data_dir: str | Path | None = None,
    source_lang: str = "en",
    target_lang: str = "de",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_test_samples: int | None = None,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Multi30K with splits train, validation and test_* and columns ``source_lang``, ``target_lang``.

    ``data_dir`` wins over ``dataset_name`` (local raw files need no network).
    ``max_eval_samples`` caps validation; ``max_test_samples`` caps each test split.
    """
    check_language_pair(source_lang, target_lang)
    if data_dir is not None:
        dataset = load_raw_multi30k(data_dir, source_lang, target_lang)
    elif dataset_name:
        dataset = load_hub_multi30k(dataset_name, source_lang, target_lang, cache_dir)
    else:
        raise ValueError("give dataset_name or data_dir")
    return cap_splits(dataset, max_train_samples, max_eval_samples, max_test_samples)
