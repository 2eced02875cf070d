"""The Shampoo baseline (pytorch-optimizer's Shampoo on FNGD's layers, AdamW on the rest)."""

import importlib.util
import io
import sys

import pytest
import torch
from torch import nn

from fngd_hf import select_modules
from fngd_hf.shampoo import build_shampoo
from tiny_models import make_mlp, tiny_bart


def train_steps(model, opt, seeds, scheduler=None):
    losses = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def test_missing_library_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    with pytest.raises(ImportError, match=r"pip install fngd-hf\[shampoo\]"):
        build_shampoo(make_mlp())


requires_library = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_optimizer") is None, reason="pip install fngd-hf[shampoo]"
)


@requires_library
def test_split_matches_fngd_layers_and_groups_are_the_inner_dicts():
    from pytorch_optimizer import Shampoo

    model = tiny_bart()
    opt = build_shampoo(model, lr=1e-2, adamw_lr=3e-3)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt.shampoo, Shampoo)
    assert set(opt.managed_modules) == set(select_modules(model))
    shampoo_ids = {id(p) for g in opt.param_groups if g["shampoo"] for p in g["params"]}
    adamw_ids = {id(p) for g in opt.param_groups if not g["shampoo"] for p in g["params"]}
    expected = {id(p) for m in select_modules(model).values() for p in m.parameters()}
    assert shampoo_ids == expected
    assert id(model.lm_head.weight) in adamw_ids and not shampoo_ids & adamw_ids
    assert shampoo_ids | adamw_ids == {id(p) for p in model.parameters()}
    assert opt.param_groups[0] is opt.shampoo.param_groups[0]
    assert opt.param_groups[1] is opt.adamw.param_groups[0]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 3e-3]
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


@requires_library
def test_tiny_bart_trains():
    model = tiny_bart()
    opt = build_shampoo(model, lr=3e-2, momentum=0.9, adamw_lr=1e-2)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 40, (8, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    input_ids[:3, 5:], attention_mask[:3, 5:] = 1, 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    losses = []
    for _ in range(30):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


@requires_library
def test_lr_scheduler_changes_take_effect_in_both_optimizers():
    model = make_mlp()
    opt = build_shampoo(model, lr=1e-2, adamw_lr=1e-2)
    # lr = base * (1, 0, 0, ...): after the first step nothing may move.
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step == 0 else 0.0)
    train_steps(model, opt, seeds=[0], scheduler=scheduler)
    assert opt.shampoo.param_groups[0]["lr"] == 0.0 and opt.adamw.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(model, opt, seeds=[1, 2], scheduler=scheduler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # A halving schedule reaches the inner optimizers' groups too.
    model = make_mlp()
    opt = build_shampoo(model, lr=1e-2, adamw_lr=4e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_steps(model, opt, seeds=[0, 1], scheduler=scheduler)
    assert opt.shampoo.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert scheduler.get_last_lr() == pytest.approx([2.5e-3, 1e-3])


@requires_library
def test_state_dict_roundtrip_resume_equals_uninterrupted():
    kwargs = dict(lr=1e-2, momentum=0.9, weight_decay=0.01, adamw_lr=5e-3, preconditioning_compute_steps=2)
    ref = make_mlp()
    ref_opt = build_shampoo(ref, **kwargs)
    train_steps(ref, ref_opt, seeds=range(6))

    first = make_mlp()
    first_opt = build_shampoo(first, **kwargs)
    train_steps(first, first_opt, seeds=range(3))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert len(saved["opt"]["param_groups"]) == 2 and saved["opt"]["param_groups"][0]["step"] == 3

    resumed = make_mlp(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_opt = build_shampoo(resumed, **kwargs)
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.param_groups[0] is resumed_opt.shampoo.param_groups[0]
    assert resumed_opt.shampoo.state is resumed_opt.state is resumed_opt.adamw.state
    assert "pre_cond_0" in resumed_opt.state[resumed[0].weight]
    assert "exp_avg" in resumed_opt.state[resumed[2].weight]
    train_steps(resumed, resumed_opt, seeds=range(3, 6))
    for a, b in zip(ref.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    # The scheduler still reaches the inner optimizers after a load.
    resumed_opt.param_groups[0]["lr"] = 0.0
    assert resumed_opt.shampoo.param_groups[0]["lr"] == 0.0


@requires_library
def test_adamw_part_exempts_named_parameters_from_weight_decay():
    model = tiny_bart()
    names = [n for n, _ in model.named_parameters() if n.endswith("bias") or "layernorm" in n]
    opt = build_shampoo(model, adamw_weight_decay=0.1, adamw_no_decay=names)
    decayed, exempt = opt.adamw.param_groups
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.1, 0.0)
    exempt_ids = {id(p) for p in exempt["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in exempt_ids} == {
        n for n in names if n not in {f"{m}.bias" for m in opt.managed_modules}
    }


@requires_library
def test_a_failed_float32_inverse_root_is_retried_in_float64(monkeypatch):
    """A float32 SVD that does not converge (ill-conditioned statistics) must not end the run."""
    import pytorch_optimizer.optimizer.shampoo as shampoo_module

    original_function = shampoo_module.compute_power_svd
    reference_model, model = make_mlp(), make_mlp()
    reference = build_shampoo(reference_model, lr=1e-2)
    train_steps(reference_model, reference, seeds=[0, 1])
    svd = torch.linalg.svd
    calls = {"float32": 0, "float64": 0}

    def failing_svd(matrix, *args, **kwargs):
        calls[str(matrix.dtype).split(".")[1]] += 1
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    opt = build_shampoo(model, lr=1e-2)
    train_steps(model, opt, seeds=[0, 1])
    assert calls["float32"] > 0 and calls["float64"] == calls["float32"]
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert shampoo_module.compute_power_svd is original_function  # patched only while Shampoo steps
