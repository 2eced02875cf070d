"""MuonHybrid: torch's Muon on the weights of FNGD's layers, torch's AdamW on everything else."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from fngd_hf import select_modules
from fngd_hf.muon import MuonHybrid, build_muon
from tiny_models import NoLinear, make_mlp, mlp_batch, tiny_bart, train_pairs_on_no_linear

pytestmark = [
    pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9+"),
    pytest.mark.usefixtures("one_thread"),  # conftest.py
]


def steps(model, opt, seeds, scheduler=None):
    """One step per seed on the MLP's batches; returns the losses."""
    losses = []
    for seed in seeds:
        x, y = mlp_batch(seed)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


class Paired:
    """The reference: a torch.optim.Muon and a torch.optim.AdamW stepped together."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self):
        for o in self.optimizers:
            o.zero_grad()


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_without_managed_layers_it_is_torch_adamw_bitwise():
    model, reference = NoLinear(), NoLinear()
    kwargs = dict(lr=3e-2, adamw_betas=(0.8, 0.99), adamw_eps=1e-6, adamw_weight_decay=0.05)
    opt = MuonHybrid(model, **kwargs)
    ref = torch.optim.AdamW(reference.parameters(), lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    assert opt.muon is None and [g["use_muon"] for g in opt.param_groups] == [False]
    train_pairs_on_no_linear([(model, opt), (reference, ref)], steps=5)
    assert_same_parameters(model, reference)
    assert not torch.equal(model.head, NoLinear().head)  # it did train


def test_split_is_fngds_layers_weights_and_the_groups_are_the_inner_dicts():
    model = tiny_bart()
    opt = build_muon(model, lr=2e-3, adamw_lr=5e-4)
    assert isinstance(opt, MuonHybrid) and isinstance(opt.muon, torch.optim.Muon)
    assert type(opt.adamw) is torch.optim.AdamW
    layers = select_modules(model)
    assert set(opt.managed_modules) == set(layers)
    muon_ids = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    adamw_ids = {id(p) for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert muon_ids == {id(m.weight) for m in layers.values()}
    assert {id(m.bias) for m in layers.values() if m.bias is not None} <= adamw_ids  # biases: AdamW
    assert id(model.lm_head.weight) in adamw_ids and id(model.model.shared.weight) in adamw_ids
    assert not muon_ids & adamw_ids and muon_ids | adamw_ids == {id(p) for p in model.parameters()}
    assert opt.param_groups[0] is opt.muon.param_groups[0] and opt.param_groups[1] is opt.adamw.param_groups[0]
    assert opt.state is opt.muon.state is opt.adamw.state
    # lr is AdamW-scale: Muon's RMS-matching adjustment is the default, and the AdamW part has its own rate.
    assert opt.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 5e-4]
    assert MuonHybrid(tiny_bart()).param_groups[1]["lr"] == MuonHybrid(tiny_bart()).param_groups[0]["lr"] == 1e-3
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


@pytest.mark.parametrize(
    "settings",
    [
        dict(lr=2e-2, momentum=0.95, nesterov=True, weight_decay=0.0, adjust_lr_fn=None),
        dict(lr=2e-2, momentum=0.9, nesterov=False, weight_decay=0.1, adjust_lr_fn="original"),
    ],
)
def test_muon_part_is_torch_muon_and_the_rest_torch_adamw(settings):
    model = make_mlp()
    reference = copy.deepcopy(model)
    opt = MuonHybrid(model, adamw_lr=4e-3, adamw_weight_decay=0.01, **settings)
    weights = [reference[0].weight, reference[3].weight]
    rest = [p for p in reference.parameters() if all(p is not w for w in weights)]
    torch_settings = dict(settings, adjust_lr_fn=settings["adjust_lr_fn"] or "match_rms_adamw")
    ref = Paired(torch.optim.Muon(weights, **torch_settings), torch.optim.AdamW(rest, lr=4e-3, weight_decay=0.01))
    before = model[0].weight.detach().clone()
    steps(model, opt, range(6))
    steps(reference, ref, range(6))
    assert_same_parameters(model, reference)
    assert not torch.equal(before, model[0].weight)
    assert set(opt.state[model[0].weight]) == {"momentum_buffer"}
    assert set(opt.state[model[0].bias]) == {"step", "exp_avg", "exp_avg_sq"}


def test_state_dict_round_trip_continues_bit_exactly():
    kwargs = dict(lr=2e-2, weight_decay=0.01, adamw_lr=5e-3, adamw_weight_decay=0.01)
    uninterrupted = make_mlp()
    steps(uninterrupted, MuonHybrid(uninterrupted, **kwargs), range(6))

    first = make_mlp()
    first_opt = MuonHybrid(first, **kwargs)
    steps(first, first_opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert [g["use_muon"] for g in saved["opt"]["param_groups"]] == [True, False]

    resumed = make_mlp(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_opt = MuonHybrid(resumed, **kwargs)
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.param_groups[0] is resumed_opt.muon.param_groups[0]
    assert resumed_opt.param_groups[1] is resumed_opt.adamw.param_groups[0]
    assert resumed_opt.muon.state is resumed_opt.state is resumed_opt.adamw.state
    assert torch.equal(resumed_opt.state[resumed[0].weight]["momentum_buffer"],
                       first_opt.state[first[0].weight]["momentum_buffer"])
    steps(resumed, resumed_opt, range(3, 6))
    assert_same_parameters(resumed, uninterrupted)
    # A state dict of another split is refused, not half-loaded.
    other = MuonHybrid(make_mlp(), target_modules=["0"], **kwargs)
    with pytest.raises(ValueError, match="do not match"):
        MuonHybrid(nn.Sequential(nn.LayerNorm(6)), lr=1e-3).load_state_dict(other.state_dict())


def test_linear_warmup_schedule_reaches_both_parts():
    from transformers import get_linear_schedule_with_warmup

    model = make_mlp()
    opt = MuonHybrid(model, lr=2e-2, adamw_lr=4e-3)
    scheduler = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
    # Warmup starts at lr 0: the first step may move nothing, in either part.
    before = [p.detach().clone() for p in model.parameters()]
    steps(model, opt, [0], scheduler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(1e-2) and opt.adamw.param_groups[0]["lr"] == pytest.approx(2e-3)
    steps(model, opt, [1, 2, 3], scheduler)  # step 4 of 10: (10 - 4) / (10 - 2) of the base rate
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(2e-2 * 0.75)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(4e-3 * 0.75)
    assert not torch.equal(before[0], model[0].weight) and not torch.equal(before[2], model[2].weight)


def test_tiny_bart_learns_through_a_stock_seq2seq_trainer(copy_task, seq2seq_args):
    from transformers import Seq2SeqTrainer

    model = tiny_bart()
    data = copy_task(32, length=5)  # labels are the source ids
    args = seq2seq_args(per_device_train_batch_size=16, num_train_epochs=20, logging_steps=2)
    opt = MuonHybrid(model, lr=5e-2)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    # The Trainer's linear decay ran on both parts' groups (down to 0 at the last step).
    assert opt.muon.param_groups[0]["initial_lr"] == 5e-2 and opt.muon.param_groups[0]["lr"] < 5e-3
    assert opt.adamw.param_groups[0]["lr"] == opt.muon.param_groups[0]["lr"]
    assert opt.state[model.model.encoder.layers[0].fc1.weight]["momentum_buffer"].abs().sum() > 0


@pytest.mark.parametrize(
    "bad",
    [
        dict(lr=0.0), dict(lr=-1e-3), dict(lr=float("nan")), dict(lr=True), dict(momentum=1.0), dict(momentum=-0.1),
        dict(weight_decay=-0.1), dict(nesterov="yes"), dict(adjust_lr_fn="rms"), dict(adamw_lr=0.0),
        dict(adamw_lr=float("inf")), dict(adamw_betas=(0.9,)), dict(adamw_betas=(0.9, 1.0)), dict(adamw_eps=-1.0),
        dict(adamw_weight_decay=-0.01), dict(adamw_weight_decay=0.1, adamw_no_decay="bias"),
        dict(adamw_weight_decay=0.1, adamw_no_decay=["no.such.parameter"]), dict(target_modules=["no_such_layer"]),
    ],
)
def test_bad_settings_raise_value_error(bad):
    with pytest.raises(ValueError):
        MuonHybrid(make_mlp(), **bad)


def test_bad_model_is_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        MuonHybrid(list(make_mlp().parameters()))
    frozen = make_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        MuonHybrid(frozen)
