"""Markdown tables and plots from convergence benchmark runs (what the README shows).

    python benchmarks/convergence_table.py docs/convergence_cpu
    # runs split over several --out folders (e.g. one process per core), merged into the first:
    python benchmarks/convergence_table.py docs/convergence_cpu --merge /tmp/a /tmp/b
    # a results file (benchmarks/convergence.py --results): seeds pooled per setting, curves to a PNG
    python benchmarks/convergence_table.py --results docs/results/full_multi30k.json --plot docs/results/full_multi30k.png
    # only some settings in the plot (the labels of its legend, without the seed count)
    python benchmarks/convergence_table.py --results docs/results/full_multi30k.json --plot headline.png \
        --plot-only "adamw lr=0.002" "muon lr=0.004/0.003"

Writes ``curves.png`` (each method at its best learning rate) and ``ablations.png`` (every FNGD
and NGD run: learning rates and variants) into the folder, and prints the tables. With ``--results``
it prints one row per method, learning rate(s) and variant with the seeds run and the mean ± sample
standard deviation over seeds (``n`` in the seeds column; one seed: the value alone) of the beam-4
test-2016 BLEU, the final validation loss and BLEU and the training seconds, and plots each row's
mean curves against epochs and against training seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import best_per_method, plot, run_label, setting_key  # noqa: E402


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


# ------------------------------------------------------------------------------- results files
METHOD_ORDER = ("adamw", "muon", "sgd", "fngd", "ngd", "cwngd", "kfac", "sngd", "shampoo")


def pooled(runs: list[dict]) -> list[dict]:
    """Seeds of the same setting (``convergence.setting_key``) together: ``{"key", "runs"}`` in method order, then lr."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(setting_key(run), []).append(run)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    keys = sorted(groups, key=lambda k: (order.get(k[0], 99), k[3], k[1], k[2] or 0.0, not k[4]))
    return [{"key": k, "runs": sorted(groups[k], key=lambda r: r["seed"])} for k in keys]


