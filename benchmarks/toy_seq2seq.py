"""Toy seq2seq benchmark: a tiny BART learns to reverse short token sequences through a STOCK
``transformers.Seq2SeqTrainer``, the way a new user would try FNGD against AdamW.

    OMP_NUM_THREADS=1 python benchmarks/toy_seq2seq.py \\
        --methods adamw:1e-3,fngd:1e-2,fngd:1e-2:share_coefficients=False --epochs 20 --out toy.json

Each ``--methods`` entry is ``name:lr[:overrides]`` with ``name`` in ``adamw``/``fngd`` and
``overrides`` FNGD (or AdamW) keyword arguments as ``key=value`` joined by ``+``, each value read
with ``ast.literal_eval`` (``fngd:1e-2:share_coefficients=False+trust_ratio=10``; a value that is
not a Python literal stays a string).

What is fixed for every run (only the optimizer differs):

* data: a deterministic generated task, ``--train-size`` / ``--eval-size`` sequences of
  ``--min-len``..``--max-len`` tokens drawn from ``--symbols`` symbols (seeded by ``--data-seed``);
  the target is the source reversed (``--task sort``: sorted). Held-out sequences are disjoint
  from the training ones.
* model: ``BartForConditionalGeneration`` from a config (no download): d_model 32, one encoder
  and one decoder layer, 2 heads, FFN 64, no dropout, initialised from ``--seed``.
* trainer: the stock ``Seq2SeqTrainer`` with the stock ``Seq2SeqTrainingArguments`` except
  ``per_device_train_batch_size``, ``num_train_epochs``, ``lr_scheduler_type="constant"``,
  ``gradient_accumulation_steps=1``, ``seed`` and, for FNGD runs, ``max_grad_norm=0`` (the stock
  Trainer would otherwise clip FNGD's natural-gradient direction together with the gradients).
  The optimizer goes in as ``optimizers=(opt, None)``: ``fngd_hf.FNGD(model, lr=...,
  steps_per_epoch=...)`` or ``torch.optim.AdamW(model.parameters(), lr=...)``. AdamW keeps the
  stock ``max_grad_norm=1.0``.

Reported per run: the final training loss (mean of the per-step losses of the last epoch),
held-out token accuracy and exact match from greedy decoding (teacher-free), held-out loss, and
the training wall-clock seconds. A JSON with every run (and the per-epoch training loss) goes to
``--out``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
)
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

PAD, BOS, EOS = 0, 1, 2
FIRST_SYMBOL = 3


# ------------------------------------------------------------------------------------------ data
def make_task(n_train: int, n_eval: int, symbols: int, min_len: int, max_len: int, task: str, seed: int):
    """Disjoint train/held-out lists of (source tokens, target tokens), deterministic in ``seed``."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    pairs = []
    while len(pairs) < n_train + n_eval:
        length = rng.randint(min_len, max_len)
        source = tuple(rng.randrange(FIRST_SYMBOL, FIRST_SYMBOL + symbols) for _ in range(length))
        if source in seen:
            continue
        seen.add(source)
        target = tuple(reversed(source)) if task == "reverse" else tuple(sorted(source))
        pairs.append((list(source), list(target)))
    return pairs[:n_train], pairs[n_train:]


class PairDataset(Dataset):
    def __init__(self, pairs):
        self.items = [
            {"input_ids": [BOS] + src + [EOS], "labels": tgt + [EOS]} for src, tgt in pairs
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def collate(features):
    """Pad sources with PAD (attention mask 0) and labels with -100 (ignored by the loss)."""
    width_in = max(len(f["input_ids"]) for f in features)
    width_out = max(len(f["labels"]) for f in features)
    input_ids = torch.full((len(features), width_in), PAD, dtype=torch.long)
    labels = torch.full((len(features), width_out), -100, dtype=torch.long)
    for row, f in enumerate(features):
        input_ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        labels[row, : len(f["labels"])] = torch.tensor(f["labels"])
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long(), "labels": labels}


# ----------------------------------------------------------------------------------------- model
def build_model(vocab_size: int, max_len: int, seed: int) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=vocab_size, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=max(64, max_len + 8), dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
        forced_bos_token_id=None, forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config)


# ---------------------------------------------------------------------------------------- methods
def parse_methods(text: str) -> list[dict]:
    """``'adamw:1e-3,fngd:1e-2:share_coefficients=False+trust_ratio=10'`` -> run specs."""
    runs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":", 2)
        if len(parts) < 2:
            raise SystemExit(f"--methods entry {item!r}: expected name:lr[:key=value+key=value]")
        name, lr = parts[0].strip().lower(), float(parts[1])
        if name not in ("adamw", "fngd"):
            raise SystemExit(f"--methods entry {item!r}: method must be adamw or fngd")
        overrides = {}
        if len(parts) == 3 and parts[2].strip():
            for pair in parts[2].split("+"):
                key, sep, value = pair.partition("=")
                if not sep or not key.strip():
                    raise SystemExit(f"--methods entry {item!r}: override {pair!r} is not key=value")
                try:
                    overrides[key.strip()] = ast.literal_eval(value.strip())
                except (ValueError, SyntaxError):
                    overrides[key.strip()] = value.strip()
        runs.append({"method": name, "lr": lr, "overrides": overrides, "spec": item})
    if not runs:
        raise SystemExit("--methods is empty")
    return runs


def build_optimizer(run: dict, model, steps_per_epoch: int):
    if run["method"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=run["lr"], **run["overrides"])
    from fngd_hf import FNGD

    kwargs = dict(steps_per_epoch=steps_per_epoch)
    kwargs.update(run["overrides"])
    return FNGD(model, lr=run["lr"], **kwargs)


