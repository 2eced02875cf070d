"""Rank-local statistics in checkpoints, and FNGD in a plain accelerate loop (one process; the two-rank
runs are in test_distributed.py)."""

import io
import warnings

import pytest
import torch
from torch import nn

from fngd_hf import CWNGD, FNGD, KFAC, SNGD, attach_accelerator
from fngd_hf.integrations.checkpointing import (
    RANK_STATE_FILE,
    rank_state,
    restore_on_load,
    restore_rank_state,
    save_rank_state,
    unwrap_optimizer,
)
from tiny_models import make_mlp, mlp_batch, train_steps

KWARGS = dict(lr=0.02, steps_per_epoch=3, momentum=0.9)


def saved(state):
    """``state`` as a checkpoint gives it back (state_dict() shares the optimizer's own tensors)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def trained(seed_offset=0, steps=4, cls=FNGD, batch=5, **kwargs):
    model = make_mlp()
    opt = cls(model, **{**KWARGS, **kwargs})
    train_steps(model, opt, seeds=range(seed_offset, seed_offset + steps), batch=batch)
    return model, opt


@pytest.mark.parametrize("cls", [FNGD, CWNGD, KFAC, SNGD])
def test_state_dict_records_the_saving_rank_and_loads_quietly_on_it(cls):
    kwargs = KWARGS if cls in (FNGD, CWNGD) else dict(lr=0.01)
    model = make_mlp()
    opt = cls(model, **kwargs)
    train_steps(model, opt, seeds=range(2))
    state = saved(opt.state_dict())
    assert state["layerwise"]["process_rank"] == 0  # no optimizer's own settings overwrite it
    assert state["layerwise"]["global_step"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(make_mlp(), **kwargs).load_state_dict(state)


def test_loading_another_ranks_bank_warns_unless_this_ranks_own_is_restored(tmp_path):
    # What rank 1 of a DDP run sees when it loads the optimizer state the main rank saved: simulated by
    # a state that says another rank wrote it.
    _, main = trained(seed_offset=0)
    _, own = trained(seed_offset=50)  # "this rank": other micro-batches, another bank
    state = saved(main.state_dict())
    state["layerwise"]["process_rank"] = 1
    with pytest.warns(RuntimeWarning, match="loaded the optimizer state saved by rank 1"):
        FNGD(make_mlp(), **KWARGS).load_state_dict(state)

    save_rank_state(own, str(tmp_path), rank=0)
    assert (tmp_path / RANK_STATE_FILE.format(rank=0)).is_file()
    resumed = FNGD(make_mlp(), **KWARGS)
    restore_on_load(resumed, str(tmp_path), rank=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(state)
    for index, tensors in rank_state(own).items():
        param = [p for g in resumed.param_groups for p in g["params"]][index]
        for key, value in tensors.items():
            assert torch.equal(resumed.state[param][key], value), key
    assert resumed._restore_after_load is None  # used once
    # The counters and momentum are the loaded state's; only the bank is this rank's.
    assert resumed.global_step == main.global_step
    first = main.param_groups[0]["params"][0]
    assert torch.equal(resumed.state[resumed.param_groups[0]["params"][0]]["momentum_buffer"],
                       main.state[first]["momentum_buffer"])


def with_bank_of(state, other):
    """``state`` with ``other``'s coefficient bank: what DDP ranks hold (the same everything else)."""
    state = saved(state)
    for index, tensors in saved(rank_state(other)).items():
        state["state"][index].update(tensors)
    return state


def resume(model, state, steps, own_bank=None):
    resumed_model = make_mlp()
    resumed_model.load_state_dict(model.state_dict())
    resumed = FNGD(resumed_model, **KWARGS)
    resumed.load_state_dict(saved(state))  # load_state_dict keeps the given tensors: a copy each time
    train_steps(resumed_model, resumed, seeds=[90])  # builds the shared phase's caches from this bank
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved(state))
    if own_bank is not None:
        restore_rank_state(resumed, saved(own_bank))
    train_steps(resumed_model, resumed, seeds=steps)
    return resumed_model


