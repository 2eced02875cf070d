"""Robustness of the shipped defaults: FNGD and AdamW, each at the recipe's default settings, across schedules,
model sizes and batch sizes (a bounded budget: a part of Multi30K, one epoch by default).

    OMP_NUM_THREADS=1 python benchmarks/robustness.py --data-dir ../shared/data/multi30k \\
        --out OUT --results docs/results/robustness.json
    python benchmarks/robustness.py --results docs/results/robustness.json --table

Each cell changes one thing from the base (the ``cpu`` setting of ``benchmarks/convergence.py``: Marian
d_model 128, 2+2 layers, batch 64, linear decay with 5 % warmup); every method runs at the recipe's default
learning rate (``recipes/learning_rates.py``) and the library's defaults otherwise, as a user who changes
nothing would. Per run: final validation loss, greedy validation BLEU and the shuffled-source gap (a model
that ignores its source has a gap near 0). Records are written as each run ends; a run already recorded (same
cell, method and rate, with today's defaults) is skipped. ``--methods fngd:2e-3,fngd:8e-3`` adds a small
per-cell grid, to see how far the default lands from each cell's best rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence  # noqa: E402
from fngd_hf.translation.models import PRESETS  # noqa: E402


def shape_flags(preset: str, *names: str) -> list[str]:
    """Recipe flags that set these fields of a model preset's shape (over the ``cpu`` setting's)."""
    return [flag for name in names for flag in (f"--{name}", str(getattr(PRESETS[preset], name)))]


# label -> (batch size, recipe flags); the base cell is "linear, d128, batch 64".
CELLS = {
    "base (linear + warmup, d_model 128, batch 64)": (64, []),
    "cosine + warmup": (64, ["--lr_scheduler_type", "cosine"]),
    "inverse sqrt + warmup": (64, ["--lr_scheduler_type", "inverse_sqrt"]),
    "batch 8": (8, []),
    "batch 32": (32, []),
    "batch 128": (128, []),
    "d_model 32, 2+2 (tiny preset)": (64, ["--d_model", "32", "--ffn_dim", "64", "--attention_heads", "2"]),
    "d_model 256, 3+3 (small preset)": (64, shape_flags("small", "d_model", "ffn_dim", "encoder_layers",
                                                        "decoder_layers")),
    # Transformer-base, the size of the paper's own runs (40-50 min a run on one core at 10,000 pairs, 2 epochs).
    "d_model 512, 6+6 (paper preset)": (64, shape_flags("paper", "d_model", "ffn_dim", "attention_heads",
                                                        "encoder_layers", "decoder_layers")),
}
METHODS = "adamw,fngd"


def parse_methods(text: str) -> list[tuple[str, str]]:
    """``name`` (the recipe's default learning rate) or ``name:lr`` items, comma separated -> ``(name, lr)``."""
    runs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, lr = item.partition(":")
        if name not in convergence.METHOD_FLAGS:
            raise ValueError(f"unknown method {name!r}; choose from {sorted(convergence.METHOD_FLAGS)}")
        lr = lr or repr(convergence.DEFAULT_LEARNING_RATES[name])
        float(lr)  # a ValueError names a rate that is not a number
        runs.append((name, lr))
    if not runs:
        raise ValueError("--methods names no method")
    return runs


def done(results: list[dict], cell: str, method: str, lr: str) -> bool:
    """A record of this cell, method and rate that ran with today's defaults (FNGD-family records from before
    ``convergence.FNGD_DEFAULTS_SINCE_RECORDED`` are run again and replaced)."""
    return any(r["cell"] == cell and r["method"] == method and r["lr"] == float(lr)
               and convergence.ran_with_current_defaults(method, r["command"]) for r in results)


def _cell_text(record: dict | None) -> str:
    if record is None:
        return "-"
    if record.get("val_loss") is None:
        return f"failed (rc {record.get('returncode')})"
    text = f"{record['val_loss']:.2f} / {record['val_bleu']:.1f} / {record['source_gap']:.2f}"
    stale = not convergence.ran_with_current_defaults(record["method"], record["command"])
    return text + (" (before today's defaults)" if stale else "")


def table(results: list[dict]) -> str:
    """Markdown: one row per cell (CELLS' order), one column per method and rate; the recipe's default rate of
    each method first. Entries: final validation loss / greedy validation BLEU / shuffled-source gap."""
    def order(key):
        method, lr = key
        default = convergence.DEFAULT_LEARNING_RATES.get(method)
        return (method != "adamw", method, lr != default, lr)

    columns = sorted({(r["method"], r["lr"]) for r in results}, key=order)
    header = [f"{m} {lr:g}" + (" (default)" if lr == convergence.DEFAULT_LEARNING_RATES.get(m) else "")
              for m, lr in columns]
    lines = ["| cell | " + " | ".join(header) + " |", "| --- |" + " --- |" * len(columns)]
    for cell in CELLS:
        row = {(r["method"], r["lr"]): r for r in results if r["cell"] == cell}
        if row:
            lines.append(f"| {cell} | " + " | ".join(_cell_text(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="print the --results file as a markdown table and exit")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--train-pairs", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--cells", default=";".join(CELLS), help="labels of CELLS, separated by ';' (labels hold commas)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=METHODS,
                        help="name or name:lr, comma separated (without a rate: the recipe's default for the method)")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.results.read_text())["runs"]))
        return
    if args.out is None:
        parser.error("--out is required to run cells")
    try:
        methods = parse_methods(args.methods)
    except ValueError as error:
        parser.error(str(error))
    cells = [c.strip() for c in args.cells.split(";") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        parser.error(f"unknown cells {unknown}; choose from {list(CELLS)}")
    results = json.loads(args.results.read_text())["runs"] if args.results.exists() else []
    for cell in cells:
        batch, flags = CELLS[cell]
        for method, lr in methods:
            if done(results, cell, method, lr):
                continue  # done in an earlier invocation
            run_args = argparse.Namespace(
                data_dir=args.data_dir, setting="cpu", batch_size=batch, seed=[args.seed],
                extra=["--max_train_samples", str(args.train_pairs), "--num_train_epochs", str(args.epochs),
                       "--warmup_steps", "0.05", *flags],
            )
            slug = f"{cell.split(' (')[0].replace(' ', '_').replace(',', '').replace('+', 'and')}"
            record = convergence.run_method(method, lr, run_args, args.out / slug)
            last = record.get("epochs", [{}])[-1]
            results = [r for r in results if not (r["cell"] == cell and r["method"] == method
                                                  and r["lr"] == float(lr))] + [{
                "cell": cell, "method": method, "lr": float(lr), "batch": batch, "seed": args.seed,
                "val_loss": last.get("val_loss"), "val_bleu": last.get("val_bleu"), "source_gap": last.get("source_gap"),
                "returncode": record.get("returncode"),
                "command": convergence.relative_command(record["command"]),
            }]
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps({"description": __doc__.split("\n\n")[0], "train_pairs": args.train_pairs,
                                                "epochs": args.epochs, "runs": results}, indent=1) + "\n")
            print(f"{cell:<40} {method:<6} lr {lr:<8} val loss {last.get('val_loss')}  val BLEU {last.get('val_bleu')}  "
                  f"gap {last.get('source_gap')}", flush=True)


if __name__ == "__main__":
    main()
