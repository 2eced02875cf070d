"""Convergence benchmark: the Multi30K recipe with each optimizer, same model, data order and budget.

    python benchmarks/convergence.py --data-dir ../shared/data/multi30k --setting cpu --out docs/convergence_cpu
    python benchmarks/convergence.py --data-dir ../shared/data/multi30k --setting gpu --out docs/convergence_gpu

Every method runs ``recipes/multi30k.py`` in its own process with the same seed, data, model
and epochs; only ``--optimizer`` and its learning rate (and the method's own flags) differ.
Per epoch it records validation loss, validation loss with shuffled sources (the collapse
check), validation BLEU and the training wall clock (evaluation excluded); at the end, BLEU and
chrF on every test set. Writes ``curves.json`` and ``curves.png`` (loss and BLEU against epoch
and against seconds) into ``--out``, and prints a table. ``--methods adamw:1e-3,adamw:3e-3,fngd:1e-2,fngd:1e-2:refreshed+damping1``
picks methods, learning rates and variants (``VARIANT_FLAGS``, combined with ``+``); a small sweep is one method listed
with several rates. Runs accumulate in ``curves.json`` across invocations (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "recipes" / "configs" / "fngd_paper.yaml"


def config_flags(path: Path) -> list[str]:
    """A recipe config file as recipe flags, without ``optimizer`` and ``learning_rate`` (the benchmark sets those)."""
    import yaml

    flags = []
    for key, value in yaml.safe_load(path.read_text(encoding="utf-8")).items():
        if key not in ("optimizer", "learning_rate"):
            flags += [f"--{key}", str(value)]
    return flags

# Recipe flags of each setting; both use the same data pipeline and evaluation.
SETTINGS = {
    # Finishes on 2 CPU cores in bounded time: a narrow model on a third of Multi30K.
    "cpu": ["--preset", "small", "--d_model", "128", "--ffn_dim", "512", "--attention_heads", "4",
            "--encoder_layers", "2", "--decoder_layers", "2", "--max_train_samples", "10000",
            "--max_eval_samples", "500", "--max_predict_samples", "500", "--num_train_epochs", "4",
            "--vocab_size", "6000", "--beam_size", "1", "--per_device_eval_batch_size", "128",
            "--test_splits", "test_2016_flickr"],
    # The paper's Transformer (d_model 512, FFN 2048, 8 heads, 6+6 layers) on full Multi30K.
    "gpu": ["--preset", "paper", "--num_train_epochs", "10", "--bf16", "--per_device_eval_batch_size", "256"],
}

# Method name -> recipe flags besides --optimizer and --learning_rate. Everything else is the
# recipe's default (max_grad_norm 1.0: the AdamW gradients, and for the layer-wise methods the
# applied update lr·d, are clipped at global norm 1).
METHOD_FLAGS = {
    "adamw": ["--warmup_steps", "0.05", "--lr_scheduler_type", "linear"],
    "sgd": [],
    "fngd": [],
    "ngd": [],
    "cwngd": [],
    # K-FAC's own default damping (1e-3) diverged on a tiny BART; 0.1 is stable (tests/test_kfac.py).
    "kfac": ["--optim_args", "damping=0.1"],
    # SNGD whitens only the input side; it needs a per-layer trust region as FNGD does.
    "sngd": ["--optim_args", "trust_ratio=0.1"],
    "shampoo": [],
}

# Ablations and variants: ``fngd:1e-2:refreshed`` adds these recipe flags to the method's own.
VARIANT_FLAGS = {
    "refreshed": ["--fngd_scale_mode", "refreshed"],  # rescale shared beta by tr(K_stored)/tr(K_new)
    "fixed": ["--fngd_damping_mode", "fixed", "--fngd_damping", "1e-3", "--fngd_trust_ratio", "none"],
    "no_trust": ["--fngd_trust_ratio", "none"],  # relative damping without the trust region
    "paper": config_flags(PAPER_CONFIG),  # the paper's setting, read from the recipe's named config
    "trust3": ["--fngd_trust_ratio", "3"],
    "trust0.3": ["--fngd_trust_ratio", "0.3"],
    "warmup": ["--warmup_steps", "0.05"],
    "nowarmup": ["--warmup_steps", "0"],
    "constant": ["--lr_scheduler_type", "constant"],  # the paper keeps the learning rate constant
    "damping0.1": ["--fngd_damping", "0.1"],
    "damping0.03": ["--fngd_damping", "0.03"],
    "damping1": ["--fngd_damping", "1.0"],
    "by_sample": ["--fngd_share_by", "sample"],  # each sample keeps its first-epoch coefficient
    "adamw_lr2e-3": ["--fngd_adamw_lr", "2e-3"],  # the AdamW part (embeddings, LayerNorm) at AdamW's best lr
}


def parse_methods(text: str) -> list[tuple[str, str, str]]:
    """``name:lr[:variant]`` items, comma separated."""
    runs = []
    for item in text.split(","):
        name, _, rest = item.partition(":")
        lr, _, variant = rest.partition(":")
        if name not in METHOD_FLAGS:
            raise ValueError(f"unknown method {name!r}; choose from {sorted(METHOD_FLAGS)}")
        if not lr:
            raise ValueError(f"give a learning rate as {name}:LR")
        unknown = [v for v in variant.split("+") if v and v not in VARIANT_FLAGS]
        if unknown:
            raise ValueError(f"unknown variant {unknown}; choose from {sorted(VARIANT_FLAGS)} (combine with +)")
        runs.append((name, lr, variant))
    return runs


def variant_flags(variant: str) -> list[str]:
    """Recipe flags of ``a+b`` variants, in order (a later flag wins in the recipe's parser)."""
    return [flag for part in variant.split("+") if part for flag in VARIANT_FLAGS[part]]


def run_label(record: dict) -> str:
    return f"{record['method']} lr={record['lr']:g}" + (f" {record['variant']}" if record.get("variant") else "")


def run_method(name: str, lr: str, args, out: Path, variant: str = "") -> dict:
    run_dir = out / "runs" / (f"{name}-lr{lr}" + (f"-{variant}" if variant else ""))
    command = [
        sys.executable, str(REPO / "recipes" / "multi30k.py"),
        "--output_dir", str(run_dir),
        "--optimizer", name, "--learning_rate", lr,
        "--per_device_train_batch_size", str(args.batch_size), "--seed", str(args.seed),
        "--eval_strategy", "epoch", "--save_strategy", "no", "--logging_steps", "50",
        "--report_to", "none", "--source_check", "True", "--disable_tqdm", "True",
        *(["--data_dir", str(args.data_dir)] if args.data_dir else []),
        *SETTINGS[args.setting], *METHOD_FLAGS[name], *variant_flags(variant), *args.extra,
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    record = {"method": name, "lr": float(lr), "variant": variant, "command": " ".join(command[1:]), "returncode": code,
              "process_seconds": time.perf_counter() - start}
    state_file, results_file = run_dir / "trainer_state.json", run_dir / "results.json"
    if code != 0 or not state_file.exists():
        record["error"] = (run_dir / "log.txt").read_text()[-2000:]
        return record
    history = json.loads(state_file.read_text())["log_history"]
    evals = [r for r in history if "eval_loss" in r]
    checks = {r["epoch"]: r for r in history if "eval_source_gap" in r}
    record["epochs"] = [
        {
            "epoch": r["epoch"], "train_seconds": r.get("train_seconds"), "val_loss": r["eval_loss"],
            "val_bleu": r.get("eval_bleu"), "val_shuffled_source_loss": checks.get(r["epoch"], {}).get("eval_shuffled_source_loss"),
            "source_gap": checks.get(r["epoch"], {}).get("eval_source_gap"),
        }
        for r in evals
    ]
    record["skipped_steps"] = max((r.get("fngd/skipped_steps", 0) for r in history), default=0)
    if results_file.exists():
        results = json.loads(results_file.read_text())
        record["test"] = {split: {"bleu": v["bleu"], "chrf": v["chrf"]} for split, v in results.get("test", {}).items()}
        record["source_collapsed"] = results.get("validation", {}).get("eval_source_collapsed")
    return record


def best_per_method(records: list[dict]) -> list[dict]:
    """Each method's run (over learning rates; variants excluded) with the best final validation BLEU."""
    best: dict[str, dict] = {}
    for record in records:
        if "epochs" not in record or record.get("variant"):
            continue
        score = record["epochs"][-1].get("val_bleu") or 0.0
        kept = best.get(record["method"])
        if kept is None or score > (kept["epochs"][-1].get("val_bleu") or 0.0):
            best[record["method"]] = record
    return list(best.values())


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in records if "epochs" in r]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5 + 0.06 * len(shown)))
    colours = plt.get_cmap("tab20").colors
    for index, record in enumerate(shown):
        style = dict(color=colours[index % len(colours)], linestyle=("-", "--", ":")[index // len(colours) % 3])
        label = run_label(record)
        epochs = [e["epoch"] for e in record["epochs"]]
        seconds = [e["train_seconds"] for e in record["epochs"]]
        axes[0, 0].plot(epochs, [e["val_loss"] for e in record["epochs"]], marker="o", label=label, **style)
        axes[1, 0].plot(epochs, [e["val_bleu"] for e in record["epochs"]], marker="o", label=label, **style)
        if record.get("seconds_disturbed"):  # its wall clock shared the cores with other runs: no time axis
            continue
        axes[0, 1].plot(seconds, [e["val_loss"] for e in record["epochs"]], marker="o", label=label, **style)
        axes[1, 1].plot(seconds, [e["val_bleu"] for e in record["epochs"]], marker="o", label=label, **style)
    for ax, (ylabel, xlabel) in zip(axes.flat, [("val loss", "epoch"), ("val loss", "training seconds"),
                                                 ("val BLEU", "epoch"), ("val BLEU", "training seconds")]):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    losses = [e["val_loss"] for r in records for e in r.get("epochs", [])]
    if losses:  # a diverged run would squash every other curve: cut the axis at 8 nats
        for ax in axes[0]:
            ax.set_ylim(min(losses) - 0.2, min(max(losses), 8.0) + 0.2)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    columns = 3 if len(shown) > 8 else 4
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    rows = math.ceil(len(shown) / columns)
    fig.tight_layout(rect=(0, min(0.02 + 0.016 * rows, 0.5), 1, 1))
    fig.savefig(path, dpi=110)


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores ({cores} used, "
            f"{torch.get_num_threads()} torch threads), {gpu}, torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="raw Multi30K files (default: the Hub dataset)")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--methods", default="adamw:1e-3,adamw:3e-3,fngd:1e-2,ngd:1e-2,kfac:1e-2,sgd:1e-1")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "convergence")
    parser.add_argument("extra", nargs="*", help="more recipe flags for every run (after --)")
    parser.add_argument("--fresh", action="store_true", help="forget the runs already in --out/curves.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # Runs accumulate in curves.json across invocations (a sweep can be split); same label = replaced.
    previous = args.out / "curves.json"
    records = [] if args.fresh or not previous.exists() else json.loads(previous.read_text())["runs"]
    for name, lr, variant in parse_methods(args.methods):
        record = run_method(name, lr, args, args.out, variant)
        records = [r for r in records if run_label(r) != run_label(record)] + [record]
        last = record.get("epochs", [{}])[-1]
        print(f"{run_label(record):<28} val loss {last.get('val_loss', float('nan')):.3f}  val BLEU "
              f"{last.get('val_bleu') or float('nan'):.2f}  source gap {last.get('source_gap') or float('nan'):.3f}  "
              f"test {json.dumps(record.get('test', {}))}  {record.get('error', '')[-300:]}", flush=True)
        summary = {"setting": args.setting, "machine": machine(), "recipe_flags": SETTINGS[args.setting], "runs": records}
        (args.out / "curves.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(records, args.out / "curves.png", f"Multi30K en-de, setting '{args.setting}': {machine()}")


if __name__ == "__main__":
    main()
