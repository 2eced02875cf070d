"""Markdown tables and plots from convergence benchmark runs (what the README shows).

    python benchmarks/convergence_table.py docs/convergence_cpu
    # runs split over several --out folders (e.g. one process per core), merged into the first:
    python benchmarks/convergence_table.py docs/convergence_cpu --merge /tmp/a /tmp/b

Writes ``curves.png`` (each method at its best learning rate) and ``ablations.png`` (every FNGD
and NGD run: learning rates and variants) into the folder, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import best_per_method, plot, run_label  # noqa: E402


def name(run: dict) -> str:
    return run["method"] + (f" ({run['variant']})" if run.get("variant") else "")


def seconds(run: dict) -> str:
    """Training wall clock; ``*`` where the run shared its cores with other runs (``seconds_disturbed``)."""
    return f"{run['epochs'][-1]['train_seconds']:.0f}" + ("*" if run.get("seconds_disturbed") else "")


def best_bleu_epoch(run: dict) -> str:
    epochs = run["epochs"]
    best = max(epochs, key=lambda e: e.get("val_bleu") or 0.0)
    clock = "" if run.get("seconds_disturbed") else f", {best['train_seconds']:.0f} s"
    return f"{best.get('val_bleu') or 0.0:.1f} (ep {best['epoch']:g}{clock})"


def table(runs: list[dict]) -> str:
    rows = [
        "| method | lr | val loss per epoch | val BLEU per epoch | best val BLEU (epoch, train s) | "
        "shuffled-source gap (last) | train s | test-2016 BLEU greedy (500) | test-2016 BLEU / chrF beam 4 (1000) |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        if "epochs" not in run:
            rows.append(f"| {name(run)} | {run['lr']:g} | failed (exit {run['returncode']}) | | | | | | |")
            continue
        epochs = run["epochs"]
        losses = " / ".join(f"{e['val_loss']:.2f}" for e in epochs)
        bleus = " / ".join(f"{(e['val_bleu'] or 0):.1f}" for e in epochs)
        gap = epochs[-1].get("source_gap")
        test = run.get("test", {}).get("test_2016_flickr", {})
        beam = run.get("test_beam", {})
        beam_cell = f"{beam['bleu']:.1f} / {beam['chrf']:.1f}" if beam else "-"
        rows.append(
            f"| {name(run)} | {run['lr']:g} | {losses} | {bleus} | {best_bleu_epoch(run)} | {gap:.2f} | "
            f"{seconds(run)} | {test.get('bleu', float('nan')):.1f} | {beam_cell} |"
        )
    return "\n".join(rows)


def merge(folder: Path, others: list[Path]) -> dict:
    """Runs of ``others`` replace the same-labelled runs of ``folder``; the result is saved there."""
    target = folder / "curves.json"
    summary = json.loads(target.read_text()) if target.exists() else None
    for other in others:
        extra = json.loads((other / "curves.json").read_text())
        if summary is None:
            summary = {**extra, "runs": []}
        labels = {run_label(r) for r in extra["runs"]}
        summary["runs"] = [r for r in summary["runs"] if run_label(r) not in labels] + extra["runs"]
        if extra["machine"] != summary["machine"]:
            summary["machine"] = f"{summary['machine']}; {extra['machine']}"
    folder.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="folders whose runs are merged into FOLDER")
    args = parser.parse_args()
    summary = merge(args.folder, args.merge) if args.merge else json.loads((args.folder / "curves.json").read_text())
    order = {m: i for i, m in enumerate(("adamw", "sgd", "fngd", "ngd", "cwngd", "kfac", "sngd", "shampoo"))}
    runs = sorted(summary["runs"], key=lambda r: (order.get(r["method"], 99), r.get("variant") or "", r["lr"]))
    print(f"Machine: {summary['machine']}; setting {summary['setting']}: {' '.join(summary['recipe_flags'])}\n")
    print("Every run:\n")
    print(table(runs))
    best = sorted(best_per_method(runs), key=lambda r: order.get(r["method"], 99))
    print("\nEach method at its best learning rate (by final validation BLEU):\n")
    print(table(best))
    if any(r.get("seconds_disturbed") for r in runs):
        print("\n`*`: the run shared its cores with other runs; its seconds are not comparable (left off the time plots).")
    title = f"Multi30K en-de, setting '{summary['setting']}': {summary['machine']}"
    plot(best, args.folder / "curves.png", "each method at its best lr; " + title)
    ablations = [r for r in runs if r["method"] in ("fngd", "ngd")]
    plot(ablations, args.folder / "ablations.png", "FNGD learning rates and variants; " + title)


if __name__ == "__main__":
    main()
