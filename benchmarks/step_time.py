"""Training-step time and memory: AdamW vs FNGD (first epoch, shared phase) vs NGD, one process, interleaved.

    # CPU (a few minutes; --threads 1 keeps a shared 2-core box from oversubscribing):
    python benchmarks/step_time.py --preset small --device cpu --threads 1 --steps 8 --warmup 3 --out step_time_cpu.json
    # GPU, the issue's setting (d_model 512, 6+6 layers, batch 64), fp32 and bf16 autocast:
    python benchmarks/step_time.py --preset paper --device cuda --steps 30 --warmup 5 --out step_time_gpu_fp32.json
    python benchmarks/step_time.py --preset paper --device cuda --steps 30 --warmup 5 --bf16 --out step_time_gpu_bf16.json
    # Where FNGD's extra time goes (per-function timers, torch.profiler tables, shape micro-benchmarks):
    python benchmarks/step_time.py --preset paper --device cuda --bf16 --no-measure --profile --micro --out prof.json

Model: a randomly initialised Marian (post-norm Transformer, tied embeddings) built from a config by
``fngd_hf.translation.models`` (no download): ``small`` = d_model 256 / FFN 1024 / 4 heads / 3+3 layers,
``paper`` = 512 / 2048 / 8 / 6+6. Data: ``--batches`` fixed batches of ``--batch-size`` sentence
pairs of random token ids whose lengths follow Multi30K's (source about 13 subword tokens on
average, target about 15, eos included), padded per batch; every method sees the same batch at the
same step.

Methods (``--methods``, comma separated):

* ``adamw``: ``torch.optim.AdamW`` (``foreach=True`` on GPU);
* ``sgd``: ``torch.optim.SGD`` with momentum, a floor;
* ``muon``: ``fngd_hf.muon.MuonHybrid``: ``torch.optim.Muon`` (5 Newton-Schulz iterations in bf16 per weight) on
  the weights of FNGD's layers, ``torch.optim.AdamW`` on the rest (multi-tensor wherever ``adamw`` is);
* ``fngd_first``: FNGD in its first epoch (``share_coefficients=True``, ``steps_per_epoch`` = an
  epoch of Multi30K and more than the steps run, so every step forms ``K`` and solves);
* ``fngd_shared``: FNGD in the shared phase (``steps_per_epoch=2``; the warm-up is longer than 2
  steps, so every measured step reuses stored coefficients and forms no ``K``);
* ``ngd``: FNGD with ``share_coefficients=False`` (fresh coefficients at every step);
* variants (not in the default list): ``fngd_first_token`` / ``fngd_first_ps`` (``gram_path``
  forced), ``fngd_first_checked`` (``solve_check="per_layer"``: a host sync per layer, the GPU
  default before the check moved to ``step()``), ``fngd_first_batched`` / ``fngd_first_unbatched``
  (``batch_layers`` forced on / off; ``"auto"`` batches on GPUs), ``fngd_first_padded`` (batched, keeping
  the padding tokens the batched path drops with one host read per backward); the other methods of the package: ``cwngd_first`` / ``cwngd_shared``, ``kfac`` (factors
  every step, inverses every 10), ``sngd`` (refresh every 10), ``shampoo`` (pytorch-optimizer,
  preconditioners every 10 steps). K-FAC/SNGD/Shampoo medians include their periodic refresh steps.

``--clock thread`` (CPU, ``--threads 1``) times each step by the main thread's CPU time instead of
the wall clock: on a shared or virtual machine it leaves out the time other processes take.

A measured step is ``zero_grad(set_to_none=True)`` + forward (under bf16 autocast with
``--bf16``) + backward + ``optimizer.step()``, bracketed by ``torch.cuda.synchronize()`` on GPU.
Rounds go through the methods in a rotating order, so drift (clocks, thermals, other load) hits
all of them alike. Reported: median (and p10/p90) step time, ratio of medians to AdamW's in the
same run, and on GPU the peak memory of the step above what was resident before it
(``max_memory_allocated - memory_allocated``: activations, gradients, temporaries) plus the
resident optimizer state. On CPU memory is not reported (RSS of a shared process says nothing
per method). Then one more step per method counts its aten operators (views left out; on a GPU
each is at least one kernel launch), host reads (``_local_scalar_dense``, and the batched first
epoch's one read of its kept-token counts) and matmul FLOPs (``torch.utils.flop_counter``); with
``--gpu-code-path`` FNGD takes its GPU path on the CPU and AdamW/SGD (the baselines and FNGD's own
AdamW part) their multi-tensor update, so a machine without a GPU can count what a GPU step would
launch and time the host's share of it (with ``--preset tiny --batch-size 2 --threads 1`` the
arithmetic is negligible, as it is for a GPU at the issue's size). The two ends of a GPU step:
the host-bound one timed that way, the arithmetic-bound one counted in FLOPs at the issue's size
without timing (``--count-only``):

    python benchmarks/step_time.py --preset paper --device cpu --gpu-code-path --count-only --warmup 3 \
        --methods adamw,fngd_first,fngd_first_padded,fngd_first_unbatched,fngd_shared

``--profile`` then times FNGD's pieces (``fngd_hf.functional`` functions and the optimizer's
hooks, each bracketed by synchronisations, so they add up to device time, not to the overlapped
step time), and prints ``torch.profiler`` tables; ``--micro`` times the maths on the model's layer
shapes alone (token vs per-sample Gram, fp32 vs TF32 vs bf16, solve with and without host sync,
the shared input Gram of q/k/v).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fngd_hf  # noqa: E402
from fngd_hf import CWNGD, FNGD, KFAC, SNGD  # noqa: E402
from fngd_hf import functional as F  # noqa: E402
from fngd_hf.base import LayerwiseOptimizer  # noqa: E402
from fngd_hf.translation.models import build_config, resolve_shape  # noqa: E402

PAD, EOS = 0, 1
MULTI30K_STEPS_PER_EPOCH = 29000 // 64 + 1  # 454: the bank size a real first epoch would have
DEFAULT_METHODS = "adamw,sgd,muon,fngd_first,fngd_shared,ngd"
VARIANTS = ("fngd_first_token", "fngd_first_ps", "fngd_first_checked", "fngd_first_batched", "fngd_first_unbatched", "fngd_first_padded", "fngd_first_graft", "fngd_shared_graft", "cwngd_first", "cwngd_shared", "kfac", "sngd", "shampoo")


# ---------------------------------------------------------------------------------------- data
def make_batches(n_batches, batch_size, vocab_size, src_mean, tgt_mean, seed, device):
    """Random ids with Multi30K-like lengths (normal, sd ~ a third of the mean, clipped), padded per batch."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        src_len = (torch.randn(batch_size, generator=gen) * src_mean / 3 + src_mean).round().clamp(3, 4 * src_mean).long()
        tgt_len = (torch.randn(batch_size, generator=gen) * tgt_mean / 3 + tgt_mean).round().clamp(3, 4 * tgt_mean).long()
        src = torch.randint(2, vocab_size, (batch_size, int(src_len.max())), generator=gen)
        tgt = torch.randint(2, vocab_size, (batch_size, int(tgt_len.max())), generator=gen)
        src_mask = torch.arange(src.shape[1]) < src_len[:, None]
        tgt_mask = torch.arange(tgt.shape[1]) < tgt_len[:, None]
        src[torch.arange(batch_size), src_len - 1] = EOS
        tgt[torch.arange(batch_size), tgt_len - 1] = EOS
        src = src.masked_fill(~src_mask, PAD)
        labels = tgt.masked_fill(~tgt_mask, -100)
        batches.append(
            dict(input_ids=src.to(device), attention_mask=src_mask.long().to(device), labels=labels.to(device))
        )
    return batches


