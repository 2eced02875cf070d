"""Host time FNGD adds per managed layer to a forward+backward, against plain ``nn.Linear``.

    python benchmarks/capture_overhead.py                 # 32 Linear(32, 32), batch 2 x 20 tokens
    python benchmarks/capture_overhead.py --layers 64 --width 64 --rounds 100

A stack of small ``Linear`` layers on one CPU thread: the arithmetic is negligible, so what is
measured is the host's share of a step (what bounds a GPU step at the issue's size): the capture
(forward), the autograd function and FNGD's per-layer work in backward. Three models run
interleaved in one process, each timed by the main thread's CPU time: plain ``nn.Linear``, FNGD
in the shared phase and FNGD in its first epoch, the latter two on FNGD's GPU code path (token
Gram, Cholesky checked at ``step()``, no padding-token removal, the first epoch's layers batched at
the end of backward: here all 32 are one group, the best case). Prints the median microseconds
per layer of a forward+backward, the excess over plain and the ratio to plain. ``step()`` is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fngd_hf import FNGD  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds of --repeats steps per model")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(args.batch_size, args.tokens, args.width)

    def stack():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])

    def fngd_step_fn(steps_per_epoch):
        model = stack()
        opt = FNGD(model, lr=1e-3, steps_per_epoch=steps_per_epoch, launch_bound=True)  # FNGD's GPU code path

        def forward_backward():
            opt.zero_grad(set_to_none=True)
            model(x).sum().backward()

        for _ in range(4):  # past the first epoch for steps_per_epoch=2
            forward_backward()
            opt.step()
        opt.diagnostics()
        return forward_backward, opt

    plain_model = stack()

    def plain():
        plain_model.zero_grad(set_to_none=True)
        plain_model(x).sum().backward()

    shared, shared_opt = fngd_step_fn(2)
    first, first_opt = fngd_step_fn(1000)  # an epoch longer than the warm-up: every step forms K
    runs = {"plain nn.Linear": plain, "FNGD shared phase": shared, "FNGD first epoch": first}
    per_layer = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.thread_time()
            for _ in range(args.repeats):
                fn()
            per_layer[name].append((time.thread_time() - start) / args.repeats / args.layers * 1e6)
    # No step() ran during the timing, so each phase's path is what it was after warm-up; say so.
    assert shared_opt.diagnostics()["fngd/fresh_fraction"] == 0.0
    assert first_opt.diagnostics()["fngd/fresh_fraction"] == 1.0
    base = statistics.median(per_layer["plain nn.Linear"])
    print(f"{args.layers} x Linear({args.width}, {args.width}), batch {args.batch_size} x {args.tokens} tokens, "
          f"one thread, median of {args.rounds} rounds | torch {torch.__version__}")
    for name, values in per_layer.items():
        median = statistics.median(values)
        print(f"{name:18s} forward+backward {median:7.1f} us per layer  (+{median - base:6.1f} over plain, "
              f"{median / base:.2f}x)")


if __name__ == "__main__":
    main()
