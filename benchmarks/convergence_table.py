"""Markdown table and plot from a convergence benchmark's curves.json (what the README shows).

    python benchmarks/convergence_table.py docs/convergence_cpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import plot  # noqa: E402


def name(run: dict) -> str:
    return run["method"] + (f" ({run['variant']})" if run.get("variant") else "")


def table(summary: dict) -> str:
    rows = [
        "| method | lr | val loss per epoch | val BLEU per epoch | shuffled-source gap (last) | train s | test-2016 BLEU | test-2016 chrF |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for run in summary["runs"]:
        if "epochs" not in run:
            rows.append(f"| {name(run)} | {run['lr']:g} | failed (exit {run['returncode']}) | | | | | |")
            continue
        epochs = run["epochs"]
        losses = " / ".join(f"{e['val_loss']:.2f}" for e in epochs)
        bleus = " / ".join(f"{(e['val_bleu'] or 0):.1f}" for e in epochs)
        gap = epochs[-1].get("source_gap")
        test = run.get("test", {}).get("test_2016_flickr", {})
        rows.append(
            f"| {name(run)} | {run['lr']:g} | {losses} | {bleus} | {gap:.2f} | {epochs[-1]['train_seconds']:.0f} | "
            f"{test.get('bleu', float('nan')):.1f} | {test.get('chrf', float('nan')):.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    folder = Path(sys.argv[1])
    summary = json.loads((folder / "curves.json").read_text())
    print(f"Machine: {summary['machine']}; setting {summary['setting']}: {' '.join(summary['recipe_flags'])}\n")
    print(table(summary))
    plot(summary["runs"], folder / "curves.png", f"Multi30K en-de, setting '{summary['setting']}': {summary['machine']}")


if __name__ == "__main__":
    main()