# --------------------------------------------------------------------------------------- model
def build_model(preset, vocab_size, seed, dropout):
    from transformers import MarianMTModel

    shape = resolve_shape(preset, dropout=dropout)
    config = build_config(shape, vocab_size, dict(pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD))
    torch.manual_seed(seed)
    return MarianMTModel(config), shape


# ---------------------------------------------------------------------------------- variants
# ------------------------------------------------------------------------------- optimizers
def make_optimizer(method, model, device, total_steps):
    return as_on_gpu(_make_optimizer(method, model, device, total_steps))


def _make_optimizer(method, model, device, total_steps):
    first_epoch = max(MULTI30K_STEPS_PER_EPOCH, total_steps + 1)
    fngd_kwargs = dict(lr=1e-3, damping=1.0, adamw_lr=1e-4, launch_bound=True if _FOREACH_ON_CPU else "auto")
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=device.type == "cuda" or _FOREACH_ON_CPU)
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=device.type == "cuda" or _FOREACH_ON_CPU)
    if method == "muon":
        from fngd_hf.muon import MuonHybrid

        opt = MuonHybrid(model, lr=1e-4)  # AdamW-scale lr (adjust_lr_fn="match_rms_adamw"), AdamW part alike
        for group in opt.adamw.param_groups:  # the AdamW part's update as the adamw baseline's
            group["foreach"] = device.type == "cuda" or _FOREACH_ON_CPU
        return opt
    if method == "fngd_first":
        return FNGD(model, share_coefficients=True, steps_per_epoch=first_epoch, **fngd_kwargs)
    if method == "fngd_first_token":
        return FNGD(model, share_coefficients=True, steps_per_epoch=first_epoch, gram_path="token", **fngd_kwargs)
    if method == "fngd_first_ps":
        return FNGD(model, share_coefficients=True, steps_per_epoch=first_epoch, gram_path="per_sample", **fngd_kwargs)
    if method == "fngd_first_checked":
        return FNGD(model, share_coefficients=True, steps_per_epoch=first_epoch, solve_check="per_layer", **fngd_kwargs)
    if method in ("fngd_first_batched", "fngd_first_unbatched"):
        batched = method == "fngd_first_batched"
        return FNGD(model, share_coefficients=True, steps_per_epoch=first_epoch, batch_layers=batched, **fngd_kwargs)
    if method == "fngd_first_padded":  # the batched path keeping its padding tokens (no host read in backward)
        return FNGD(model, share_coefficients=True, steps_per_epoch=first_epoch, batch_layers=True, drop_padding=False,
                    **fngd_kwargs)
    if method in ("fngd_first_graft", "fngd_shared_graft"):  # grafting: + a plain weight gradient per layer
        period = first_epoch if method == "fngd_first_graft" else 2
        return FNGD(model, share_coefficients=True, steps_per_epoch=period, step_length="adamw", **fngd_kwargs)
    if method == "fngd_shared":
        return FNGD(model, share_coefficients=True, steps_per_epoch=2, **fngd_kwargs)
    if method == "ngd":
        return FNGD(model, share_coefficients=False, **fngd_kwargs)
    if method == "cwngd_first":
        return CWNGD(model, share_coefficients=True, steps_per_epoch=first_epoch, **fngd_kwargs)
    if method == "cwngd_shared":
        return CWNGD(model, share_coefficients=True, steps_per_epoch=2, **fngd_kwargs)
    if method == "kfac":  # the paper's peers at their usual update frequencies
        return KFAC(model, lr=1e-3, damping=0.1, adamw_lr=1e-4, factor_update_freq=1, inverse_update_freq=10)
    if method == "sngd":
        return SNGD(model, lr=1e-3, damping=0.1, adamw_lr=1e-4, update_freq=10)
    if method == "shampoo":
        from fngd_hf.shampoo import build_shampoo

        return build_shampoo(model, lr=1e-3, adamw_lr=1e-4, preconditioning_compute_steps=10)
    raise ValueError(f"unknown method {method!r}; choose from {DEFAULT_METHODS},{','.join(VARIANTS)}")


