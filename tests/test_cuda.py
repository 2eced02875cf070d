"""GPU checks (skipped without CUDA; CI has none): same numbers as on the CPU, no host sync in backward.

Run on a GPU machine with ``python -m pytest tests/test_cuda.py -q``.
"""

import pytest
import torch

import reference as ref
from fngd_hf import CWNGD, FNGD
from tiny_models import spy_batches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def to_device(batch, device):
    return {key: value.to(device) for key, value in batch.items()}


def raises_on_host_sync(fn) -> bool:
    """Whether ``fn`` waits for the GPU: torch's sync debug mode in "error" (an error raised in the
    autograd engine's device threads reaches the caller, which a warning might not)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as error:
        if "synchroniz" not in str(error):
            raise
        return True
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return False


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
def test_backward_adds_no_host_sync_on_gpu(optimizer_class, monkeypatch):
    """Capture, Gram, damping, solve, weighted gradient: nothing the optimizer adds to backward waits
    for the GPU, in the first epoch or the shared phase, except FNGD's batched first epoch's one read
    per backward (its kept-token counts, which drop the padding from the Gram)."""
    reads = []
    original = FNGD._host_counts

    def allowed_read(counts):
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return original(counts)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            reads.append(len(counts))

    monkeypatch.setattr(FNGD, "_host_counts", staticmethod(allowed_read))
    model = ref.tiny_seq2seq("marian", seed=0).to("cuda")
    opt = optimizer_class(model, lr=1e-2, damping=0.1, steps_per_epoch=2)
    for step in range(5):  # steps 0-1 compute coefficients, 2-4 reuse them
        batch = to_device(ref.seq2seq_batch(4, step), "cuda")
        if step == 0:  # lazy initialisation may sync
            ref.seq2seq_loss(model, batch).backward()
        else:
            opt.eval()
            plain_syncs = raises_on_host_sync(lambda: ref.seq2seq_loss(model, batch).backward())
            opt.zero_grad()
            opt.train()
            if plain_syncs:
                pytest.skip("the model's own backward syncs on this torch build: nothing to compare")
            loss = ref.seq2seq_loss(model, batch)
            assert not raises_on_host_sync(loss.backward), f"a host sync in the optimizer's backward (step {step})"
        opt.step()  # its one host sync: the finiteness and factorisation check
        opt.zero_grad()
    assert opt.skipped_steps == 0 and opt.global_step == 5
    # One read in each first-epoch backward (steps 0 and 1), for both padded lengths (source, target).
    assert reads == ([2, 2] if optimizer_class is FNGD else [])


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


def test_first_epoch_layers_are_batched_on_gpu_by_default():
    """batch_layers="auto": on a GPU the first epoch's equally shaped layers share their kernels."""
    model = ref.tiny_seq2seq("marian", seed=0).to("cuda")
    opt = FNGD(model, lr=1e-2, damping=0.1, steps_per_epoch=2)
    batched = spy_batches(opt)
    ref.seq2seq_loss(model, to_device(ref.seq2seq_batch(4, 0), "cuda")).backward()
    assert sum(batched) == len(opt.managed_modules) and len(batched) < len(opt.managed_modules)
    assert all(m.weight.grad is not None for m in opt.managed_modules.values())
