"""Optimizer behaviour: validation, layer choice, AdamW parity, sharing, state, failure handling."""

import io
import warnings

import pytest
import torch
from torch import nn

import fngd_hf.functional as functional
from fngd_hf import CWNGD, FNGD, KFAC, SNGD
from tiny_models import make_mlp, mlp_batch, spy_batches, tiny_bart, train_steps


# ------------------------------------------------------------------ validation and layer choice
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "learning rate"),
        (dict(lr=-1.0), "learning rate"),
        (dict(damping=0.0), "damping"),
        (dict(damping=-1e-3), "damping"),
        (dict(damping_mode="adaptive"), "damping_mode"),
        (dict(momentum=1.0), "momentum"),
        (dict(nesterov=True, momentum=0.0), "nesterov=True needs a momentum"),
        (dict(nesterov="yes"), "Invalid nesterov"),
        (dict(steps_per_epoch=0), "steps_per_epoch"),
        (dict(scale_mode="both"), "scale_mode"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FNGD(make_mlp(), **kwargs)


def test_default_targets_are_attention_and_ffn_of_bart():
    model = tiny_bart()
    opt = FNGD(model, lr=1e-3, share_coefficients=False)
    names = set(opt.managed_modules)
    expected = set()
    for side, attns in (("encoder", ["self_attn"]), ("decoder", ["self_attn", "encoder_attn"])):
        for attn in attns:
            expected |= {f"model.{side}.layers.0.{attn}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
        expected |= {f"model.{side}.layers.0.fc1", f"model.{side}.layers.0.fc2"}
    assert names == expected
    fngd_params = {id(p) for g in opt.param_groups if g["fngd"] for p in g["params"]}
    adamw_params = {id(p) for g in opt.param_groups if not g["fngd"] for p in g["params"]}
    assert id(model.lm_head.weight) in adamw_params  # tied head stays with AdamW
    assert id(model.model.shared.weight) in adamw_params
    assert not fngd_params & adamw_params
    assert fngd_params | adamw_params == {id(p) for p in model.parameters()}


def test_target_modules_regex_and_errors():
    model = tiny_bart()
    opt = FNGD(model, share_coefficients=False, target_modules=[r".*encoder.*fc\d"])
    assert set(opt.managed_modules) == {"model.encoder.layers.0.fc1", "model.encoder.layers.0.fc2"}
    opt.remove_hooks()
    with pytest.raises(ValueError, match="matches no module.*q_proj"):
        FNGD(model, target_modules=["not_a_layer"])
    with pytest.raises(ValueError, match="LayerNorm.*Supported layers"):
        FNGD(model, target_modules=["self_attn_layer_norm"])


# --------------------------------------------------------------------------- AdamW parity
def test_rates_default_to_the_step_lengths_measured_best():
    """lr and the AdamW part's rate follow the step length (settings.DEFAULT_RATES): Muon's step, the default,
    at 6e-3 and its AdamW part at 4e-3; the trust region at 1e-2 with the AdamW part at 2e-3, not at FNGD's lr (5x AdamW's best)."""
    def rates(opt):
        return ([g["lr"] for g in opt.param_groups if g["fngd"]][0], [g["lr"] for g in opt.param_groups if not g["fngd"]])

    default = FNGD(make_mlp())
    assert default.step_length == "muon" and rates(default) == (6e-3, [4e-3])
    assert rates(FNGD(make_mlp(), step_length="trust_region")) == (1e-2, [2e-3])
    assert rates(FNGD(make_mlp(), lr=1e-2, step_length="trust_region")) == (1e-2, [2e-3])
    assert rates(FNGD(make_mlp(), lr=1e-3, adamw_lr=5e-4)) == (1e-3, [5e-4])
    assert rates(CWNGD(make_mlp())) == (6e-3, [4e-3])
    with pytest.raises(ValueError, match="step_length"):
        FNGD(make_mlp(), step_length="orthogonal")


def test_damping_defaults_to_the_step_lengths_measured_best():
    """Relative γ follows the step length (settings.DEFAULT_RELATIVE_DAMPING): 10 with Muon's step, 0.1 with the
    trust region's; fixed λ is 0.1 whatever the step; a given value is kept; an invalid one is refused."""
    def damping(opt):
        return [g["damping"] for g in opt.param_groups if g["fngd"]][0]

    assert damping(FNGD(make_mlp())) == 10.0 and damping(CWNGD(make_mlp())) == 10.0
    assert damping(FNGD(make_mlp(), share_coefficients=False)) == 10.0
    assert damping(FNGD(make_mlp(), step_length="trust_region")) == 0.1
    assert damping(FNGD(make_mlp(), damping_mode="fixed")) == 0.1
    assert damping(FNGD(make_mlp(), damping=0.3)) == 0.3
    assert damping(FNGD(make_mlp(), damping=0.3, step_length="trust_region")) == 0.3
    with pytest.raises(ValueError, match="Invalid damping: 0"):
        FNGD(make_mlp(), damping=0)


@pytest.mark.parametrize("method", [FNGD, CWNGD, KFAC, SNGD])
@pytest.mark.parametrize("model_fn", [lambda: nn.Sequential(nn.LayerNorm(6), nn.Embedding(3, 6)), make_mlp])
def test_nothing_managed_equals_torch_adamw(model_fn, method):
    model_a, model_b = model_fn(), model_fn()
    model_b.load_state_dict(model_a.state_dict())
    targets = [] if any(isinstance(m, nn.Linear) for m in model_a.modules()) else None
    opt_a = method(model_a, lr=3e-3, target_modules=targets, adamw_lr=3e-3, adamw_betas=(0.8, 0.99), adamw_eps=1e-6,
                 adamw_weight_decay=0.05)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    assert not opt_a.managed_modules
    for step in range(20):
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            g = torch.Generator().manual_seed(step)
            if isinstance(model[0], nn.LayerNorm):
                loss = model[0](torch.randn(4, 6, generator=g)).pow(3).mean() + model[1].weight.sin().sum()
            else:
                x, y = mlp_batch(step)
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


# ------------------------------------------------------------------------------- sharing
def count_grams(monkeypatch):
    calls = []
    original = functional.gram_matrix

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "gram_matrix", counting)
    return calls


def test_sharing_reuses_coefficients_by_step_index(monkeypatch):
    calls = count_grams(monkeypatch)
    model = make_mlp()
    opt = FNGD(model, lr=0.01, steps_per_epoch=3, momentum=0.0)
    train_steps(model, opt, seeds=[0, 1, 2])
    assert len(calls) == 3 * 2  # first epoch: one Gram per layer and step
    weight = model[0].weight
    bank = opt.state[weight]["coef_bank"].clone()
    assert bank.shape == (3, 1, 5) and bank.dtype == torch.float32
    calls.clear()
    train_steps(model, opt, seeds=[3, 4, 5, 6])
    assert calls == []  # shared phase: no Gram matrix at all
    assert torch.equal(opt.state[weight]["coef_bank"], bank)

    # Step 7 uses the beta stored at step 7 mod 3 = 1 on its own new batch.
    x, y = mlp_batch(7)
    beta = bank[1, 0, :5].double()
    # Recompute d = J beta from the raw per-sample gradients by autograd, one sample at a time.
    per_sample = []
    for n in range(5):
        model.zero_grad()
        opt.eval()
        nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1]).backward()
        per_sample.append(model[0].weight.grad.clone())
        opt.train()
    expected = sum(b * g for b, g in zip(beta, per_sample))
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(opt.direction(model[0].weight).double(), expected.double(), rtol=1e-4, atol=1e-7)