def state_bytes(opt):
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


# --------------------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device, bf16):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_step(model, opt, batch, device, bf16, phases=None):
    """One full step; with ``phases`` (a dict) also the forward / backward / step split (extra syncs)."""
    opt.zero_grad(set_to_none=True)
    if phases is not None:
        sync(device)
        t0 = time.perf_counter()
    with autocast(device, bf16):
        loss = model(**batch).loss
    if phases is not None:
        sync(device)
        t1 = time.perf_counter()
    loss.backward()
    if phases is not None:
        sync(device)
        t2 = time.perf_counter()
    opt.step()
    if phases is not None:
        sync(device)
        t3 = time.perf_counter()
        for key, value in (("forward", t1 - t0), ("backward", t2 - t1), ("step", t3 - t2)):
            phases.setdefault(key, []).append(value)
    return loss.detach()


def quantile(values, q):
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


# Operators that only make a new view (no kernel, no memory traffic): left out of the counts.
_VIEW_OPS = {"view", "_unsafe_view", "reshape", "detach", "alias", "select", "slice", "t", "transpose", "permute",
             "unsqueeze", "squeeze", "expand", "as_strided", "diagonal", "unbind", "split", "lift_fresh"}


_FOREACH_ON_CPU = False  # set by emulate_gpu_code_path: AdamW and SGD as on a GPU


