"""Shared helpers for the Multi30K tests: the real data folder and a small synthetic corpus."""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path

# Nothing in these tests may reach the network.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO / ".." / "shared" / "data" / "multi30k"
ALL_STEMS = ("train", "val", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr")

# A word-for-word toy language pair: enough structure for a tiny model to see a source signal.
LEXICON = {
    "a": "ein", "dog": "Hund", "man": "Mann", "child": "Kind", "runs": "läuft", "sleeps": "schläft",
    "plays": "spielt", "jumps": "springt", "big": "großer", "small": "kleiner", "white": "weißer",
    "black": "schwarzer", "here": "hier", "outside": "draußen", "today": "heute",
}
SUBJECTS, ADJECTIVES = ["dog", "man", "child"], ["big", "small", "white", "black"]
VERBS, PLACES = ["runs", "sleeps", "plays", "jumps"], ["here", "outside", "today"]


def real_data_available() -> bool:
    return (REAL_DATA / "train.en").is_file()


def synthetic_pair(rng: random.Random) -> tuple[str, str]:
    words = ["a", rng.choice(ADJECTIVES), rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(PLACES)]
    english = " ".join(words).capitalize() + "."
    german = " ".join(LEXICON[w] for w in words).capitalize() + "."
    return english, german


def write_lines(path: Path, lines: list[str], compress: bool = False) -> Path:
    text = "".join(line + "\n" for line in lines)
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_synthetic_corpus(folder: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Raw-file layout (train.en, val.de, test_*.en ...) with synthetic sentence pairs."""
    sizes = sizes or {"train": 300, "val": 40, "test_2016_flickr": 20, "test_2017_flickr": 20,
                      "test_2017_mscoco": 10, "test_2018_flickr": 20}
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, size in sizes.items():
        pairs = [synthetic_pair(rng) for _ in range(size)]
        write_lines(folder / f"{stem}.en", [en for en, _ in pairs])
        write_lines(folder / f"{stem}.de", [de for _, de in pairs])
    return folder
