"""Quick stability trial of FNGD's safeguards on a small Multi30K translation model (CPU-sized).

    python benchmarks/stability_trial.py --data-dir ../shared/data/multi30k --out docs/stability_trial.json

Trains the same tiny Marian model (same init, same batches) with AdamW and with FNGD under
several damping / safeguard settings for a few epochs, and prints the validation loss after
each epoch (``nan``/``inf`` = diverged). This is what chose FNGD's default safeguards.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import MarianConfig, MarianMTModel

from fngd_hf import FNGD

PAD, EOS = 0, 1


def read_pairs(data_dir: Path, split: str, limit: int) -> list[tuple[str, str]]:
    en = (data_dir / f"{split}.en").read_text(encoding="utf-8").splitlines()[:limit]
    de = (data_dir / f"{split}.de").read_text(encoding="utf-8").splitlines()[:limit]
    return [(a.strip(), b.strip()) for a, b in zip(en, de)]


def train_tokenizer(pairs, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"])
    tokenizer.train_from_iterator([s for pair in pairs for s in pair], trainer)
    return tokenizer


def batches(pairs, tokenizer, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(len(pairs), generator=generator) if generator is not None else torch.arange(len(pairs))
    for start in range(0, len(pairs) - batch_size + 1, batch_size):
        chunk = [pairs[i] for i in order[start : start + batch_size].tolist()]
        src = [tokenizer.encode(a).ids[:40] + [EOS] for a, _ in chunk]
        tgt = [tokenizer.encode(b).ids[:40] + [EOS] for _, b in chunk]
        pad = lambda seqs, value: torch.tensor([s + [value] * (max(map(len, seqs)) - len(s)) for s in seqs])
        input_ids = pad(src, PAD)
        yield {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long(), "labels": pad(tgt, -100)}


def build_model(vocab_size: int, seed: int) -> MarianMTModel:
    torch.manual_seed(seed)
    config = MarianConfig(
        vocab_size=vocab_size, decoder_vocab_size=vocab_size, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
        max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
        dropout=0.1, scale_embedding=True, share_encoder_decoder_embeddings=True,
    )
    return MarianMTModel(config)


@torch.no_grad()
def validation_loss(model, val_batches) -> float:
    model.eval()
    total = count = 0.0
    for batch in val_batches:
        n = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train()
    return total / count


def run(name, make_optimizer, pairs, val_batches, tokenizer, args) -> dict:
    model = build_model(tokenizer.get_vocab_size(), seed=0)
    steps_per_epoch = len(pairs) // args.batch_size
    opt = make_optimizer(model, steps_per_epoch)
    generator = torch.Generator().manual_seed(1)
    curve, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        for batch in batches(pairs, tokenizer, args.batch_size, generator):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        value = validation_loss(model, val_batches)
        curve.append(value if math.isfinite(value) else float("inf"))
        print(f"{name:<42} epoch {epoch + 1}: val loss {value:.3f}", flush=True)
        if not math.isfinite(value) or value > 20:
            break
    return {"name": name, "val_loss": curve, "seconds": time.perf_counter() - start,
            "skipped_steps": getattr(opt, "skipped_steps", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/multi30k"))
    parser.add_argument("--train-pairs", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--only", default=None, help="comma-separated substrings of run names")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    pairs = read_pairs(args.data_dir, "train", args.train_pairs)
    tokenizer = train_tokenizer(pairs, 2000)
    val_batches = list(batches(read_pairs(args.data_dir, "val", 512), tokenizer, 64, None))

    def fngd(bound=None, share=True, **kw):
        # "trust X" in a run name: a step moves a layer by at most X of its norm, i.e. trust_ratio = X / lr.
        kw.setdefault("trust_ratio", None if bound is None else bound / kw["lr"])
        return lambda model, p: FNGD(model, steps_per_epoch=p, share_coefficients=share, **kw)

    runs = {
        "adamw lr=1e-3": lambda model, p: torch.optim.AdamW(model.parameters(), lr=1e-3),
        "adamw lr=3e-3": lambda model, p: torch.optim.AdamW(model.parameters(), lr=3e-3),
        "fngd relative g=1 lr=1e-3 (paper: no safeguard)": fngd(lr=1e-3, damping=1.0, trust_ratio=None),
        "fngd relative g=1 lr=1e-2 (paper: no safeguard)": fngd(lr=1e-2, damping=1.0, trust_ratio=None),
        "fngd relative g=1 lr=1e-3 trust 0.1": fngd(lr=1e-3, damping=1.0, bound=0.1),
        "fngd relative g=1 lr=1e-2 trust 0.01": fngd(lr=1e-2, damping=1.0, bound=0.01),
        "fngd relative g=1 lr=1e-3 floor 1e-3": fngd(lr=1e-3, damping=1.0, trust_ratio=None, damping_floor=1e-3),
        "fngd fixed l=1e-3 lr=1e-3": fngd(lr=1e-3, damping=1e-3, damping_mode="fixed"),
        "fngd fixed l=1e-2 lr=1e-2 adamw 1e-3": fngd(lr=1e-2, damping=1e-2, damping_mode="fixed", adamw_lr=1e-3),
        "adamw lr=1e-2": lambda model, p: torch.optim.AdamW(model.parameters(), lr=1e-2),
        "fngd relative g=1 lr=3e-2 trust 0.01": fngd(lr=3e-2, damping=1.0, bound=0.01),
        "fngd relative g=1 lr=3e-2 trust 0.003": fngd(lr=3e-2, damping=1.0, bound=0.003),
        "fngd relative g=1 lr=1e-2 trust 0.01 adamw 3e-3": fngd(lr=1e-2, damping=1.0, bound=0.01, adamw_lr=3e-3),
        "fngd relative g=1 lr=1e-2 trust 0.01 refreshed": fngd(lr=1e-2, damping=1.0, bound=0.01, scale_mode="refreshed"),
        "ngd relative g=1 lr=1e-2 trust 0.01": fngd(lr=1e-2, damping=1.0, bound=0.01, share=False),
        "fngd relative g=0.1 lr=1e-2 trust 0.01": fngd(lr=1e-2, damping=0.1, bound=0.01),
    }
    if args.only:
        keys = args.only.split(",")
        runs = {k: v for k, v in runs.items() if any(key in k for key in keys)}
    results = [run(name, make, pairs, val_batches, tokenizer, args) for name, make in runs.items()]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