def emulate_gpu_code_path():
    """Make every optimizer built here take, on a CPU, the path it takes on a GPU: FNGD with
    ``launch_bound=True`` (the token Gram, Cholesky checked once per step, the first epoch's layers batched
    at the end of backward, no per-layer padding removal) and every AdamW and SGD update multi-tensor
    (``foreach``, torch's default on GPUs). Same numbers; used to count the operators (kernel launches on a
    GPU) a GPU step would make, and to time the host's share of it, on a machine without one."""
    global _FOREACH_ON_CPU
    _FOREACH_ON_CPU = True


def as_on_gpu(opt):
    """With :func:`emulate_gpu_code_path`: the AdamW part of a layer-wise optimizer multi-tensor, as on a GPU."""
    if _FOREACH_ON_CPU and isinstance(opt, LayerwiseOptimizer):
        for group in opt.param_groups:
            if not group["fngd"]:
                group["foreach"] = True
    return opt


def count_ops(model, opt, batch, device, bf16):
    """``{"ops": aten operators that are not views, "host_reads": _local_scalar_dense calls and FNGD's count
    reads, "gflop": matmul FLOPs (torch.utils.flop_counter), "held_mib": the most inputs and output gradients
    the batched first epoch held at one round}`` in one step.

    On a GPU each operator is (at least) one kernel launch, and a step at this size is bound by
    the host, so this counts what a step costs there beyond its arithmetic; a host read is a
    device-to-host copy (a sync on GPUs; torch's AdamW reads its CPU step counters this way).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        ops = host_reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _VIEW_OPS:
                Counter.ops += 1
            if name == "_local_scalar_dense":
                Counter.host_reads += 1
            return func(*args, **(kwargs or {}))

    from torch.utils.flop_counter import FlopCounterMode

    flops = FlopCounterMode(display=False)
    batched = isinstance(opt, FNGD)
    if batched:  # its own counters: the padding drop's count reads (.tolist(), not dispatched) and held bytes
        reads_before, opt.peak_held_bytes = opt.host_reads, 0
    with Counter(), flops:
        train_step(model, opt, batch, device, bf16)
    if batched:
        Counter.host_reads += opt.host_reads - reads_before
    held_bytes = [opt.peak_held_bytes if batched else 0]
    return dict(ops_per_step=Counter.ops, host_reads_per_step=Counter.host_reads,
                gflop_per_step=flops.get_total_flops() / 1e9, held_mib=held_bytes[0] / 2**20)


def measure(methods, base_model, batches, args, device):
    # "thread": CPU time of this thread, blind to time the VM or other processes take (CPU, one thread).
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    runs = {}
    for method in methods:
        model = copy.deepcopy(base_model).to(device).train()
        opt = make_optimizer(method, model, device, args.warmup + args.steps)
        runs[method] = dict(model=model, opt=opt, times=[], peaks=[], losses=[], phases={})
    rounds = args.warmup + args.steps
    for r in range(rounds):
        k = r % len(methods)
        order = methods[k:] + methods[:k]  # rotate who goes first
        batch = batches[r % len(batches)]
        if r == args.warmup:  # diagnostics from here on cover the measured steps only
            for run in runs.values():
                if isinstance(run["opt"], FNGD):
                    run["opt"].diagnostics()
        for method in order:
            run = runs[method]
            if device.type == "cuda":
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            sync(device)
            start = clock()
            loss = train_step(run["model"], run["opt"], batch, device, args.bf16)
            sync(device)
            elapsed = clock() - start
            if r >= args.warmup:
                run["times"].append(elapsed)
                run["losses"].append(loss.item())
                if device.type == "cuda":
                    run["peaks"].append(torch.cuda.max_memory_allocated(device) - resident)
        if args.verbose:
            print(f"round {r + 1}/{rounds} done", flush=True)
    # Phase split, measured after the interleaved timing (its syncs would perturb the totals).
    if args.breakdown_steps:
        for r in range(args.breakdown_steps):
            batch = batches[(rounds + r) % len(batches)]
            for method in methods:
                run = runs[method]
                train_step(run["model"], run["opt"], batch, device, args.bf16, phases=run["phases"])
    # Operator count of one more step each (after the timing: the counting mode slows the step down).
    op_counts = {method: count_ops(run["model"], run["opt"], batches[rounds % len(batches)], device, args.bf16)
                 for method, run in runs.items()}
    results = {}
    for method, run in runs.items():
        opt, times = run["opt"], run["times"]
        res = dict(
            median_ms=1e3 * statistics.median(times),
            p10_ms=1e3 * quantile(times, 0.1),
            p90_ms=1e3 * quantile(times, 0.9),
            mean_ms=1e3 * statistics.fmean(times),
            times_ms=[1e3 * t for t in times],
            final_loss=run["losses"][-1],
            state_mb=state_bytes(opt) / 2**20,
            skipped_steps=getattr(opt, "skipped_steps", 0),
            **op_counts[method],
        )
        if run["peaks"]:
            res["step_peak_mb"] = max(run["peaks"]) / 2**20
        if run["phases"]:
            res["phases_ms"] = {k: 1e3 * statistics.median(v) for k, v in run["phases"].items()}
        if isinstance(opt, FNGD):
            diag = opt.diagnostics()
            res["fresh_fraction"] = diag["fngd/fresh_fraction"]  # measured (and breakdown) steps
            res["managed_layers"] = len(opt.managed_modules)
        results[method] = res
    return results, runs


def count_only(methods, base_model, batches, args, device):
    """``count_ops`` of one step per method after ``--warmup`` steps, with no timing: what a step launches
    and multiplies, at a size where timing the GPU code path on a CPU would say nothing."""
    results = {}
    for method in methods:
        model = copy.deepcopy(base_model).to(device).train()
        opt = make_optimizer(method, model, device, args.warmup + 1)
        for r in range(args.warmup):
            train_step(model, opt, batches[r % len(batches)], device, args.bf16)
        results[method] = count_ops(model, opt, batches[args.warmup % len(batches)], device, args.bf16)
        del model, opt
    return results


def print_counts(results, reference="adamw", out=sys.stdout):
    ref = results.get(reference, {})
    print(f"{'method':<22}{'ops':>7}{'x ops':>7}{'reads':>7}{'GFLOP':>9}{'x flop':>8}{'held MiB':>9}", file=out)
    for method, r in results.items():
        line = f"{method:<22}{r['ops_per_step']:>7}"
        line += f"{r['ops_per_step'] / ref['ops_per_step']:>6.2f}x" if ref else f"{'':>7}"
        line += f"{r['host_reads_per_step']:>7}{r['gflop_per_step']:>9.1f}"
        line += f"{r['gflop_per_step'] / ref['gflop_per_step']:>7.2f}x" if ref else f"{'':>8}"
        line += f"{r['held_mib']:>9.0f}"
        print(line, file=out)


def print_table(results, reference="adamw", out=sys.stdout):
    ref = results.get(reference, {}).get("median_ms")
    has_mem = any("step_peak_mb" in r for r in results.values())
    has_phase = any("phases_ms" in r for r in results.values())
    head = f"{'method':<20}{'median ms':>10}{'p10':>8}{'p90':>8}{'x ' + reference:>9}"
    if has_mem:
        head += f"{'step peak MB':>14}{'state MB':>10}{'x mem':>7}"
    if has_phase:
        head += f"{'fwd':>7}{'bwd':>7}{'step':>7}"
    head += f"{'fresh K':>8}{'skipped':>8}{'ops':>7}{'x ops':>7}{'reads':>7}{'GFLOP':>8}{'x flop':>7}"
    print(head, file=out)
    ref_ops = results.get(reference, {}).get("ops_per_step")
    ref_flop = results.get(reference, {}).get("gflop_per_step")
    ref_mem = None
    if has_mem and reference in results:
        ref_mem = results[reference]["step_peak_mb"] + results[reference]["state_mb"]
    for method, r in results.items():
        line = f"{method:<20}{r['median_ms']:>10.1f}{r['p10_ms']:>8.1f}{r['p90_ms']:>8.1f}"
        line += f"{r['median_ms'] / ref:>8.2f}x" if ref else f"{'':>9}"
        if has_mem:
            mem = r.get("step_peak_mb", float("nan")) + r["state_mb"]
            line += f"{r.get('step_peak_mb', float('nan')):>14.0f}{r['state_mb']:>10.0f}"
            line += f"{mem / ref_mem:>6.2f}x" if ref_mem else f"{'':>7}"
        if has_phase:
            p = r.get("phases_ms", {})
            line += "".join(f"{p.get(k, float('nan')):>7.1f}" for k in ("forward", "backward", "step"))
        fresh = r.get("fresh_fraction")
        line += f"{fresh:>8.2f}" if fresh is not None else f"{'-':>8}"
        line += f"{r['skipped_steps']:>8}"
        if "ops_per_step" in r:
            line += f"{r['ops_per_step']:>7}" + (f"{r['ops_per_step'] / ref_ops:>6.2f}x" if ref_ops else f"{'':>7}")
            line += f"{r['host_reads_per_step']:>7}"
        if "gflop_per_step" in r:
            line += f"{r['gflop_per_step']:>8.1f}" + (f"{r['gflop_per_step'] / ref_flop:>6.2f}x" if ref_flop else f"{'':>7}")
        print(line, file=out)


# --------------------------------------------------------------------------------------- profile
# The functions whose cumulative time the profile reports: FNGD's hook, its bank, its step, and the maths.
PROFILED = ("_layer_gradient", "_flush_deferred", "_stored_coefficients", "_after_step", "_step_checks",
            "_managed_group_step", "_adamw_group_step", "gram_matrix", "damping_times_batch", "solve_coefficients",
            "solve_coefficients_deferred", "weighted_gradient", "apply_sample_weights")


def profile_fngd(base_model, batches, args, device, methods):
    """Per function of ``fngd_hf`` (``PROFILED``), cumulative host time per step from ``cProfile``, with the
    forward/backward/step split (synced); then torch.profiler's top operators per method. Host time is what
    bounds a GPU step at these sizes; on a CPU it is all of the time."""
    import cProfile
    import pstats

    report = {}
    n_steps = args.profile_steps
    package = str(Path(fngd_hf.__file__).parent)
    for method in methods:
        if method in ("adamw", "sgd"):
            continue
        model = copy.deepcopy(base_model).to(device).train()
        opt = make_optimizer(method, model, device, 0)  # a Multi30K-sized bank
        for r in range(4):  # warm-up (past the shared phase's 2-step epoch)
            train_step(model, opt, batches[r % len(batches)], device, args.bf16)
        phases = {}
        profiler = cProfile.Profile()
        profiler.enable()
        for r in range(n_steps):
            train_step(model, opt, batches[(4 + r) % len(batches)], device, args.bf16, phases=phases)
        profiler.disable()
        functions, calls = {}, {}
        for (filename, _, name), (_, ncalls, _, cumulative, _) in pstats.Stats(profiler).stats.items():
            if filename.startswith(package) and name in PROFILED:
                functions[name] = functions.get(name, 0.0) + 1e3 * cumulative / n_steps
                calls[name] = calls.get(name, 0) + ncalls / n_steps
        entry = {
            "phases_ms_per_step": {k: 1e3 * statistics.median(v) for k, v in phases.items()},
            "functions_ms_per_step (cumulative, cProfile)": dict(sorted(functions.items(), key=lambda kv: -kv[1])),
            "calls_per_step": calls,
        }
        report[method] = entry
        print(f"\n[{method}] cProfile, cumulative ms per step (over {n_steps} steps):")
        for k, v in entry["phases_ms_per_step"].items():
            print(f"  phase {k:<34}{v:>9.2f}")
        for k, v in entry["functions_ms_per_step (cumulative, cProfile)"].items():
            print(f"  {k:<40}{v:>9.2f}   ({calls[k]:.0f} calls)")
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # torch.profiler: operator totals over a few steps per method.
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for method in methods:
        model = copy.deepcopy(base_model).to(device).train()
        opt = make_optimizer(method, model, device, 0)  # a Multi30K-sized bank
        for r in range(4):
            train_step(model, opt, batches[r % len(batches)], device, args.bf16)
        sync(device)
        with profile(activities=activities) as prof:
            for r in range(3):
                train_step(model, opt, batches[(4 + r) % len(batches)], device, args.bf16)
            sync(device)
        table = prof.key_averages().table(sort_by=sort_key, row_limit=args.profile_rows)
        tables[method] = table
        print(f"\n[{method}] torch.profiler, 3 steps, sorted by {sort_key}:\n{table}")
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["torch_profiler_tables"] = tables
    return report


# --------------------------------------------------------------------------------- micro-bench
def time_fn(fn, device, repeats=20):
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def micro_bench(shape, batch, tokens, device, repeats):
    """The FNGD maths on this model's layer shapes, alone."""
    d, ffn = shape.d_model, shape.ffn_dim
    layer_shapes = {"attn (d x d)": (d, d), "fc1 (d -> ffn)": (d, ffn), "fc2 (ffn -> d)": (ffn, d)}
    scale = float(batch)
    out = {}
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    for label, (i, o) in layer_shapes.items():
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, tokens, i, generator=gen).to(device)
        delta = (torch.randn(batch, tokens, o, generator=gen) * 1e-3).to(device)
        row = {"path_auto": F.choose_gram_path(batch, tokens, i, o)}
        flat_x, flat_d = x.reshape(-1, i), delta.reshape(-1, o)
        row["plain weight grad delta^T x (fp32)"] = time_fn(lambda: flat_d.T @ flat_x, device, repeats)
        for path in ("token", "per_sample"):
            row[f"gram {path} fp32"] = time_fn(lambda: F.gram_matrix(x, delta, True, scale, path), device, repeats)
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                row[f"gram {path} tf32"] = time_fn(lambda: F.gram_matrix(x, delta, True, scale, path), device, repeats)
                torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
                xb, db = x.bfloat16(), delta.bfloat16()
                row[f"gram {path} bf16"] = time_fn(lambda: F.gram_matrix(xb, db, True, scale, path), device, repeats)
        # The input Gram alone: what q/k/v (and cross-attention k/v) could share.
        row["input gram x x^T only (fp32)"] = time_fn(lambda: flat_x @ flat_x.T, device, repeats)
        row["delta gram only (fp32)"] = time_fn(lambda: flat_d @ flat_d.T, device, repeats)
        gram = F.gram_matrix(x, delta, True, scale, "token")
        damping_b = F.damping_times_batch(gram, 1.0, "relative", 0.0)
        row["damping (matrix_norm)"] = time_fn(lambda: F.damping_times_batch(gram, 1.0, "relative", 0.0), device, repeats)
        row["solve (with host sync)"] = time_fn(lambda: F.solve_coefficients(gram, damping_b), device, repeats)
        row["solve (no host sync)"] = time_fn(lambda: _solve_without_sync(gram, damping_b), device, repeats)
        beta = F.solve_coefficients(gram, damping_b)[0]
        row["weighted_gradient fp32"] = time_fn(lambda: F.weighted_gradient(x, delta, beta, scale, True), device, repeats)
        if device.type == "cuda":
            xb, db = x.bfloat16(), delta.bfloat16()
            row["plain weight grad (bf16)"] = time_fn(lambda: db.reshape(-1, o).T @ xb.reshape(-1, i), device, repeats)
            row["weighted_gradient bf16"] = time_fn(lambda: F.weighted_gradient(xb, db, beta, scale, True), device, repeats)
        out[label] = row
        print(f"\n[micro] {label}: B={batch} T={tokens} i={i} o={o}, auto path={row['path_auto']}; ms per call")
        for k, v in row.items():
            if k != "path_auto":
                print(f"  {k:<40}{v:>9.3f}")
    return out