def test_stacked_bank_fast_path_equals_the_per_layer_path(monkeypatch):
    """The shared phase scales every layer's beta at once from a stacked bank; the per-layer path is
    the reference. Covers a smaller last batch, a skipped first-epoch step (its slot is filled in the
    shared phase, growing the bank after it was stacked), and a checkpoint in between."""
    # P = 3. Slot 0 stored at 5, slot 1 skipped (NaN), slot 2 at 5; step 4 fills slot 1 at 7 (the bank
    # grows after it was stacked); step 6's batch of 3 gets fresh coefficients; steps 7-9 reuse them all;
    # step 10 has two micro-batches (a second one the bank has no room for), step 11 reuses both.
    sizes = [5, 3, 5, 5, 7, 5, 3, 7, 5, 5, 5, 5, 5, 5]

    def run(stacked):
        if not stacked:
            monkeypatch.setattr(FNGD, "_stacked_banks", lambda self: None)
        model = make_mlp()
        opt = FNGD(model, lr=0.02, steps_per_epoch=3)
        for step, batch in enumerate(sizes):
            x, y = mlp_batch(step, batch)
            if step == 1:
                x[0, 0] = float("nan")
            nn.functional.cross_entropy(model(x), y).backward()
            if step in (10, 13):
                nn.functional.cross_entropy(model(x + 1), y).backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
            opt.zero_grad()
            if step == 6:  # a checkpoint of the (stacked) bank, reloaded into a fresh optimizer
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                state = torch.load(buffer, weights_only=True)
                model_state = {k: v.clone() for k, v in model.state_dict().items()}
                opt.remove_hooks()
                model = make_mlp(seed=1)
                model.load_state_dict(model_state)
                opt = FNGD(model, lr=0.02, steps_per_epoch=3)
                opt.load_state_dict(state)
        monkeypatch.undo()
        return model, opt

    fast_model, fast_opt = run(stacked=True)
    slow_model, slow_opt = run(stacked=False)
    assert fast_opt.skipped_steps == slow_opt.skipped_steps == 1
    banks = [fast_opt.state[layer.weight]["coef_bank"] for layer in fast_opt._layers]
    assert banks[0].shape == (3, 2, 7)  # grown to the batch of 7 (slot 1) and to 2 micro-batches (slot 1)
    assert len({bank.untyped_storage().data_ptr() for bank in banks}) == 1  # one stacked tensor, no copy
    for a, b in zip(fast_model.parameters(), slow_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for layer, slow_layer in zip(fast_opt._layers, slow_opt._layers):
        assert torch.equal(fast_opt.state[layer.weight]["coef_bank"], slow_opt.state[slow_layer.weight]["coef_bank"])


def test_batch_size_change_gets_fresh_coefficients(monkeypatch):
    calls = count_grams(monkeypatch)
    model = make_mlp()
    opt = FNGD(model, lr=0.01, steps_per_epoch=2)
    train_steps(model, opt, seeds=[0, 1])
    calls.clear()
    train_steps(model, opt, seeds=[2], batch=3)  # smaller last batch: fresh, no crash, no truncation
    assert calls == [3, 3]
    assert opt.state[model[0].weight]["coef_size"][0, 0] == 5  # stored beta kept
    train_steps(model, opt, seeds=[3], batch=5)
    assert calls == [3, 3]
    assert opt.diagnostics()["fngd/fresh_fraction"] < 1.0


def test_sharing_without_epoch_length_in_a_plain_loop_warns_and_computes_fresh_coefficients():
    """No steps_per_epoch and no accelerate dataloader to learn it from: said once, then every step is NGD."""
    model, reference = make_mlp(), make_mlp()
    opt = FNGD(model)
    with pytest.warns(RuntimeWarning, match="does not know the epoch length"):
        train_steps(model, opt, seeds=[0, 1, 2])
    train_steps(reference, FNGD(reference, share_coefficients=False), seeds=[0, 1, 2])
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert all("coef_bank" not in opt.state[m.weight] for m in opt.managed_modules.values())
    opt.steps_per_epoch = 2  # told later: sharing starts (the bank fills from this step on)
    train_steps(model, opt, seeds=[3])
    assert all("coef_bank" in opt.state[m.weight] for m in opt.managed_modules.values())


def test_zero_grad_discards_a_backward_that_was_not_stepped():
    model, reference = make_mlp(), make_mlp()
    opt = FNGD(model, steps_per_epoch=2)
    x, y = mlp_batch(5)
    nn.functional.cross_entropy(model(x), y).backward()  # discarded: no step()
    opt.zero_grad()
    train_steps(model, opt, seeds=[0, 1, 2])
    ref_opt = FNGD(reference, steps_per_epoch=2)
    train_steps(reference, ref_opt, seeds=[0, 1, 2])
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    bank, ref_bank = opt.state[model[0].weight]["coef_bank"], ref_opt.state[reference[0].weight]["coef_bank"]
    assert torch.equal(bank, ref_bank)  # the discarded batch's coefficients were not banked


def test_a_step_without_backward_moves_nothing_and_counts_as_a_step_of_the_epoch(monkeypatch):
    """The slot index stays the loader's position: after an empty step() at position 0, the next batch
    is stored in slot 1, and the next epoch's position 1 reuses it."""
    model = make_mlp()
    opt = FNGD(model, steps_per_epoch=2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.global_step == 1 and opt.skipped_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    train_steps(model, opt, seeds=[1])
    sizes = opt.state[model[0].weight]["coef_size"]
    assert sizes[:, 0].tolist() == [0, 5]  # slot 1 filled, slot 0 still empty
    calls = count_grams(monkeypatch)
    train_steps(model, opt, seeds=[2, 3])  # positions 0 (empty slot: fresh) and 1 (shared)
    assert len(calls) == 2  # two layers, one fresh step
    assert opt.diagnostics()["fngd/fresh_fraction"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------ capture switching
def test_no_capture_in_eval_no_grad_or_optimizer_eval(monkeypatch):
    calls = count_grams(monkeypatch)
    model = make_mlp()
    opt = FNGD(model, steps_per_epoch=10)
    x, y = mlp_batch(0)
    model.eval()
    nn.functional.cross_entropy(model(x), y).backward()
    model.train()
    with torch.no_grad():
        out = model(x)
    assert out.grad_fn is None
    opt.eval()
    nn.functional.cross_entropy(model(x), y).backward()
    assert calls == []
    opt.train()
    nn.functional.cross_entropy(model(x), y).backward()
    assert len(calls) == 2
    opt.remove_hooks()
    nn.functional.cross_entropy(model(x), y).backward()
    assert len(calls) == 2
    assert type(model[0]) is nn.Linear and type(model[3]) is nn.Linear  # original classes back
    assert all("_fngd_capture" not in m.__dict__ for m in model.modules())


def test_capture_changes_no_forward_and_leaves_repr_and_isinstance_alone():
    model, plain = make_mlp(), make_mlp()
    text = repr(plain)
    FNGD(model, steps_per_epoch=2)
    assert repr(model) == text
    assert isinstance(model[0], nn.Linear) and type(model[0]) is not nn.Linear
    x, _ = mlp_batch(0)
    assert torch.equal(model(x), plain(x))
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert torch.equal(model[0](input=x), plain[0](input=x))  # a keyword call: the layer's own forward


def test_copies_of_a_captured_model_are_plain_and_do_not_feed_the_optimizer():
    import copy
    import pickle

    model = make_mlp()
    opt = FNGD(model, steps_per_epoch=2)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone[0]) is nn.Linear and "_fngd_capture" not in clone[0].__dict__
        for a, b in zip(clone.parameters(), model.parameters()):
            assert torch.equal(a, b)
        x, y = mlp_batch(0)
        nn.functional.cross_entropy(clone(x), y).backward()
        assert all(layer.micro_batches == 0 for layer in opt._layers)
        assert clone[0].weight.grad is not None and model[0].weight.grad is None
    assert type(model[0]) is not nn.Linear  # the original stays captured
    made = type(model[0])(6, 8)  # an instance of the capturing class itself is a plain layer
    x, _ = mlp_batch(0)
    assert torch.equal(made(x), nn.functional.linear(x, made.weight, made.bias))
    assert type(copy.deepcopy(made)) is nn.Linear


def test_a_second_optimizer_on_the_same_model_takes_the_layers_over():
    model, reference = make_mlp(), make_mlp()
    first = FNGD(model, lr=0.02, steps_per_epoch=2)
    with pytest.warns(RuntimeWarning, match="takes it over"):
        second = FNGD(model, lr=0.02, steps_per_epoch=2)
    first.remove_hooks()  # undoes nothing: the layers are the second optimizer's now
    assert type(model[0]) is not nn.Linear
    train_steps(model, second, seeds=[0, 1, 2])
    train_steps(reference, FNGD(reference, lr=0.02, steps_per_epoch=2), seeds=[0, 1, 2])
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    second.remove_hooks()
    assert type(model[0]) is nn.Linear


def test_backward_with_create_graph_gives_the_same_step():
    model, reference = make_mlp(), make_mlp()
    opt, ref_opt = FNGD(model, lr=0.02, steps_per_epoch=2), FNGD(reference, lr=0.02, steps_per_epoch=2)
    for seed in range(3):  # first epoch and shared phase
        x, y = mlp_batch(seed)
        nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
        nn.functional.cross_entropy(reference(x), y).backward()
        assert not model[0].weight.grad.requires_grad or model[0].weight.grad.grad_fn is None
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------ state dict
@pytest.mark.parametrize("method", [FNGD, SNGD])
def test_nesterov_moves_along_direction_plus_momentum_times_buffer(method):
    """torch.optim.SGD's Nesterov on each method's direction: p -= lr·(d + μ·buf), buf = μ·buf + d, where
    ``opt.direction(p)`` is the direction the step would take without momentum (trust region off). K-FAC
    preconditions inside step(), so its direction is not observable here; it runs the same momentum code."""
    lr, mu = 0.05, 0.7
    kwargs = dict(step_length="trust_region", share_coefficients=False) if method is FNGD else {}
    model = make_mlp(dtype=torch.float64)
    opt = method(model, lr=lr, momentum=mu, nesterov=True, trust_ratio=None, **kwargs)
    managed = [p for g in opt.param_groups if g["fngd"] for p in g["params"]]
    buffers = {}
    for seed in range(3):
        x, y = mlp_batch(seed, dtype=torch.float64)
        nn.functional.cross_entropy(model(x), y).backward()
        expected = {}
        for p in managed:
            d = opt.direction(p).clone()
            buffers[p] = d if p not in buffers else mu * buffers[p] + d
            expected[p] = p.detach() - lr * (d + mu * buffers[p])
        opt.step()
        opt.zero_grad()
        for p in managed:
            torch.testing.assert_close(p.detach(), expected[p], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], buffers[p], rtol=1e-12, atol=1e-12)


def test_state_dict_resume_equals_uninterrupted():
    kwargs = dict(lr=0.02, steps_per_epoch=3, momentum=0.9, weight_decay=0.01)
    ref = make_mlp()
    ref_opt = FNGD(ref, **kwargs)
    train_steps(ref, ref_opt, seeds=range(8))

    first = make_mlp()
    first_opt = FNGD(first, **kwargs)
    train_steps(first, first_opt, seeds=range(4))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["layerwise"]["global_step"] == 4

    resumed = make_mlp(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_opt = FNGD(resumed, **kwargs)
    resumed_opt.load_state_dict(saved["opt"])
    train_steps(resumed, resumed_opt, seeds=range(4, 8))
    for a, b in zip(ref.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_bank_stays_float32_for_bf16_parameters():
    model = make_mlp().to(torch.bfloat16)
    opt = FNGD(model, steps_per_epoch=2, lr=0.01)
    for seed in range(2):
        x, y = mlp_batch(seed)
        nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    fresh = FNGD(make_mlp().to(torch.bfloat16), steps_per_epoch=2, lr=0.01)
    fresh.load_state_dict(state)
    bank = fresh.state[fresh.param_groups[0]["params"][0]]["coef_bank"]
    assert bank.dtype == torch.float32
    assert torch.equal(bank, opt.state[model[0].weight]["coef_bank"])


# ------------------------------------------------------------------------------- failures
def test_non_finite_gradient_skips_step_and_keeps_state():
    model = make_mlp()
    opt = FNGD(model, lr=0.01, steps_per_epoch=3)
    train_steps(model, opt, seeds=[0])
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    x, y = mlp_batch(1)
    x[2, 0] = float("nan")
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="skipped step 1"):
        opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for key, value in state.items():
        assert torch.equal(value, opt.state[model[0].weight][key])
    assert int(opt.state[model[0].weight]["coef_size"][1, 0]) == 0  # nothing banked for the bad step
    train_steps(model, opt, seeds=[2])  # training continues
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_layer_with_zero_output_gradient_gets_zero_update():
    model = make_mlp()
    opt = FNGD(model, lr=0.1, damping_mode="relative", share_coefficients=False, momentum=0.0)
    before = model[0].weight.detach().clone()
    x, _ = mlp_batch(0)
    (model(x) * 0.0).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.equal(before, model[0].weight)


@pytest.mark.parametrize("lr", [1e-2, 3e-4])
@pytest.mark.parametrize("ratio, clipped", [(1e-3, 1.0), (1e12, 0.0)])
def test_trust_region_bounds_each_layer_move(lr, ratio, clipped):
    """‖d‖ > ratio·‖[W|b]‖ moves the layer by exactly lr·ratio·‖[W|b]‖ along d; smaller d are untouched."""
    model, reference = make_mlp(seed=3, dtype=torch.float64), make_mlp(seed=3, dtype=torch.float64)
    opt = FNGD(model, lr=lr, momentum=0.0, share_coefficients=False, step_length="trust_region", trust_ratio=ratio, stat_dtype=torch.float64)
    free = FNGD(reference, lr=lr, momentum=0.0, share_coefficients=False, step_length="trust_region", trust_ratio=None, stat_dtype=torch.float64)
    x, y = mlp_batch(4, dtype=torch.float64)
    before = [torch.cat([m.weight.detach().flatten(), m.bias.detach()]) for m in (model[0], model[3])]
    for net, optimizer in ((model, opt), (reference, free)):
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    for index, layer in enumerate((0, 3)):
        moved = torch.cat([model[layer].weight.detach().flatten(), model[layer].bias.detach()]) - before[index]
        unclipped = torch.cat([reference[layer].weight.detach().flatten(), reference[layer].bias.detach()]) - before[index]
        if clipped:  # the bound scales with lr: a schedule still anneals clipped layers
            assert float(moved.norm()) == pytest.approx(lr * ratio * float(before[index].norm()), rel=1e-6)
            torch.testing.assert_close(moved / moved.norm(), unclipped / unclipped.norm())
        else:
            torch.testing.assert_close(moved, unclipped)
    assert opt.diagnostics()["fngd/trust_clipped"] == clipped
    assert "fngd/trust_clipped" not in free.diagnostics()


def test_indefinite_system_raises_damping_instead_of_crashing():
    # Rounding can make K slightly indefinite: Cholesky retries with more damping.
    gram = torch.tensor([[1.0, 1.0], [1.0, 1.0 - 1e-6]])
    beta, used = functional.solve_coefficients(gram, torch.tensor(0.0))
    assert used > 0 and torch.isfinite(beta).all()
    torch.testing.assert_close((gram + used * torch.eye(2)) @ beta, torch.ones(2), rtol=1e-3, atol=1e-3)
    # A badly indefinite matrix (impossible for a true Gram matrix) still gives finite coefficients.
    beta, used = functional.solve_coefficients(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), torch.tensor(0.0))
    assert torch.isfinite(beta).all()


def test_gram_paths_agree():
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(4, 3, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 7, generator=g, dtype=torch.float64)
    for bias in (True, False):
        token = functional.gram_matrix(x, delta, bias, 4.0, "token")
        per_sample = functional.gram_matrix(x, delta, bias, 4.0, "per_sample")
        torch.testing.assert_close(token, per_sample)
        torch.testing.assert_close(functional.gram_trace(x, delta, bias, 4.0), token.diagonal().sum())


def test_dropping_zero_gradient_tokens_changes_no_number():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, 4, generator=g, dtype=torch.float64)
    delta = torch.randn(5, 6, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 3, 0, 5])  # padding has zero output gradient; sample 3 has none at all
    delta = delta * (torch.arange(6) < lengths[:, None])[..., None]
    tokens = functional.kept_tokens(x, delta)
    assert tokens[0].shape == (int(lengths.sum()), 4)
    assert tokens[2].tolist() == [n for n, length in enumerate(lengths.tolist()) for _ in range(length)]
    beta = torch.randn(5, generator=g, dtype=torch.float64)
    unit_beta = torch.randn(5, 3, generator=g, dtype=torch.float64)  # CW-NGD: one coefficient per unit
    for bias in (True, False):
        dense = functional.gram_matrix(x, delta, bias, 5.0, "token")
        torch.testing.assert_close(functional.gram_matrix(x, delta, bias, 5.0, "token", tokens), dense)
        torch.testing.assert_close(functional.gram_matrix(x, delta, bias, 5.0, "per_sample", tokens), dense)
        assert torch.all(dense[3] == 0) and torch.all(dense[:, 3] == 0)
        for coefficients in (beta, unit_beta):
            for transposed in (False, True):
                full = functional.weighted_gradient(x, delta, coefficients, 5.0, bias, transposed)
                kept = functional.weighted_gradient(x, delta, coefficients, 5.0, bias, transposed, tokens)
                torch.testing.assert_close(kept[0], full[0])
                if bias:
                    torch.testing.assert_close(kept[1], full[1])


