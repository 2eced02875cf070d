"""FNGD's ``shared_phase``: what the managed layers do after the first epoch.

``"coefficients"`` (the paper) reuses the first epoch's coefficients; ``"adamw"`` hands the layers to AdamW on
their plain gradient, with the AdamW part's (scheduled) rate and constants and the layers' own weight decay.
"""

import pytest
import torch
from torch import nn

from fngd_hf import FNGD
from tiny_models import make_mlp, mlp_batch, train_steps


def test_adamw_phase_is_torch_adamw_on_the_plain_gradient_after_the_first_epoch():
    model, reference = make_mlp(), make_mlp()
    hyper = dict(adamw_lr=3e-3, adamw_betas=(0.8, 0.95), adamw_eps=1e-7)
    opt = FNGD(model, lr=1e-2, steps_per_epoch=2, shared_phase="adamw", weight_decay=0.01, **hyper)
    ref_opt = FNGD(reference, lr=1e-2, steps_per_epoch=2, share_coefficients=False, weight_decay=0.01, **hyper)
    train_steps(model, opt, seeds=[0, 1])  # the first epoch: the natural gradient, as NGD
    train_steps(reference, ref_opt, seeds=[0, 1])
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert all("coef_bank" not in s for s in opt.state.values())  # nothing banked: nothing to reuse
    # From step 2 on: the managed layers follow torch.optim.AdamW (fresh moments), the rest continues.
    managed = [p for m in opt.managed_modules.values() for p in m.parameters()]
    torch_adamw = torch.optim.AdamW(managed, lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.01)
    before = [p.detach().clone() for p in managed]
    for seed in (2, 3, 4):
        x, y = mlp_batch(seed)
        nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in managed]
        assert all(opt.direction(p) is p.grad for p in managed)  # plain gradients: nothing captured, untagged
        opt.step()
        opt.zero_grad()
        after = [p.detach().clone() for p in managed]
        with torch.no_grad():
            for p, b, g in zip(managed, before, grads):
                p.copy_(b)
                p.grad = g
        torch_adamw.step()
        torch_adamw.zero_grad()
        for p, a in zip(managed, after):
            assert torch.equal(p, a)
        before = after
    assert {id(p) for p in opt.adamw_parameters()} == {id(p) for p in model.parameters()}  # all ordinary now


def test_adamw_phase_follows_the_schedule_of_the_adamw_part():
    model = make_mlp()
    opt = FNGD(model, lr=1e-2, adamw_lr=2e-3, steps_per_epoch=1, shared_phase="adamw")
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    train_steps(model, opt, seeds=[0])
    schedule.step()
    settings = opt._adamw_settings_for(opt.param_groups[0])
    assert settings["lr"] == pytest.approx(1e-3)  # 2e-3 · 0.5


def test_adamw_phase_with_sharing_by_sample_is_refused():
    with pytest.raises(ValueError, match="share_by='position'"):
        FNGD(make_mlp(), shared_phase="adamw", share_by="sample")
    with pytest.raises(ValueError, match="shared_phase"):
        FNGD(make_mlp(), shared_phase="sgd")


def test_adamw_phase_round_trips_through_state_dict():
    model, reference = make_mlp(), make_mlp()
    opt = FNGD(model, steps_per_epoch=2, shared_phase="adamw")
    ref_opt = FNGD(reference, steps_per_epoch=2, shared_phase="adamw")
    train_steps(model, opt, seeds=[0, 1, 2])
    train_steps(reference, ref_opt, seeds=[0, 1, 2])
    resumed_model = make_mlp()
    resumed_model.load_state_dict(model.state_dict())
    resumed = FNGD(resumed_model, steps_per_epoch=2, shared_phase="adamw")
    resumed.load_state_dict(opt.state_dict())
    train_steps(resumed_model, resumed, seeds=[3, 4])
    train_steps(reference, ref_opt, seeds=[3, 4])
    for p, q in zip(resumed_model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
