"""GPU checks (skipped without CUDA; CI has none): same numbers as on the CPU, no host sync in backward.

Run on a GPU machine with ``python -m pytest tests/test_cuda.py -q``.
"""

import warnings

import pytest
import torch

import reference as ref
from fngd_hf import CWNGD, FNGD

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def to_device(batch, device):
    return {key: value.to(device) for key, value in batch.items()}


def count_host_syncs(fn) -> int:
    """CUDA operations inside ``fn`` that wait for the GPU (torch's sync debug mode, as warnings)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def run_steps(device, optimizer_class, steps, **kwargs):
    model = ref.tiny_seq2seq("marian", seed=0).to(device)
    opt = optimizer_class(model, lr=1e-2, damping=0.1, steps_per_epoch=2, stat_dtype=torch.float64, **kwargs)
    for step in range(steps):
        ref.seq2seq_loss(model, to_device(ref.seq2seq_batch(4, step), device)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("optimizer_class", [FNGD, CWNGD])
def test_gpu_steps_match_cpu_steps(optimizer_class):
    """First epoch (steps 0-1) and shared phase (2-3), float64: the GPU run equals the CPU run."""
    cpu_model, cpu_opt = run_steps("cpu", optimizer_class, 4)
    gpu_model, gpu_opt = run_steps("cuda", optimizer_class, 4)
    assert gpu_opt.solve_check == "auto" and gpu_opt.skipped_steps == cpu_opt.skipped_steps == 0
    for (name, p), q in zip(gpu_model.named_parameters(), cpu_model.parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("optimizer_class", [FNGD, CWNGD])
def test_backward_adds_no_host_sync_on_gpu(optimizer_class):
    """Capture, Gram, damping, solve, weighted gradient: nothing the optimizer adds to backward waits
    for the GPU. Compared with the same backward with capture off (the model's own ops may sync)."""
    model = ref.tiny_seq2seq("marian", seed=0).to("cuda")
    opt = optimizer_class(model, lr=1e-2, damping=0.1, steps_per_epoch=2)
    for step in range(5):  # steps 0-1 compute coefficients, 2-4 reuse them
        batch = to_device(ref.seq2seq_batch(4, step), "cuda")
        if step > 0:  # step 0: lazy initialisation
            opt.eval()
            plain = count_host_syncs(lambda: ref.seq2seq_loss(model, batch).backward())
            opt.zero_grad()
            opt.train()
        loss = ref.seq2seq_loss(model, batch)
        syncs = count_host_syncs(loss.backward)
        if step > 0:
            assert syncs <= plain, (step, syncs, plain)
        opt.step()  # its one host sync: the finiteness and factorisation check
        opt.zero_grad()
    assert opt.skipped_steps == 0 and opt.global_step == 5


def test_bf16_autocast_keeps_statistics_in_float32():
    model = ref.tiny_seq2seq("marian", seed=0).float().to("cuda")
    opt = FNGD(model, lr=1e-2, damping=0.1, steps_per_epoch=2)
    losses = []
    batch = to_device(ref.seq2seq_batch(4, 0), "cuda")
    for _ in range(6):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ref.seq2seq_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert opt.skipped_steps == 0
    banks = [opt.state[layer.weight]["coef_bank"] for layer in opt._layers]
    assert banks and all(bank.dtype == torch.float32 and bank.is_cuda for bank in banks)
    assert losses[-1] < losses[0]