class EpochLoss(TrainerCallback):
    """Per-epoch mean of the per-step training losses (the Trainer logs every step here)."""

    def __init__(self):
        self.current: list[float] = []
        self.per_epoch: list[float] = []
        self.diagnostics: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.current.append(float(logs["loss"]))

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.current:
            self.per_epoch.append(sum(self.current) / len(self.current))
        self.current = []


class DiagnosticsCallback(TrainerCallback):
    """FNGD's own diagnostics (damping, Gram norm, trust-region clipping), one record per epoch."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.records: list[dict] = []

    def on_epoch_end(self, args, state, control, **kwargs):
        diagnostics = getattr(self.optimizer, "diagnostics", None)
        if diagnostics is not None:
            values = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in diagnostics().items()}
            self.records.append({"epoch": round(state.epoch or 0.0), **values})


@torch.no_grad()
def held_out_metrics(model, dataset: PairDataset, batch_size: int = 256) -> dict:
    """Greedy decoding: token accuracy (position-wise, over target length incl. EOS) and exact match;
    plus the teacher-forced held-out loss."""
    model.eval()
    correct = total = exact = 0
    loss_sum = tokens = 0.0
    for start in range(0, len(dataset), batch_size):
        features = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        batch = collate(features)
        out = model(**batch)
        n = int((batch["labels"] != -100).sum())
        loss_sum += float(out.loss) * n
        tokens += n
        width = batch["labels"].shape[1]
        generated = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            max_new_tokens=width + 1, num_beams=1, do_sample=False,
        )
        for row, f in enumerate(features):
            target = f["labels"]
            hyp = generated[row].tolist()
            hyp = [t for t in hyp if t not in (BOS,)]
            if hyp and hyp[0] == EOS:  # decoder_start_token_id
                hyp = hyp[1:]
            hyp = hyp[: len(target)]
            hyp += [PAD] * (len(target) - len(hyp))
            hits = sum(int(a == b) for a, b in zip(hyp, target))
            correct += hits
            total += len(target)
            exact += int(hits == len(target))
    return {"token_accuracy": correct / total, "exact_match": exact / len(dataset), "eval_loss": loss_sum / tokens}


def run_one(run: dict, args, train_set: PairDataset, eval_set: PairDataset, vocab_size: int) -> dict:
    model = build_model(vocab_size, args.max_len + 2, args.seed)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    optimizer = build_optimizer(run, model, steps_per_epoch)
    is_fngd = run["method"] == "fngd"
    training_args = Seq2SeqTrainingArguments(
        output_dir=os.path.join(args.work_dir, run["spec"].replace(":", "_").replace("+", "_")),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=run["lr"],  # informational: the optimizer is passed in
        lr_scheduler_type="constant",
        gradient_accumulation_steps=1,
        max_grad_norm=0.0 if is_fngd else 1.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    losses = EpochLoss()
    callbacks = [losses]
    diag = None
    if is_fngd:
        diag = DiagnosticsCallback(optimizer)
        callbacks.append(diag)
    trainer = Seq2SeqTrainer(
        model=model, args=training_args, train_dataset=train_set, data_collator=collate,
        optimizers=(optimizer, None), callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # logging every step (for the epoch means) would flood stdout
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = held_out_metrics(model, eval_set)
    if is_fngd and hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()
    final = losses.per_epoch[-1] if losses.per_epoch else float("nan")
    return {
        "spec": run["spec"], "method": run["method"], "lr": run["lr"], "overrides": run["overrides"],
        "final_train_loss": final, "train_loss_per_epoch": losses.per_epoch, **metrics,
        "train_seconds": seconds, "steps_per_epoch": steps_per_epoch,
        "fngd_diagnostics_per_epoch": diag.records if diag else None,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="adamw:1e-3,fngd:1e-2,fngd:1e-2:share_coefficients=False",
                        help="comma-separated name:lr[:key=value+key=value] (name: adamw or fngd)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="model init and data order")
    parser.add_argument("--task", choices=("reverse", "sort"), default="reverse")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--min-len", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=8)
    parser.add_argument("--data-seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--work-dir", default="/tmp/toy_seq2seq", help="Trainer output_dir root (nothing is saved)")
    parser.add_argument("--out", default="toy_seq2seq.json", help="JSON with every run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    runs = parse_methods(args.methods)

    train_pairs, eval_pairs = make_task(args.train_size, args.eval_size, args.symbols, args.min_len, args.max_len,
                                        args.task, args.data_seed)
    train_set, eval_set = PairDataset(train_pairs), PairDataset(eval_pairs)
    vocab_size = FIRST_SYMBOL + args.symbols

    header = f"{'method':<50} {'lr':>8} {'train loss':>10} {'tok acc':>8} {'exact':>6} {'eval loss':>9} {'sec':>7}"
    print(header, flush=True)
    results = []
    record = {
        "task": args.task, "train_size": args.train_size, "eval_size": args.eval_size, "symbols": args.symbols,
        "length": [args.min_len, args.max_len], "epochs": args.epochs, "batch_size": args.batch_size,
        "seed": args.seed, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "command": "python " + " ".join(sys.argv),
        "runs": results,
    }
    for run in runs:
        result = run_one(run, args, train_set, eval_set, vocab_size)
        results.append(result)
        print(f"{result['spec']:<50} {result['lr']:>8.0e} {result['final_train_loss']:>10.4f} "
              f"{result['token_accuracy']:>8.3f} {result['exact_match']:>6.3f} {result['eval_loss']:>9.4f} "
              f"{result['train_seconds']:>7.1f}", flush=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")  # partial results kept
    return results


if __name__ == "__main__":
    main()