def mean_spread(values: list, digits: int = 2) -> str:
    """``mean ± sample sd`` over the values present; one value alone; ``-`` for none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _last(values: list):
    return values[-1] if values else None


def results_table(runs: list[dict]) -> str:
    rows = [
        "| method | lr | AdamW-part lr | variant | seeds (n) | test-2016 BLEU beam 4 | final val loss | "
        "final val BLEU (greedy) | train s | shipped default |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for group in pooled(runs):
        method, lr, adamw_lr, variant, current = group["key"]
        members = group["runs"]
        seeds = ", ".join(str(r["seed"]) for r in members)
        failed = sum(1 for r in members if not r["val_loss"])
        rows.append(
            f"| {method} | {lr:g} | {'-' if adamw_lr is None else f'{adamw_lr:g}'} | {variant_text(variant, current)} | "
            f"{seeds} ({len(members)}{f', {failed} failed' if failed else ''}) | "
            f"{mean_spread([r['test2016_bleu_beam4'] for r in members], 1)} | "
            f"{mean_spread([_last(r['val_loss']) for r in members], 3)} | "
            f"{mean_spread([_last(r['val_bleu']) for r in members], 1)} | "
            f"{mean_spread([_last(r['train_seconds']) for r in members], 0)} | "
            f"{'yes' if all(r['shipped_default'] for r in members) else 'no'} |"
        )
    return "\n".join(rows)


EARLIER_DEFAULTS = "earlier defaults"


def variant_text(variant: str, current: bool) -> str:
    """The variant, marked when the run predates ``convergence.FNGD_DEFAULTS_SINCE_RECORDED`` (its "-" meant other
    settings then)."""
    if current:
        return variant or "-"
    return f"{variant} ({EARLIER_DEFAULTS})" if variant else f"- ({EARLIER_DEFAULTS})"


def group_label(key: tuple) -> str:
    method, lr, adamw_lr, variant, current = key
    return f"{method} lr={lr:g}" + (f"/{adamw_lr:g}" if adamw_lr is not None and adamw_lr != lr else "") + (
        f" {variant}" if variant else "") + ("" if current else f" ({EARLIER_DEFAULTS})")


def mean_curve(runs: list[dict], field: str) -> list[float]:
    """Per epoch, the mean over the seeds that reached it with a finite value."""
    length = max((len(r[field]) for r in runs), default=0)
    curve = []
    for epoch in range(length):
        values = [r[field][epoch] for r in runs if epoch < len(r[field]) and r[field][epoch] is not None]
        curve.append(statistics.fmean(values) if values else float("nan"))
    return curve


def plot_results(runs: list[dict], path: Path, title: str, only: list[str] | None = None) -> None:
    """Validation loss and BLEU (means over seeds) against epoch and against training seconds; ``only``: the
    settings to draw, by :func:`group_label` (a label that names no setting is an error, not a missing curve)."""
    groups = [g for g in pooled(runs) if any(r["val_loss"] for r in g["runs"])]
    if only is not None:
        by_label = {group_label(g["key"]): g for g in groups}
        unknown = [label for label in only if label not in by_label]
        if unknown:
            raise ValueError(f"no setting with a curve is labelled {unknown}; labels: {sorted(by_label)}")
        groups = [by_label[label] for label in only]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5 + 0.06 * len(groups)))
    colours = plt.get_cmap("tab20").colors
    for index, group in enumerate(groups):
        members = group["runs"]
        n = len(members)
        style = dict(color=colours[index % len(colours)], linestyle=("-", "--", ":")[index // len(colours) % 3],
                     marker="o", label=group_label(group["key"]) + (f" ({n} seeds)" if n > 1 else ""))
        loss, bleu, seconds = (mean_curve(members, f) for f in ("val_loss", "val_bleu", "train_seconds"))
        epochs = list(range(1, len(loss) + 1))
        axes[0, 0].plot(epochs, loss, **style)
        axes[1, 0].plot(epochs[: len(bleu)], bleu, **style)
        axes[0, 1].plot(seconds, loss[: len(seconds)], **style)
        axes[1, 1].plot(seconds[: len(bleu)], bleu[: len(seconds)], **style)
    for ax, (ylabel, xlabel) in zip(axes.flat, [("val loss", "epoch"), ("val loss", "training seconds"),
                                                 ("val BLEU (greedy)", "epoch"), ("val BLEU (greedy)", "training seconds")]):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    losses = [v for g in groups for r in g["runs"] for v in r["val_loss"] if v is not None]
    if losses:  # a diverged run would squash every other curve: cut the axis at 8 nats
        for ax in axes[0]:
            ax.set_ylim(min(losses) - 0.2, min(max(losses), 8.0) + 0.2)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    columns = 3 if len(groups) > 8 else 4
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, min(0.02 + 0.016 * math.ceil(len(groups) / columns), 0.5), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", help="a convergence benchmark folder with curves.json")
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="folders whose runs are merged into FOLDER")
    parser.add_argument("--results", type=Path, default=None, help="a results file (convergence.py --results) instead")
    parser.add_argument("--plot", type=Path, default=None, help="with --results: the PNG (default: next to it)")
    parser.add_argument("--plot-only", nargs="+", default=None, metavar="LABEL",
                        help="with --results: plot only these settings, by their legend label (e.g. 'adamw lr=0.002')")
    args = parser.parse_args()
    if args.plot_only is not None and args.results is None:
        parser.error("--plot-only needs --results")
    if args.results is not None:
        runs = json.loads(args.results.read_text())["runs"]
        print(results_table(runs))
        plot_path = args.plot or args.results.with_suffix(".png")
        try:
            plot_results(runs, plot_path, f"Multi30K en-de: {args.results.name}, mean over seeds", args.plot_only)
        except ValueError as error:
            parser.error(str(error))
        print(f"\nwrote {plot_path}")
        return
    if args.folder is None:
        parser.error("give a FOLDER or --results FILE")
    summary = merge(args.folder, args.merge) if args.merge else json.loads((args.folder / "curves.json").read_text())
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
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