# ------------------------------------------------------------------------------------------ main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per method")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps per method first (> 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bf16"], help="bf16 = autocast")
    parser.add_argument("--bf16", action="store_true", help="same as --dtype bf16")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list; extra variants: {','.join(VARIANTS)}")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--src-mean", type=float, default=13.0, help="mean source length in tokens (eos included)")
    parser.add_argument("--tgt-mean", type=float, default=15.0, help="mean target length in tokens (eos included)")
    parser.add_argument("--batches", type=int, default=8, help="distinct fixed batches, cycled")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--breakdown-steps", type=int, default=0, help="extra steps per method timed per phase")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="FNGD per-function timers and torch.profiler tables")
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--profile-methods", default="adamw,fngd_first,fngd_shared")
    parser.add_argument("--micro", action="store_true", help="time the maths alone on the layer shapes")
    parser.add_argument("--no-measure", action="store_true", help="skip the interleaved table (profile/micro only)")
    parser.add_argument("--count-only", action="store_true",
                        help="no timing: operators, host reads and matmul FLOPs of one step per method after the warm-up")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (all methods)")
    parser.add_argument("--gpu-code-path", action="store_true",
                        help="on a CPU, run FNGD's GPU code path (see emulate_gpu_code_path) to count its operators")
    parser.add_argument("--clock", default="wall", choices=["wall", "thread"],
                        help="thread: the main thread's CPU time per step (CPU with --threads 1 only); steadier than "
                             "wall time on a shared or virtual machine")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.bf16 = args.bf16 or args.dtype == "bf16"
    if args.clock == "thread" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock thread measures one CPU thread: use it with --device cpu --threads 1")
    if args.gpu_code_path:
        emulate_gpu_code_path()
    if args.warmup <= 2 and "fngd_shared" in args.methods:
        parser.error("--warmup must exceed 2 so that fngd_shared's measured steps are all in the shared phase")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    base_model, shape = build_model(args.preset, args.vocab_size, args.seed, args.dropout)
    batches = make_batches(args.batches, args.batch_size, args.vocab_size, args.src_mean, args.tgt_mean, args.seed, device)
    src_tokens = sum(int(b["attention_mask"].sum()) for b in batches) / (len(batches) * args.batch_size)
    tgt_tokens = sum(int((b["labels"] != -100).sum()) for b in batches) / (len(batches) * args.batch_size)
    padded = [(b["input_ids"].shape[1], b["labels"].shape[1]) for b in batches]
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    info = dict(
        device=device_name,
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        fngd_hf=fngd_hf.__version__,
        preset=args.preset,
        shape=shape.__dict__,
        vocab_size=args.vocab_size,
        params_m=sum(p.numel() for p in base_model.parameters()) / 1e6,
        batch_size=args.batch_size,
        mean_src_tokens=src_tokens,
        mean_tgt_tokens=tgt_tokens,
        padded_lengths=padded,
        autocast_bf16=args.bf16,
        tf32=args.tf32,
        steps=args.steps,
        warmup=args.warmup,
        clock=args.clock,
        command=" ".join([Path(sys.executable).name] + sys.argv),
    )
    print(
        f"{device_name} | torch {info['torch']} | preset {args.preset} (d_model {shape.d_model}, FFN {shape.ffn_dim}, "
        f"{shape.attention_heads} heads, {shape.encoder_layers}+{shape.decoder_layers} layers, vocab {args.vocab_size}, "
        f"{info['params_m']:.1f}M params) | batch {args.batch_size}, mean src/tgt tokens {src_tokens:.1f}/{tgt_tokens:.1f}, "
        f"padded {padded} | {'bf16 autocast' if args.bf16 else 'fp32'}{' + tf32' if args.tf32 else ''} | "
        f"{args.steps} measured steps after {args.warmup} warm-up, interleaved",
        flush=True,
    )
    output = dict(info=info)
    if args.count_only:
        output["counts"] = count_only(methods, base_model, batches, args, device)
        print()
        print_counts(output["counts"])
    elif not args.no_measure:
        results, runs = measure(methods, base_model, batches, args, device)
        del runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print()
        print_table(results)
        ref = results.get("adamw", {}).get("median_ms")
        if ref:
            targets = {"fngd_shared": 1.10, "fngd_first": 1.60}
            for method, target in targets.items():
                if method in results:
                    ratio = results[method]["median_ms"] / ref
                    print(f"target {method} <= {target:.2f}x adamw: {ratio:.2f}x {'MET' if ratio <= target else 'NOT met'}")
        output["results"] = results
        if "fngd_first" in results and "fngd_shared" in results:
            extra = (results["fngd_first"]["ops_per_step"] - results["fngd_shared"]["ops_per_step"]) / results["fngd_first"]["managed_layers"]
            print(f"first epoch over shared phase: {extra:.1f} more operators per managed layer")
    if args.profile:
        output["profile"] = profile_fngd(base_model, batches, args, device, [m.strip() for m in args.profile_methods.split(",")])
    if args.micro:
        tokens = round(statistics.fmean(t for p in padded for t in p))  # typical padded length
        output["micro"] = micro_bench(shape, args.batch_size, tokens, device, repeats=20 if device.type == "cuda" else 5)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(output, indent=1))
        print(f"\nwrote {args.out}")
    return output


if __name__ == "__main__":
    main()