def test_restored_bank_is_used_by_the_shared_phase():
    # Restoring a bank after load_state_dict must reach the shared-phase fast path (which stacks the
    # banks and keeps host copies of their sizes): the run equals continuing the bank's own optimizer.
    model, own = trained(seed_offset=0, steps=4)
    _, other = trained(seed_offset=50, steps=4, batch=4)  # as if the ranks' batches differed in size
    mains = with_bank_of(own.state_dict(), other)
    restored = resume(model, mains, range(4, 8), own_bank=rank_state(own))
    unrestored = resume(model, mains, range(4, 8))
    train_steps(model, own, seeds=range(4, 8))
    for a, b in zip(model.parameters(), restored.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert not torch.allclose(model[0].weight, unrestored[0].weight, rtol=0, atol=1e-4)


def test_rank_state_of_another_model_is_a_clear_error():
    _, opt = trained()
    saved = rank_state(opt)
    small = FNGD(nn.Sequential(nn.Linear(6, 3)), **KWARGS)
    with pytest.raises(ValueError, match="another model"):
        restore_rank_state(small, {5: saved[next(iter(saved))]})


@pytest.mark.parametrize("kwargs", [dict(share_coefficients=False), dict(share_by="sample")], ids=["ngd", "by_sample"])
def test_no_warning_where_ranks_hold_the_same_or_no_bank(kwargs):
    model = make_mlp()
    opt = FNGD(model, lr=0.02, **kwargs)
    for seed in range(2):
        if "share_by" in kwargs:
            opt.set_sample_ids([10 * seed + n for n in range(5)])
        train_steps(model, opt, seeds=[seed])
    state = saved(opt.state_dict())
    state["layerwise"]["process_rank"] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FNGD(make_mlp(), lr=0.02, **kwargs).load_state_dict(state)


def test_kfac_factors_are_not_rank_local():
    model = make_mlp()
    kfac = KFAC(model, lr=0.01)
    train_steps(model, kfac, seeds=range(2))
    state = kfac.state_dict()
    state["layerwise"]["process_rank"] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all-reduced under DDP: every rank's are the main rank's
        KFAC(make_mlp(), lr=0.01).load_state_dict(state)


def test_unwrap_optimizer():
    _, opt = trained()

    class Wrapper:  # as accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert unwrap_optimizer(Wrapper(Wrapper(opt))) is opt
    with pytest.raises(ValueError, match="expected an fngd_hf optimizer"):
        unwrap_optimizer(torch.optim.SGD(make_mlp().parameters(), lr=0.1))


# ------------------------------------------------------------------- a plain accelerate loop
accelerate = pytest.importorskip("accelerate")

ACCUMULATION = 2
BATCHES = 5  # per epoch: windows of 2, 2 and 1 micro-batches, so 3 optimizer steps


def fngd_only_mlp():
    # The LayerNorm frozen: in a short window accelerate hands AdamW half the average gradient, as it
    # would to torch.optim.AdamW, so only the FNGD layers are compared.
    model = make_mlp(seed=1)
    model[2].requires_grad_(False)
    return model


def reference_run(epochs=2, **kwargs):
    """What the accelerate loop must give: each window's micro-batch losses sum to the window's mean
    loss, and the optimizer is told the window's real size (what FNGDTrainer does)."""
    model = fngd_only_mlp()
    opt = FNGD(model, lr=1e-2, steps_per_epoch=3, **kwargs)
    batches = [mlp_batch(seed) for seed in range(BATCHES)]
    for _ in range(epochs):
        for start in range(0, BATCHES, ACCUMULATION):
            window = batches[start : start + ACCUMULATION]
            opt.gradient_accumulation_steps = len(window)
            for x, y in window:
                (nn.functional.cross_entropy(model(x), y) / len(window)).backward()
            opt.step()
            opt.zero_grad()
    return model


class Batches(torch.utils.data.Dataset):
    def __len__(self):
        return BATCHES

    def __getitem__(self, index):
        return mlp_batch(index)


def accelerate_run(attach, epochs=2, **kwargs):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION, cpu=True)
        model = fngd_only_mlp()
        opt = FNGD(model, lr=1e-2, steps_per_epoch=3, **kwargs)
        loader = torch.utils.data.DataLoader(Batches(), batch_size=None)  # each item is a batch of 5
        model, opt, loader = accelerator.prepare(model, opt, loader)
        handle = attach_accelerator(accelerator, opt) if attach else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(epochs):
                for x, y in loader:
                    with accelerator.accumulate(model):
                        accelerator.backward(nn.functional.cross_entropy(model(x), y))  # divided by 2, always
                        opt.step()  # reaches FNGD at the end of each window (the last one early)
                        opt.zero_grad()
        if handle is not None:
            handle.remove()
        assert unwrap_optimizer(opt).global_step == 3 * epochs
        return accelerator.unwrap_model(model), [str(w.message) for w in caught]
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.mark.parametrize("kwargs", [{}, dict(damping_mode="fixed", damping=1e-2)], ids=["relative", "fixed"])
def test_plain_accelerate_loop_equals_the_reference_including_the_short_last_window(kwargs):
    # Two epochs: the first computes and banks the coefficients, the second shares them.
    model, caught = accelerate_run(attach=True, **kwargs)
    assert not caught
    reference = reference_run(**kwargs)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_without_attach_accumulation_in_an_accelerate_loop_is_refused():
    # Told the accumulation but not accelerate's loss division: FNGD cannot know how each micro-batch loss
    # was scaled (a stock Trainer looks the same to it), so the first step refuses, naming the fix.
    with pytest.raises(ValueError, match="attach_accelerator"):
        accelerate_run(attach=False, gradient_accumulation_steps=ACCUMULATION)


def test_attach_accelerator_saves_no_rank_file_for_one_process(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = Accelerator(cpu=True)
        model, opt = trained()
        model, opt = accelerator.prepare(model, opt)
        handle = attach_accelerator(accelerator, opt)
        assert unwrap_optimizer(opt).loss_divided_by == "gradient_accumulation_steps"
        accelerator.save_state(str(tmp_path / "checkpoint"))
        assert (tmp_path / "checkpoint" / "optimizer.bin").is_file()
        assert not list((tmp_path / "checkpoint").glob("fngd_coefficients_rank*"))  # optimizer.bin has the bank
        handle.remove()
        assert not accelerator._save_model_state_pre_hook and not accelerator._load_model_state_pre_hook
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_invalid_loss_divided_by():
    with pytest.raises(ValueError, match="loss_divided_by"):
        FNGD(make_mlp(), loss_divided_by="tokens")