# ------------------------------------------------------------------- Conv1D and autocast
def test_conv1d_layer_matches_equivalent_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    conv = nn.Sequential(Conv1D(5, 6), nn.Tanh(), Conv1D(3, 5))
    with torch.no_grad():
        for lin, c in ((linear[0], conv[0]), (linear[2], conv[2])):
            c.weight.copy_(lin.weight.T)
            c.bias.copy_(lin.bias)
    x = torch.randn(4, 7, 6)  # 4 samples of 7 tokens
    y = torch.randint(0, 3, (4, 7))
    opts = [FNGD(m, lr=0.1, momentum=0.0, share_coefficients=False, damping_mode="fixed", damping=0.1)
            for m in (linear, conv)]
    for model, opt in zip((linear, conv), opts):
        nn.functional.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
        opt.step()
    assert len(opts[1].managed_modules) == 2
    for lin, c in ((linear[0], conv[0]), (linear[2], conv[2])):
        torch.testing.assert_close(c.weight.T, lin.weight)
        torch.testing.assert_close(c.bias, lin.bias)


def test_gpt2_default_targets_skip_tied_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    names = set(FNGD(model, share_coefficients=False).managed_modules)
    assert names == {f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


@pytest.mark.parametrize("backward_inside_autocast", [False, True])
def test_bf16_autocast_uses_float32_statistics(backward_inside_autocast, monkeypatch):
    gram_dtypes = []
    original = functional.gram_matrix
    monkeypatch.setattr(functional, "gram_matrix", lambda *a, **k: gram_dtypes.append(original(*a, **k).dtype) or original(*a, **k))
    model = tiny_bart()
    opt = FNGD(model, lr=1e-2, steps_per_epoch=2)
    reference = tiny_bart()
    ref_opt = FNGD(reference, lr=1e-2, steps_per_epoch=2)
    g = torch.Generator().manual_seed(0)
    batch = dict(input_ids=torch.randint(3, 40, (4, 6), generator=g), labels=torch.randint(3, 40, (4, 5), generator=g))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
        if backward_inside_autocast:
            loss.backward()
    if not backward_inside_autocast:
        loss.backward()
    assert gram_dtypes and set(gram_dtypes) == {torch.float32}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    reference(**batch).loss.backward()
    ref_opt.step()
    bank = opt.state[model.model.encoder.layers[0].fc1.weight]["coef_bank"]
    ref_bank = ref_opt.state[reference.model.encoder.layers[0].fc1.weight]["coef_bank"]
    assert bank.dtype == torch.float32 and torch.isfinite(bank).all()
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    # bf16 activations change beta only slightly.
    torch.testing.assert_close(bank, ref_bank, rtol=0.1, atol=1e-3 * float(ref_bank.abs().max()))
    assert opt.skipped_steps == 0


def test_every_micro_batch_of_an_accumulated_step_is_banked():
    model = make_mlp()
    opt = FNGD(model, steps_per_epoch=1, gradient_accumulation_steps=2)
    for seed in range(2):
        x, y = mlp_batch(seed)
        (nn.functional.cross_entropy(model(x), y) / 2).backward()
    opt.step()
    assert opt.state[model[0].weight]["coef_size"].tolist() == [[5, 5]]


def test_layer_used_without_its_forward_is_reported():
    model = make_mlp()
    opt = FNGD(model, share_coefficients=False)
    x, y = mlp_batch(0)
    hidden = torch.tanh(nn.functional.linear(x, model[0].weight, model[0].bias))  # bypasses the hook
    nn.functional.cross_entropy(model[3](model[2](hidden)), y).backward()
    with pytest.warns(RuntimeWarning, match="0 got a gradient without running its forward"):
        opt.step()


def test_multihead_attention_out_proj_is_not_managed():
    """nn.MultiheadAttention calls F.linear on out_proj's weight: its hook would never run."""
    model = nn.Sequential(nn.Linear(8, 8))
    model.attn = nn.MultiheadAttention(8, 2)
    assert set(FNGD(model, share_coefficients=False).managed_modules) == {"0"}
    with pytest.raises(ValueError, match="MultiheadAttention applies its out_proj weight directly"):
        FNGD(model, share_coefficients=False, target_modules=["attn.out_proj"])


def test_layer_called_twice_per_forward_is_reported():
    model = make_mlp()
    opt = FNGD(model, share_coefficients=False)
    x, y = mlp_batch(0)
    shared = model[3]
    hidden = model[2](torch.tanh(model[0](x)))
    logits = shared(hidden) + shared(hidden.flip(0))  # the same Linear twice in one forward
    nn.functional.cross_entropy(logits, y).backward()
    with pytest.warns(RuntimeWarning, match="3 got 2 backward passes"):
        opt.step()


def test_loading_a_state_with_other_sharing_settings_warns():
    model = make_mlp()
    opt = FNGD(model, steps_per_epoch=2)
    train_steps(model, opt, seeds=[0])
    other = FNGD(make_mlp(), steps_per_epoch=2, share_by="sample")
    with pytest.warns(RuntimeWarning, match="share_by='position'"):
        other.load_state_dict(opt.state_dict())


def test_a_checkpoint_from_before_normalize_directions_warns_that_it_ran_raw_momentum():
    model = make_mlp()
    opt = FNGD(model, steps_per_epoch=2, normalize_directions=False)
    train_steps(model, opt, seeds=[0])
    old = opt.state_dict()
    del old["layerwise"]["normalize_directions"]  # as written before the setting existed
    with pytest.warns(RuntimeWarning, match="normalize_directions=False, this optimizer has True"):
        FNGD(make_mlp(), steps_per_epoch=2).load_state_dict(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FNGD(make_mlp(), steps_per_epoch=2, normalize_directions=False).load_state_dict(opt.state_dict())


def test_deferred_solve_matches_checked_solve():
    g = torch.Generator().manual_seed(4)
    factors = torch.randn(5, 6, 3, generator=g, dtype=torch.float64)
    grams = factors @ factors.transpose(1, 2)  # rank 3 of 6: the damping carries the solve
    grams[2] = 0.0  # a unit with no gradient at all (relative damping 0): zero coefficients
    damping_b = functional.damping_times_batch(grams, 0.1, "relative", 0.0)
    checked, checked_used = functional.solve_coefficients(grams, damping_b)
    deferred, deferred_used, info = functional.solve_coefficients_deferred(grams, damping_b)
    assert info.tolist() == [0] * 5
    torch.testing.assert_close(deferred, checked)
    torch.testing.assert_close(deferred_used, checked_used)
    assert torch.all(deferred[2] == 0) and torch.all(deferred[[0, 1, 3, 4]] != 0)


def test_deferred_solve_reports_an_indefinite_system():
    grams = torch.tensor([[[1.0, 2.0], [2.0, 1.0]], [[2.0, 1.0], [1.0, 2.0]]])  # eigenvalues (3, -1), (3, 1)
    beta, _, info = functional.solve_coefficients_deferred(grams, torch.tensor([1e-3, 1e-3]))
    assert info[0] > 0 and info[1] == 0
    torch.testing.assert_close((grams[1] + 1e-3 * torch.eye(2)) @ beta[1], torch.ones(2))


def _rank_deficient_mlp_run(solve_check, steps):
    """Fixed damping 1e-30 in float32: K + λBI (rank <= 4 of 32) is indefinite after rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = FNGD(model, lr=1e-3, damping=1e-30, damping_mode="fixed", share_coefficients=False, solve_check=solve_check)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 2, generator=g), torch.randint(0, 2, (32,), generator=g)
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_failed_step_time_check_skips_the_step_then_checks_per_layer():
    checked, checked_opt = _rank_deficient_mlp_run("per_layer", 2)
    assert checked_opt.skipped_steps == 0  # the per-layer check retries with more damping
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        deferred, deferred_opt = _rank_deficient_mlp_run("per_step", 1)
    assert deferred_opt.skipped_steps == 1 and deferred_opt.global_step == 1
    torch.manual_seed(0)
    untouched = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    for p, q in zip(deferred.parameters(), untouched.parameters()):
        assert torch.equal(p, q)  # nothing moved
    assert all(len(state) == 0 for state in deferred_opt.state.values())  # no momentum, no moments
    # The fallback survives a checkpoint, and the next steps are the per-layer-checked ones.
    saved = deferred_opt.state_dict()
    deferred_opt.remove_hooks()
    resumed = FNGD(deferred, lr=1e-3, damping=1e-30, damping_mode="fixed", share_coefficients=False, solve_check="per_step")
    resumed.load_state_dict(saved)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 2, generator=g), torch.randint(0, 2, (32,), generator=g)
    for _ in range(2):
        nn.functional.cross_entropy(deferred(x), y).backward()
        resumed.step()
        resumed.zero_grad()
    assert resumed.skipped_steps == 1
    for p, q in zip(deferred.parameters(), checked.parameters()):
        torch.testing.assert_close(p, q)


def test_invalid_solve_check_is_rejected():
    with pytest.raises(ValueError, match="solve_check"):
        FNGD(make_mlp(), solve_check="never")


def test_host_copy_of_bank_sizes_follows_growth_and_checkpoints():
    """The shared phase reads bank sizes from a host copy (no device read per layer): it must match."""
    model = make_mlp()
    opt = FNGD(model, lr=0.01, steps_per_epoch=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 2 micro-batches against the declared 1
        for step, micro_batches in enumerate(([3], [5], [2, 4])):  # the bank grows in batch, then in micro
            for micro, batch in enumerate(micro_batches):
                x, y = mlp_batch(10 * step + micro, batch=batch)
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    expected = [[3, 0], [5, 0], [2, 4]]
    for layer in opt._layers:
        assert opt.state[layer.weight]["coef_size"].tolist() == expected
        assert opt._host_size_table(layer) == {(0, 0): 3, (1, 0): 5, (2, 0): 2, (2, 1): 4}
    resumed = FNGD(make_mlp(), lr=0.01, steps_per_epoch=3)
    resumed.load_state_dict(opt.state_dict())
    assert [resumed._stored_size(layer, 2, 1) for layer in resumed._layers] == [4] * len(resumed._layers)


def test_adamw_no_decay_exempts_named_parameters_from_weight_decay():
    model = tiny_bart()
    names = [n for n, _ in model.named_parameters() if n.endswith("bias") or "layernorm" in n]
    opt = FNGD(model, lr=0.1, share_coefficients=False, adamw_lr=0.1, adamw_weight_decay=0.5, adamw_no_decay=names)
    exempt = {n for n, p in model.named_parameters() if any(p is q for q in opt.param_groups[2]["params"])}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.5, 0.0]
    assert "model.encoder.layernorm_embedding.weight" in exempt and "model.shared.weight" not in exempt
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = {"input_ids": torch.tensor([[5, 6, 2]]), "labels": torch.tensor([[7, 2]])}
    (0.0 * model(**batch).loss).backward()  # zero gradients: AdamW only decays, FNGD moves nothing
    opt.step()
    managed = {f"{name}.{kind}" for name in opt.managed_modules for kind in ("weight", "bias")}
    for name, p in model.named_parameters():
        expected = before[name] if name in exempt or name in managed else before[name] * (1 - 0.1 * 0.5)
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-7, msg=name)


def test_adamw_no_decay_keeps_one_group_in_model_order_without_decay():
    model = tiny_bart()
    names = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    plain, exempted = FNGD(model), FNGD(tiny_bart(), adamw_no_decay=names)
    assert len(exempted.param_groups) == 2  # nothing to exempt from: checkpoints keep their layout
    assert [p.shape for p in exempted.param_groups[1]["params"]] == [p.shape for p in plain.param_groups[1]["params"]]


def test_adamw_no_decay_rejects_unknown_names_and_strings():
    with pytest.raises(ValueError, match="does not have"):
        FNGD(tiny_bart(), adamw_weight_decay=0.1, adamw_no_decay=["model.no_such.weight"])
    with pytest.raises(ValueError, match="list of parameter names"):
        FNGD(tiny_bart(), adamw_weight_decay=0.1, adamw_no_decay="bias")


@pytest.mark.parametrize("batch_layers", [False, True])
def test_torch_compile_gives_the_same_steps(batch_layers):
    """``torch.compile(model)`` (as with the Trainer's ``torch_compile=True``): the hooks still capture,
    in the first epoch and the shared phase, and the steps equal the eager ones (also with the first
    epoch's layers batched at the end of backward, the GPU default)."""
    eager, compiled = make_mlp(), make_mlp()
    eager_opt = FNGD(eager, lr=0.01, steps_per_epoch=2)
    compiled_opt = FNGD(compiled, lr=0.01, steps_per_epoch=2, batch_layers=batch_layers)
    batched = spy_batches(compiled_opt)
    forward = torch.compile(compiled, backend="aot_eager")
    try:
        for seed in range(4):
            x, y = mlp_batch(seed)
            for net, opt in ((eager, eager_opt), (forward, compiled_opt)):
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
                opt.zero_grad()
    finally:
        torch._dynamo.reset()
    assert compiled_opt.diagnostics()["fngd/fresh_fraction"] == 0.5  # 2 of 4 steps formed K
    assert sum(batched) == (2 * 2 if batch_layers else 0)  # 2 layers in each of the first epoch's 2 steps
    assert compiled_opt.skipped_steps == 0
    for p, q, p0 in zip(compiled.parameters(), eager.parameters(), make_mlp().parameters()):
        torch.testing.assert_close(p, q)
        assert not torch.equal(p, p0)


def test_trust_region_bounds_a_zero_initialised_layer_by_the_others_rms_weight():
    """An all-zero layer has no norm of its own: ‖d‖ <= ratio · RMS(other layers' weights) · √(its size)."""
    model = make_mlp()
    nn.init.zeros_(model[3].weight)
    nn.init.zeros_(model[3].bias)
    first = torch.cat([model[0].weight.detach().flatten(), model[0].bias.detach()])
    rms = float(first.norm()) / first.numel() ** 0.5
    ratio, lr = 0.05, 0.1
    opt = FNGD(model, lr=lr, momentum=0.0, share_coefficients=False, step_length="trust_region", trust_ratio=ratio)
    x, y = mlp_batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    unclipped = float(torch.cat([opt.direction(model[3].weight).flatten(), opt.direction(model[3].bias)]).norm())
    bound = ratio * rms * (model[3].weight.numel() + model[3].bias.numel()) ** 0.5
    assert unclipped > 5 * bound  # the bound really acts
    opt.step()
    moved = float(torch.cat([model[3].weight.detach().flatten(), model[3].bias.detach()]).norm())
    assert moved == pytest.approx(lr * bound, rel=1e-5)
    assert opt.diagnostics()["fngd/trust_clipped"] == 0.5  # the zero layer, not layer 0 (its d is 0)


# ------------------------------------------------------------------------------ ergonomics
def test_adamw_parameters_are_the_unmanaged_ones():
    model = make_mlp()
    opt = FNGD(model, lr=0.01)
    managed = {id(p) for m in opt.managed_modules.values() for p in m.parameters()}
    assert {id(p) for p in opt.adamw_parameters()} == {id(p) for p in model.parameters()} - managed
    assert {id(p) for p in opt.adamw_parameters()} == {id(model[2].weight), id(model[2].bias)}  # the LayerNorm


def test_parameters_instead_of_the_model_is_a_clear_error():
    with pytest.raises(TypeError, match=r"takes the model .* optimizers=\(FNGD\(model, \.\.\.\), None\)"):
        FNGD(make_mlp().parameters(), lr=0.01)


def test_auto_trust_ratio_follows_the_square_root_of_the_batch():
    """``"auto"`` (relative damping): the trust region is sqrt(B/64) of the batch-64 one below 64 samples, so a
    small batch's many noisy steps cannot random-walk a layer away (the batch-8 collapse); 1.0 from 64 on."""
    moved = {}
    for ratio, batch in (("auto", 5), (1.0, 5), ("auto", 64)):
        model = make_mlp()
        start = torch.cat([model[0].weight.detach().flatten(), model[0].bias.detach()])
        opt = FNGD(model, lr=0.1, momentum=0.0, share_coefficients=False, step_length="trust_region", trust_ratio=ratio, damping=1e-3)
        x, y = mlp_batch(0, batch=batch)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        after = torch.cat([model[0].weight.detach().flatten(), model[0].bias.detach()])
        moved[ratio, batch] = float((after - start).norm()) / float(start.norm())
        assert opt.diagnostics()["fngd/trust_clipped"] > 0  # the bound acts on these steps
    assert moved[1.0, 5] == pytest.approx(0.1, rel=1e-4)  # lr · 1.0 of the layer's norm
    assert moved["auto", 5] == pytest.approx(0.1 * (5 / 64) ** 0.5, rel=1e-4)
    assert moved["auto", 64] == pytest.approx(0.1, rel=1e-4)
