"""Grafting (``step_length="adamw"``): FNGD's direction per layer, AdamW's update length per layer.

The reference is built from parts that are obviously right on their own: the plain gradient from an
uncaptured copy of the model, AdamW's update from ``torch.optim.AdamW`` itself (lr 1, no weight decay: the
parameter moves by exactly ``m̂/(√v̂+ε)``), FNGD's direction from ``opt.direction(p)``, and momentum by hand.
"""

import copy

import pytest
import torch
from torch import nn

from fngd_hf import FNGD, FNGDTrainingArguments
from tiny_models import make_mlp, mlp_batch

pytestmark = pytest.mark.usefixtures("one_thread")

LR, MOMENTUM, BETAS, EPS = 3e-2, 0.9, (0.9, 0.999), 1e-8


def _layers(model):
    return [m for m in model if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("share", [False, True], ids=["ngd", "fngd_shared"])
def test_grafted_step_is_adamw_length_along_the_momentum_of_fngd_direction(share):
    model = make_mlp(dtype=torch.float64)
    opt = FNGD(model, lr=LR, momentum=MOMENTUM, adamw_betas=BETAS, adamw_eps=EPS, step_length="adamw",
               share_coefficients=share, steps_per_epoch=2 if share else None)
    layers = _layers(model)
    adam_copies = [[p.detach().clone().requires_grad_() for p in layer.parameters()] for layer in layers]
    adams = [torch.optim.AdamW(ps, lr=1.0, betas=BETAS, eps=EPS, weight_decay=0.0) for ps in adam_copies]
    momenta = [None] * len(layers)
    for seed in range(5):  # steps 3-5 reuse the first epoch's coefficients when sharing
        x, y = mlp_batch(seed, dtype=torch.float64)
        plain = copy.deepcopy(model)  # a copy is uncaptured: its backward gives the plain gradient
        nn.functional.cross_entropy(plain(x), y).backward()
        nn.functional.cross_entropy(model(x), y).backward()
        expected = []
        for i, (layer, plain_layer) in enumerate(zip(layers, _layers(plain))):
            before = [p.detach().clone() for p in adam_copies[i]]
            for copy_p, plain_p in zip(adam_copies[i], plain_layer.parameters()):
                copy_p.grad = plain_p.grad.clone()
            adams[i].step()
            adam_length = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, adam_copies[i])]).norm()
            direction = [opt.direction(p).clone() for p in layer.parameters()]
            assert torch.cat([d.flatten() for d in direction]).norm() > 0
            momenta[i] = direction if momenta[i] is None else [MOMENTUM * m + d for m, d in zip(momenta[i], direction)]
            momentum_norm = torch.cat([m.flatten() for m in momenta[i]]).norm()
            expected.append([p.detach() - LR * adam_length / momentum_norm * m
                             for p, m in zip(layer.parameters(), momenta[i])])
        opt.step()
        opt.zero_grad()
        for layer, want in zip(layers, expected):
            for p, w in zip(layer.parameters(), want):
                torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)
    assert opt.diagnostics()["fngd/fresh_fraction"] == (2 / 5 if share else 1.0)  # 2 fresh steps, then shared


def test_grafted_layers_move_by_adamw_length_not_by_the_trust_region():
    """One step from the same start: with grafting each layer moves by AdamW's first-step length
    (‖sign-like update‖ = lr·√(numel) up to ε), whatever the size of its natural gradient."""
    model = make_mlp(dtype=torch.float64)
    opt = FNGD(model, lr=LR, step_length="adamw", share_coefficients=False)
    start = [[p.detach().clone() for p in layer.parameters()] for layer in _layers(model)]
    x, y = mlp_batch(0, dtype=torch.float64)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for layer, before in zip(_layers(model), start):
        moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(layer.parameters(), before)]).norm()
        size = sum(p.numel() for p in layer.parameters())
        # AdamW's first step is lr·g/(|g|+ε) per entry: length lr·√(entries with g ≠ 0).
        assert moved == pytest.approx(LR * size**0.5, rel=1e-4)  # ε/|g| of the smallest entries


def test_a_trust_ratio_with_grafting_is_refused_not_ignored():
    model = make_mlp()
    with pytest.raises(ValueError, match="trust_ratio.*step_length='adamw'"):
        FNGD(model, step_length="adamw", trust_ratio=0.5)
    with pytest.raises(ValueError, match="step_length"):
        FNGD(model, step_length="adam")
    opt = FNGD(model, step_length="adamw", trust_ratio=None)
    assert opt.param_groups[0]["trust_ratio"] is None
    assert FNGD(make_mlp(), step_length="adamw").param_groups[0]["trust_ratio"] is None


def test_trainer_argument_reaches_the_optimizer_and_is_validated(tmp_path):
    with pytest.raises(ValueError, match="fngd_step_length"):
        FNGDTrainingArguments(output_dir=str(tmp_path), optimizer="fngd", fngd_step_length="adam", report_to=[])
    args = FNGDTrainingArguments(output_dir=str(tmp_path), optimizer="fngd", fngd_step_length="adamw", report_to=[])
    assert args.fngd_step_length == "adamw"


def test_state_dict_round_trip_keeps_adamw_moments_and_step_counts():
    model = make_mlp(dtype=torch.float64)
    opt = FNGD(model, lr=LR, step_length="adamw", share_coefficients=False)
    for seed in range(2):
        x, y = mlp_batch(seed, dtype=torch.float64)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    held = opt.state[opt.param_groups[0]["params"][0]]  # the first managed weight
    assert held["graft_step"] == 2 and held["graft_exp_avg_sq"].abs().sum() > 0
    restored = FNGD(copy.deepcopy(model), lr=LR, step_length="adamw", share_coefficients=False)
    restored.load_state_dict(state)
    kept = restored.state[restored.param_groups[0]["params"][0]]
    assert kept["graft_step"] == 2
    torch.testing.assert_close(kept["graft_exp_avg"], held["graft_exp_avg"], rtol=0, atol=0)
    torch.testing.assert_close(kept["graft_exp_avg_sq"], held["graft_exp_avg_sq"], rtol=0, atol=0)
