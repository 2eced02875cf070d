"""SNGD: the matrix functions against eigendecompositions, and the optimizer against dense float64 maths."""

import io
import warnings

import pytest
import torch
from torch import nn

import reference as ref
from fngd_hf import matrix_functions as mf
from fngd_hf.sngd import SNGD
from tiny_models import make_mlp, mlp_batch, tiny_bart, train_steps

F64 = torch.float64


# ------------------------------------------------------------------------------ helpers
def spd(n, cond, seed=0, dtype=F64):
    """A random SPD matrix with eigenvalues log-spaced from 1 down to 1/cond."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    values = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), n, dtype=F64)
    return ((q * values) @ q.T).to(dtype)


def eig_power(a, power):
    values, vectors = torch.linalg.eigh(a.to(F64))
    return (vectors * values.clamp(min=0) ** power) @ vectors.T


def rel(a, b):
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


def augmented(x, bias):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1) if bias else x


def block(module):
    w = module.weight.detach().to(F64).clone()
    return torch.cat([w, module.bias.detach().to(F64)[:, None]], dim=1) if module.bias is not None else w


class Recorder:
    """Inputs and output gradients of Linear layers of a model without optimizer hooks."""

    def __init__(self, model, names):
        self.x, self.delta = {}, {}
        for name in names:
            model.get_submodule(name).register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, args, output):
            self.x[name] = args[0].detach().reshape(-1, args[0].shape[-1])
            output.register_hook(lambda g: self.delta.__setitem__(name, g.detach().reshape(-1, g.shape[-1])))

        return hook


def expected_direction(x, delta, bias, damping, omega=None):
    """Dense float64 ``ḡ (G + λI)^{-1}`` (``G`` over tokens with a gradient; Nyström form if ``omega``)."""
    x_hat = augmented(x.to(F64), bias)
    delta = delta.to(F64)
    active = (delta != 0).any(dim=1)
    g = x_hat[active].T @ x_hat[active] / int(active.sum())
    n = g.shape[0]
    lam = damping * torch.trace(g) / n
    if omega is not None:
        omega = omega.to(F64)
        y = g @ omega
        approx = y @ torch.linalg.solve(omega.T @ y, y.T)
        r = omega.shape[1]
        rho = (torch.trace(g) - torch.trace(approx)) / (n - r)
        q, _ = torch.linalg.qr(y)
        g = approx + rho * (torch.eye(n, dtype=F64) - q @ q.T)
    gradient = delta.T @ x_hat
    return torch.linalg.solve(g + lam * torch.eye(n, dtype=F64), gradient.T).T


# ------------------------------------------------------------------- Denman–Beavers
@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("n", [1, 7, 40])
def test_denman_beavers_matches_eigendecomposition(n, cond):
    a = spd(n, cond, seed=n) * 3.7
    root, inv_root = mf.denman_beavers(a, 30)
    tol = 1e-12 * max(cond, 1.0) ** 0.5
    assert rel(root, eig_power(a, 0.5)) < tol
    assert rel(inv_root, eig_power(a, -0.5)) < tol
    assert rel(root @ root, a) < tol
    assert rel(inv_root @ a @ inv_root, torch.eye(n, dtype=F64)) < tol


@pytest.mark.parametrize("cond", [1e4, 1e6, float("inf")])
def test_denman_beavers_with_damping_on_ill_conditioned_or_singular_matrices(cond):
    n = 30
    a = spd(n, 1e12 if cond == float("inf") else cond, seed=3)
    if cond == float("inf"):
        a[:, :5] = 0.0  # exactly rank-deficient
        a[:5, :] = 0.0
    damped = a + 1e-3 * torch.trace(a) / n * torch.eye(n, dtype=F64)
    root, inv_root = mf.denman_beavers(damped, 20)
    assert rel(root, eig_power(damped, 0.5)) < 1e-10
    assert rel(inv_root, eig_power(damped, -0.5)) < 1e-10
    # the scaling matters: a handful of iterations suffice
    root6, inv_root6 = mf.denman_beavers(spd(n, 1e6, seed=4), 8)
    assert rel(inv_root6, eig_power(spd(n, 1e6, seed=4), -0.5)) < 1e-8


def test_denman_beavers_float32_batched_and_not_positive_definite():
    batch = torch.stack([spd(12, 1e3, seed=s) for s in range(3)]).float()
    root, inv_root = mf.denman_beavers(batch, 20)
    for k in range(3):
        assert rel(root[k], eig_power(batch[k], 0.5)) < 1e-4
        assert rel(inv_root[k], eig_power(batch[k], -0.5)) < 1e-3
    indefinite = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    root, inv_root = mf.denman_beavers(indefinite)
    assert torch.isnan(root).all() and torch.isnan(inv_root).all()


# ---------------------------------------------------------------------------- Nyström
def test_nystrom_error_falls_with_rank_and_is_exact_at_full_rank():
    n = 40
    a = spd(n, 1e6, seed=5)
    omega = mf.gaussian_sketch(n, n, torch.Generator().manual_seed(0))
    errors = []
    for rank in (2, 5, 10, 20, 30, 40):
        q, core = mf.nystrom(a, rank, omega=omega[:, :rank])  # nested sketches
        assert torch.allclose(q.T @ q, torch.eye(rank, dtype=F64), atol=1e-12)
        errors.append(rel(q @ core @ q.T, a))
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-12, errors
    # random sketches from a generator: the same trend, and exact at full rank
    g = torch.Generator().manual_seed(1)
    assert rel(*[(lambda q, m: q @ m @ q.T)(*mf.nystrom(a, n, g)), a]) < 1e-12
    assert rel((lambda q, m: q @ m @ q.T)(*mf.nystrom(a, 8, g)), a) > rel(
        (lambda q, m: q @ m @ q.T)(*mf.nystrom(a, 25, g)), a
    )


def test_nystrom_from_matvec_equals_from_matrix_and_low_rank_is_recovered():
    n, r = 30, 6
    g = torch.Generator().manual_seed(2)
    factor = torch.randn(n, r, generator=g, dtype=F64)
    a = factor @ factor.T  # exactly rank r
    omega = mf.gaussian_sketch(n, r, torch.Generator().manual_seed(3))
    q1, m1 = mf.nystrom(a, r, omega=omega)
    q2, m2 = mf.nystrom(lambda v: a @ v, r, omega=omega)
    assert rel(q2 @ m2 @ q2.T, q1 @ m1 @ q1.T) < 1e-12
    assert rel(q1 @ m1 @ q1.T, a) < 1e-8  # a rank-r matrix is recovered by a rank-r sketch


# ---------------------------------------------------------------- low-rank + λI powers
@pytest.mark.parametrize("power", [1, -1, 0.5, -0.5])
@pytest.mark.parametrize("diagonal", [False, True])
def test_lowrank_plus_identity_power_matches_dense(power, diagonal):
    n, r, lam = 25, 6, 0.03
    g = torch.Generator().manual_seed(4)
    basis, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))
    if diagonal:
        core = torch.rand(r, generator=g, dtype=F64) * 10
        dense_core = torch.diag(core)
    else:
        core = spd(r, 1e3, seed=6) * 10
        dense_core = core
    full = basis @ dense_core @ basis.T + lam * torch.eye(n, dtype=F64)
    c, scale = mf.lowrank_plus_identity_power(basis, core, lam, power)
    x = torch.randn(4, n, generator=g, dtype=F64)
    expected = x @ eig_power(full, power)
    assert rel(mf.apply_lowrank(x, basis, c, scale), expected) < 1e-10


# -------------------------------------------------------------- SNGD: one exact step
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [None, 4])
def test_one_step_is_analytic_preconditioned_step_mlp(bias, rank):
    damping, lr = 0.05, 0.1
    model = ref.tiny_mlp(bias=bias)
    reference = ref.tiny_mlp(bias=bias)
    names = ["0", "2", "4"]
    recorder = Recorder(reference, names)
    batch = ref.mlp_batch(8, seed=1)
    ref.mlp_loss(reference, batch).backward()

    opt = SNGD(model, lr=lr, damping=damping, momentum=0.0, rank=rank, stat_dtype=F64)
    before = {n: block(m) for n, m in opt.managed_modules.items()}
    ref.mlp_loss(model, batch).backward()
    opt.step()
    for name, module in opt.managed_modules.items():
        omega = opt.state[module.weight].get("sngd_omega")
        assert (omega is not None) == (rank is not None and module.in_features + bias > rank)
        expected = expected_direction(recorder.x[name], recorder.delta[name], bias, damping, omega)
        moved = block(module) - before[name]
        assert rel(moved, -lr * expected) < 1e-9, name
        plain = augmented(recorder.x[name], bias)
        assert rel(moved, -lr * (recorder.delta[name].T @ plain)) > 1e-2  # not the plain gradient


@pytest.mark.parametrize("rank", [None, 8])
def test_one_step_is_analytic_preconditioned_step_bart_with_padding(rank):
    damping, lr = 0.1, 1e-3
    model = ref.tiny_seq2seq("bart")
    reference = ref.tiny_seq2seq("bart")
    opt = SNGD(model, lr=lr, damping=damping, momentum=0.0, rank=rank, stat_dtype=F64)
    names = list(opt.managed_modules)
    assert any("fc1" in n for n in names) and any("q_proj" in n for n in names)
    recorder = Recorder(reference, names)
    batch = ref.seq2seq_batch(4, seed=0)
    ref.seq2seq_loss(reference, batch).backward()
    before = {n: block(m) for n, m in opt.managed_modules.items()}
    ref.seq2seq_loss(model, batch).backward()
    opt.step()
    padded = 0
    for name, module in opt.managed_modules.items():
        x, delta = recorder.x[name], recorder.delta[name]
        padded += int(((delta == 0).all(dim=1)).sum())
        omega = opt.state[module.weight].get("sngd_omega")
        expected = expected_direction(x, delta, True, damping, omega)
        # q/k projections have gradients ~1e-8 (near-uniform attention): their rounding is relatively larger
        assert rel(block(module) - before[name], -lr * expected) < 1e-6, name
    assert padded > 0  # the batch has padding, and it is left out of G


def test_reparameterised_layer_with_plain_momentum_sgd_follows_the_same_path():
    """The paper's theorem: momentum SGD on w' = G^{1/2} w (local Fisher layer x -> G^{-1/2} x) equals SNGD on w."""
    torch.manual_seed(0)
    lr, momentum, damping = 0.05, 0.9, 0.1
    layer = nn.Linear(5, 3).to(F64)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 5, generator=g, dtype=F64) * torch.tensor([3.0, 1.0, 0.3, 0.1, 1.0], dtype=F64),
             torch.randn(16, 3, generator=g, dtype=F64)) for _ in range(5)]
    x_hat = augmented(data[0][0], True)
    gram = x_hat.T @ x_hat / x_hat.shape[0]
    damped = gram + damping * torch.trace(gram) / 6 * torch.eye(6, dtype=F64)
    inv_root = eig_power(damped, -0.5)  # the local Fisher layer, from the first batch (update_freq > steps)

    w_prime = (block(layer) @ eig_power(damped, 0.5)).requires_grad_()
    sgd = torch.optim.SGD([w_prime], lr=lr, momentum=momentum)
    opt = SNGD(layer, lr=lr, damping=damping, momentum=momentum, rank=None, update_freq=100, stat_dtype=F64)
    for x, y in data:
        nn.functional.mse_loss(layer(x), y).backward()
        opt.step()
        opt.zero_grad()
        nn.functional.mse_loss(augmented(x, True) @ inv_root @ w_prime.T, y).backward()
        sgd.step()
        sgd.zero_grad()
        assert rel(block(layer), w_prime.detach() @ inv_root) < 1e-10


# ------------------------------------------------------------------ SNGD: behaviour
@pytest.mark.parametrize("rank", [None, 8])
def test_state_dict_resume_equals_uninterrupted(rank):
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=0.01, rank=rank, update_freq=3, stat_decay=0.8)
    reference = make_mlp()
    reference_opt = SNGD(reference, **kwargs)
    train_steps(reference, reference_opt, seeds=range(8))

    first = make_mlp()
    first_opt = SNGD(first, **kwargs)
    train_steps(first, first_opt, seeds=range(4))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["layerwise"]["global_step"] == 4
    layer_state = first_opt.state[first[3].weight]
    assert ("sngd_omega" in layer_state) == (rank is not None)  # the 9-wide layer is Nyström at rank 8
    assert all(layer_state[k].dtype == torch.float32 for k in layer_state if k.startswith("sngd_"))

    resumed = make_mlp(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_opt = SNGD(resumed, **kwargs)
    resumed_opt.load_state_dict(saved["opt"])
    train_steps(resumed, resumed_opt, seeds=range(4, 8))
    for a, b in zip(reference.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_state_stays_float32_for_bf16_parameters():
    model = make_mlp(dtype=torch.bfloat16)
    opt = SNGD(model, lr=0.01, rank=4)
    train_steps(model, opt, seeds=range(2))
    fresh = SNGD(make_mlp(dtype=torch.bfloat16), lr=0.01, rank=4)
    fresh.load_state_dict(opt.state_dict())
    for module, fresh_module in ((model[0], fresh.managed_modules["0"]), (model[3], fresh.managed_modules["3"])):
        for key, value in opt.state[module.weight].items():
            if key.startswith("sngd_"):
                loaded = fresh.state[fresh_module.weight][key]
                assert loaded.dtype == torch.float32 and torch.equal(loaded, value), key


def test_tiny_bart_trains():
    model = tiny_bart(0, d_model=32, ffn_dim=64, encoder_layers=2, decoder_layers=2).train()
    opt = SNGD(model, lr=0.05, damping=0.1, rank=16, update_freq=5, adamw_lr=3e-3)
    assert len(opt.managed_modules) == 2 * 6 + 2 * 10
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 40, (8, 10), generator=g)
    labels = torch.randint(3, 40, (8, 9), generator=g)
    losses = []
    for _ in range(40):
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and opt.skipped_steps == 0
    assert losses[-1] < 0.5 * losses[0], losses
    # the first micro-batch, then after steps 0, 5, ..., 35
    assert opt.diagnostics()["sngd/refreshes"] == 9 * len(opt.managed_modules)


def test_non_finite_gradient_skips_step_and_keeps_statistics():
    model = make_mlp()
    opt = SNGD(model, lr=0.05, rank=4, update_freq=1)
    train_steps(model, opt, seeds=[0])
    params = [p.detach().clone() for p in model.parameters()]
    states = {m: {k: v.clone() for k, v in opt.state[m.weight].items()} for m in (model[0], model[3])}
    x, y = mlp_batch(1)
    x[2, 0] = float("nan")
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="skipped step 1"):
        opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for module, state in states.items():
        for key, value in state.items():
            assert torch.equal(value, opt.state[module.weight][key]), key
    train_steps(model, opt, seeds=[2])  # training continues, with statistics from good steps only
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert float(opt.state[model[0].weight]["sngd_weight"]) == pytest.approx(1 - 0.95**2)


def test_refresh_schedule_and_statistics_average():
    model = make_mlp(dtype=F64)
    opt = SNGD(model, lr=0.01, rank=None, update_freq=3, stat_decay=0.5, stat_dtype=F64)
    precond = []
    for seed in range(7):
        train_steps(model, opt, seeds=[seed])
        precond.append(opt.state[model[0].weight]["sngd_precond"].clone())
    changed = [not torch.equal(a, b) for a, b in zip(precond, precond[1:])]
    assert changed == [False, False, True, False, False, True]  # refreshed after steps 0, 3, 6
    # the committed G is the bias-corrected EMA of the per-step input second moments
    stat = torch.zeros(7, 7, dtype=F64)
    weight = 0.0
    probe = make_mlp(dtype=F64)
    probe.load_state_dict(model.state_dict())  # first layer's inputs do not depend on the weights
    for seed in range(7):
        x_hat = augmented(mlp_batch(seed, dtype=F64)[0], True)
        stat = 0.5 * stat + 0.5 * x_hat.T @ x_hat / 5
        weight = 0.5 * weight + 0.5
    state = opt.state[model[0].weight]
    torch.testing.assert_close(state["sngd_stat"] / state["sngd_weight"], stat / weight)


def test_duplicated_micro_batches_equal_single_batch():
    kwargs = dict(lr=0.05, momentum=0.9, rank=8, update_freq=2, stat_dtype=F64)
    single, double = make_mlp(dtype=F64), make_mlp(dtype=F64)
    opt_single = SNGD(single, **kwargs)
    opt_double = SNGD(double, gradient_accumulation_steps=2, **kwargs)
    for seed in range(4):
        x, y = mlp_batch(seed, dtype=F64)
        nn.functional.cross_entropy(single(x), y).backward()
        opt_single.step()
        opt_single.zero_grad()
        for _ in range(2):  # each micro-batch loss is its mean / GA, as FNGDTrainer backpropagates
            (nn.functional.cross_entropy(double(x), y) / 2).backward()
        opt_double.step()
        opt_double.zero_grad()
    for a, b in zip(single.parameters(), double.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_conv1d_layer_matches_equivalent_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    linear = nn.Linear(6, 4).double()
    conv = Conv1D(4, 6).double()
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    opts = [SNGD(m, lr=0.1, rank=3, stat_dtype=F64) for m in (linear, conv)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(2, 5, 6, generator=g, dtype=F64)
        for module, opt in zip((linear, conv), opts):
            module(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(conv.weight.T, linear.weight)
    torch.testing.assert_close(conv.bias, linear.bias)


def test_layer_with_zero_output_gradient_gets_zero_update():
    model = make_mlp()
    opt = SNGD(model, lr=0.1, momentum=0.0)
    before = model[0].weight.detach().clone()
    x, _ = mlp_batch(0)
    (model(x) * 0.0).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.equal(before, model[0].weight)
    assert float(opt.state[model[0].weight]["sngd_weight"]) == 0.0  # no active token: nothing averaged in


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "learning rate"),
        (dict(damping=0.0), "damping"),
        (dict(damping_mode="adaptive"), "damping_mode"),
        (dict(rank=0), "rank"),
        (dict(update_freq=0), "update_freq"),
        (dict(db_iterations=0), "db_iterations"),
        (dict(stat_decay=1.0), "stat_decay"),
        (dict(stat_dtype=torch.float16), "stat_dtype"),
        (dict(momentum=1.0), "momentum"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SNGD(make_mlp(), **kwargs)


def test_batched_matrix_functions_equal_one_by_one_and_isolate_failures():
    mats = torch.stack([spd(10, 1e4, seed=s) for s in range(3)])
    mats[1] = torch.diag(torch.linspace(-1.0, 1.0, 10, dtype=F64))  # not SPD
    root, inv_root = mf.denman_beavers(mats, 20)
    assert torch.isnan(root[1]).all() and torch.isnan(inv_root[1]).all()
    for k in (0, 2):
        assert rel(inv_root[k], eig_power(mats[k], -0.5)) < 1e-10
    omega = torch.stack([mf.gaussian_sketch(10, 4, torch.Generator().manual_seed(s)) for s in range(3)])
    good = torch.stack([spd(10, 1e3, seed=s) for s in range(3)])
    q, core = mf.nystrom_from_sketch(omega, good @ omega)
    for k in range(3):
        q1, core1 = mf.nystrom_from_sketch(omega[k], good[k] @ omega[k])
        assert rel(q[k] @ core[k] @ q[k].T, q1 @ core1 @ q1.T) < 1e-10
