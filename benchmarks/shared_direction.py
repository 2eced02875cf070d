"""How much curvature does a shared-phase FNGD step keep? Cosines per epoch on real Multi30K batches.

    python benchmarks/shared_direction.py --data-dir ../shared/data/multi30k --out docs/results/shared_direction.json

Trains FNGD at its defaults (coefficients shared by position after the first epoch) on a small Marian model
(benchmarks/stability_trial.py's: d_model 64, 2+2 layers) and at every step compares, per managed layer, three
directions on the same weights and batch (same dropout mask):

* ``used``: the direction FNGD applies (fresh in the first epoch, ``Σ_n β_old,n g_n`` after it), from
  ``opt.direction(p)``;
* ``fresh``: the natural gradient of this batch (an FNGD without sharing on a copy of the weights);
* ``plain``: the plain mean gradient (an uncaptured copy), i.e. SGD's direction, which is also the
  shared phase with uniform coefficients.

If the shared direction carries no curvature of the new batch, ``cos(used, plain)`` rises towards 1 in
the shared epochs while ``cos(used, fresh)`` falls. The ``*_orthogonalised`` cosines compare the same three
after Muon's Newton-Schulz orthogonalisation of each layer's ``[W|b]`` block (what ``step_length="muon"``
applies, before momentum): how much of the natural gradient's difference from the plain gradient survives
Muon's step. Means over layers and steps, per epoch. The trajectory follows ``--step-length`` (default: the
library's) at ``--lr`` (default: that step length's default rate).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stability_trial import batches, build_model, read_pairs, train_tokenizer  # noqa: E402

from fngd_hf import FNGD, settings  # noqa: E402
from fngd_hf.orthogonal import orthogonalized_block  # noqa: E402


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([t.flatten() for t in a]).double(), torch.cat([t.flatten() for t in b]).double()
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-300))


def orthogonalised(directions: list[torch.Tensor]) -> list[torch.Tensor]:
    """A Linear layer's ``[weight, bias]`` directions as Muon's step orthogonalises them."""
    weight, bias = directions if len(directions) == 2 else (directions[0], None)
    return [t for t in orthogonalized_block(weight.float(), None if bias is None else bias.float(), False) if t is not None]


def backward(model, batch, seed: int) -> None:
    torch.manual_seed(seed)  # the same dropout mask in every copy
    model(**batch).loss.backward()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--train-pairs", type=int, default=3200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--step-length", choices=settings.STEP_LENGTHS, default=settings.DEFAULT_STEP_LENGTH)
    parser.add_argument("--lr", type=float, default=None, help="default: the step length's default rate")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pairs = read_pairs(args.data_dir, "train", args.train_pairs)
    tokenizer = train_tokenizer(pairs, 2000)
    model = build_model(tokenizer.get_vocab_size(), seed=0).train()
    steps_per_epoch = len(pairs) // args.batch_size
    opt = FNGD(model, lr=args.lr, steps_per_epoch=steps_per_epoch, step_length=args.step_length)
    args.lr = opt.param_groups[0]["lr"]
    fresh_model = copy.deepcopy(model)  # a copy is uncaptured; this one gets an FNGD without sharing
    fresh_opt = FNGD(fresh_model, lr=args.lr, share_coefficients=False, step_length=args.step_length)
    plain_model = copy.deepcopy(model)
    layers = list(opt.managed_modules)
    generator = torch.Generator().manual_seed(1)
    epochs = []
    step = 0
    for epoch in range(args.epochs):
        per_step = {key + suffix: [] for suffix in ("", "_orthogonalised")
                    for key in ("used_plain", "fresh_plain", "used_fresh")}
        for batch in batches(pairs, tokenizer, args.batch_size, generator):
            for other in (fresh_model, plain_model):
                other.load_state_dict(model.state_dict())
                other.zero_grad(set_to_none=True)
            fresh_opt.zero_grad()
            backward(model, batch, step)
            backward(fresh_model, batch, step)
            backward(plain_model, batch, step)
            fresh_layers, plain_layers = fresh_opt.managed_modules, dict(plain_model.named_modules())
            for name in layers:
                used = [opt.direction(p) for p in opt.managed_modules[name].parameters()]
                fresh = [fresh_opt.direction(p) for p in fresh_layers[name].parameters()]
                plain = [p.grad for p in plain_layers[name].parameters()]
                per_step["used_plain"].append(cosine(used, plain))
                per_step["fresh_plain"].append(cosine(fresh, plain))
                per_step["used_fresh"].append(cosine(used, fresh))
                used, fresh, plain = orthogonalised(used), orthogonalised(fresh), orthogonalised(plain)
                per_step["used_plain_orthogonalised"].append(cosine(used, plain))
                per_step["fresh_plain_orthogonalised"].append(cosine(fresh, plain))
                per_step["used_fresh_orthogonalised"].append(cosine(used, fresh))
            opt.step()
            opt.zero_grad()
            step += 1
        row = {"epoch": epoch + 1, "phase": "fresh" if epoch == 0 else "shared",
               **{f"cos_{key}": statistics.fmean(values) for key, values in per_step.items()}}
        epochs.append(row)
        print(f"epoch {row['epoch']} ({row['phase']:>6}): cos(used, plain) {row['cos_used_plain']:.3f}  "
              f"cos(fresh, plain) {row['cos_fresh_plain']:.3f}  cos(used, fresh) {row['cos_used_fresh']:.3f}; "
              f"orthogonalised: {row['cos_used_plain_orthogonalised']:.3f} {row['cos_fresh_plain_orthogonalised']:.3f} "
              f"{row['cos_used_fresh_orthogonalised']:.3f}", flush=True)
    result = {"command": "python benchmarks/shared_direction.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "setting": {"train_pairs": len(pairs), "batch_size": args.batch_size, "steps_per_epoch": steps_per_epoch,
                          "lr": args.lr, "step_length": args.step_length, "model": "Marian d_model 64, 2+2 layers (benchmarks/stability_trial.py)",
                          "managed_layers": len(layers)},
              "epochs": epochs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
