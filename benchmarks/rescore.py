"""Re-score the final models of a convergence benchmark with beam search on a test split.

    python benchmarks/rescore.py docs/convergence_cpu --data-dir ../shared/data/multi30k --beams 4

The CPU setting decodes greedily to keep its per-epoch evaluation cheap; greedy decoding of a
briefly trained model is prone to repetition loops, which BLEU punishes more than the loss
does. This loads every run's saved model (``--output_dir`` of its recipe command), translates
the first ``--max-samples`` sentences of ``--split`` with ``--beams`` beams, and stores BLEU and
chrF in ``curves.json`` as ``record["test_beam"]`` (with the decoding settings), so every
method is scored the same way.
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

from fngd_hf.data import load_multi30k  # noqa: E402
from fngd_hf.evaluation import score_translations  # noqa: E402
from fngd_hf.translate import load_translator, translate  # noqa: E402


def output_dir(record: dict) -> Path:
    words = shlex.split(record["command"])
    return Path(words[words.index("--output_dir") + 1])


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
    args = parser.parse_args()
    path = args.folder / "curves.json"
    summary = json.loads(path.read_text())
    data = load_multi30k(dataset_name=None, data_dir=args.data_dir, source_lang=args.source_lang,
                         target_lang=args.target_lang, max_test_samples=args.max_samples)
    sources, references = data[args.split][args.source_lang], data[args.split][args.target_lang]
    settings = {"split": args.split, "sentences": len(sources), "num_beams": args.beams, "max_length": args.max_length}
    for record in summary["runs"]:
        folder = output_dir(record)
        if record.get("returncode") != 0 or not (folder / "model.safetensors").exists():
            continue
        if record.get("test_beam", {}).get("settings") == settings:
            continue  # already scored this way
        model, tokenizer = load_translator(str(folder))
        with torch.inference_mode():
            hypotheses = translate(model, tokenizer, sources, batch_size=64, num_beams=args.beams,
                                   max_length=args.max_length)
        record["test_beam"] = {"settings": settings, **score_translations(hypotheses, references)}
        print(f"{folder.name:<40} BLEU {record['test_beam']['bleu']:.2f} chrF {record['test_beam']['chrf']:.2f}", flush=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
