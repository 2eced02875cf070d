"""Re-score the final models of a convergence benchmark with beam search on a test split.

    python benchmarks/rescore.py docs/convergence_cpu --data-dir ../shared/data/multi30k --beams 4
    # and write every run of the folder, with its beam-4 BLEU, into a results file:
    python benchmarks/rescore.py docs/convergence_cpu --data-dir ../shared/data/multi30k --beams 4 \
        --results docs/results/full_multi30k.json

The CPU setting decodes greedily to keep its per-epoch evaluation cheap; greedy decoding of a
briefly trained model is prone to repetition loops, which BLEU punishes more than the loss
does. This loads every run's saved model (``--output_dir`` of its recipe command), translates
the first ``--max-samples`` sentences of ``--split`` with ``--beams`` beams, and stores BLEU and
chrF in ``curves.json`` as ``record["test_beam"]`` (with the decoding settings), so every
method is scored the same way. ``--results`` then writes the folder's runs into a results file
(``benchmarks/convergence.py``'s ``RESULT_FIELDS``; ``test2016_bleu_beam4`` is filled when the
scoring was beam 4 on all 1000 test-2016 sentences).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fngd_hf.translation.data import DEFAULT_DATASET_NAME, load_multi30k  # noqa: E402
from fngd_hf.translation.evaluation import score_translations  # noqa: E402
from fngd_hf.translation.pipeline import load_translator, translate  # noqa: E402


def output_dir(record: dict) -> Path:
    """The run's ``--output_dir``; a relative one is relative to the repo (the benchmark runs the recipe there)."""
    words = shlex.split(record["command"])
    folder = Path(words[words.index("--output_dir") + 1])
    return folder if folder.is_absolute() else REPO / folder


def split_sentences(data_dir: Path | None, split: str = "test_2016_flickr", max_samples: int = 1000,
                   source_lang: str = "en", target_lang: str = "de") -> tuple[list[str], list[str]]:
    """Sources and references of a test split: raw files from ``data_dir``, else the Hub dataset."""
    data = load_multi30k(dataset_name=None if data_dir else DEFAULT_DATASET_NAME, data_dir=data_dir,
                         source_lang=source_lang, target_lang=target_lang, max_test_samples=max_samples)
    return list(data[split][source_lang]), list(data[split][target_lang])


def beam_score(folder: Path, sources: list[str], references: list[str], beams: int = 4, max_length: int = 128,
               split: str = "test_2016_flickr") -> dict:
    """``{"settings": {...}, "bleu": ..., "chrf": ...}`` of the model saved in ``folder``."""
    settings = {"split": split, "sentences": len(sources), "num_beams": beams, "max_length": max_length}
    model, tokenizer = load_translator(str(folder))
    with torch.inference_mode():
        hypotheses = translate(model, tokenizer, sources, batch_size=64, num_beams=beams, max_length=max_length)
    return {"settings": settings, **score_translations(hypotheses, references)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a convergence benchmark folder with curves.json")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--split", default="test_2016_flickr")
    parser.add_argument("--max-samples", type=int, default=1000)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--source-lang", default="en")
    parser.add_argument("--target-lang", default="de")
    parser.add_argument("--results", type=Path, default=None,
                        help="write the folder's runs (with their beam scores) into this results file")
    args = parser.parse_args()
    path = args.folder / "curves.json"
    summary = json.loads(path.read_text())
    sources, references = split_sentences(args.data_dir, args.split, args.max_samples, args.source_lang, args.target_lang)
    settings = {"split": args.split, "sentences": len(sources), "num_beams": args.beams, "max_length": args.max_length}
    for record in summary["runs"]:
        folder = output_dir(record)
        if record.get("returncode") != 0 or not (folder / "model.safetensors").exists():
            continue
        if record.get("test_beam", {}).get("settings") == settings:
            continue  # already scored this way
        record["test_beam"] = beam_score(folder, sources, references, args.beams, args.max_length, args.split)
        print(f"{folder.name:<40} BLEU {record['test_beam']['bleu']:.2f} chrF {record['test_beam']['chrf']:.2f}", flush=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
    if args.results is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from convergence import results_record, update_results

        # Records without a seed come from before --results existed, when the AdamW part ran at learning_rate.
        update_results(args.results, [results_record(r, historical="seed" not in r) for r in summary["runs"]])
        print(f"{len(summary['runs'])} runs into {args.results}")


if __name__ == "__main__":
    main()
