"""K-FAC against dense float64 references on tiny layers, plus state, safeguards and a tiny BART."""

import functools
import io
import math

import pytest
import torch
from torch import nn

from fngd_hf.kfac import KFAC

import tiny_models
from tiny_models import tiny_bart, train_steps

# K-FAC's dense references run in float64.
make_mlp = functools.partial(tiny_models.make_mlp, dtype=torch.float64)
mlp_batch = functools.partial(tiny_models.mlp_batch, dtype=torch.float64)


def capture(model, loss_fn):
    """Inputs, output gradients and plain gradients of every Linear, by ordinary autograd."""
    records, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(mod, args, out, name=name):
                out.retain_grad()
                records[name] = [args[0].detach(), out]
            handles.append(module.register_forward_hook(hook))
    loss_fn(model).backward()
    for h in handles:
        h.remove()
    return {name: (x, out.grad.detach()) for name, (x, out) in records.items()}


def dense_factors(x, delta, batch, micro=1, bias=True):
    """A = mean over tokens with a nonzero δ row of x̂x̂ᵀ; G = (1/N) Σ_n Σ_t (sδ)(sδ)ᵀ, s = B·M."""
    x = x.reshape(-1, x.shape[-1]).double()
    delta = delta.reshape(-1, delta.shape[-1]).double()
    if bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    keep = (delta != 0).any(dim=1)
    xa = x[keep]
    a = xa.T @ xa / keep.sum()
    s = batch * micro
    g = (s * delta).T @ (s * delta) / (batch * micro)
    grad = delta.T @ x
    return a, g, grad


def layer_block(module):
    w = module.weight.detach().double().clone()
    return torch.cat([w, module.bias.detach().double()[:, None]], dim=1) if module.bias is not None else w


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "learning rate"),
        (dict(damping=0.0), "damping"),
        (dict(stat_decay=1.0), "stat_decay"),
        (dict(factor_update_freq=0), "factor_update_freq"),
        (dict(inverse_update_freq=1.5), "inverse_update_freq"),
        (dict(inverse_method="svd"), "inverse_method"),
        (dict(kl_clip=0.0), "kl_clip"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KFAC(make_mlp(), **kwargs)


# ------------------------------------------------------------------------- dense references
@pytest.mark.parametrize("bias", [True, False])
def test_one_step_eigen_equals_dense_damped_kronecker_inverse(bias):
    lr, damping = 0.3, 1e-2
    model = make_mlp(bias=bias)
    reference = make_mlp(bias=bias)
    x, y = mlp_batch(0)
    records = capture(reference, lambda m: nn.functional.cross_entropy(m(x), y))
    opt = KFAC(model, lr=lr, damping=damping, momentum=0.0, stat_decay=0.0, inverse_update_freq=1)
    before = {name: layer_block(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        a, g, grad = dense_factors(*records[name], batch=5, bias=bias)
        fisher = torch.kron(g, a) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=torch.float64)
        expected = before[name] - lr * torch.linalg.solve(fisher, grad.flatten()).view_as(grad)
        torch.testing.assert_close(layer_block(module), expected, rtol=1e-9, atol=1e-12)
        state = opt.state[module.weight]
        torch.testing.assert_close(state["kfac_A"], a)
        torch.testing.assert_close(state["kfac_G"], g)


def test_one_step_cholesky_equals_dense_factored_tikhonov():
    lr, damping = 0.3, 1e-2
    model, reference = make_mlp(), make_mlp()
    x, y = mlp_batch(1)
    records = capture(reference, lambda m: nn.functional.cross_entropy(m(x), y))
    opt = KFAC(model, lr=lr, damping=damping, momentum=0.0, stat_decay=0.0, inverse_method="cholesky")
    before = layer_block(model[3])
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    a, g, grad = dense_factors(*records["3"], batch=5)
    root = math.sqrt(damping)
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    direction = torch.linalg.solve(g + root * eye(g.shape[0]), grad) @ torch.linalg.inv(a + root * eye(a.shape[0]))
    torch.testing.assert_close(layer_block(model[3]), before - lr * direction, rtol=1e-9, atol=1e-12)


def test_sequences_with_padding_count_only_tokens_with_a_gradient():
    # 3 samples of 4 tokens; the last two tokens of sample 0 are padding (ignored by the loss).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    reference = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    reference.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 4), generator=g)
    y[0, 2:] = -100
    loss = lambda m: nn.functional.cross_entropy(m(x).reshape(-1, 3), y.reshape(-1), ignore_index=-100)  # noqa: E731
    records = capture(reference, loss)
    assert (records["2"][1][0, 2:] == 0).all()
    opt = KFAC(model, lr=0.1, damping=1e-3, momentum=0.0, stat_decay=0.0)
    before = layer_block(model[2])
    loss(model).backward()
    opt.step()
    a, gg, grad = dense_factors(*records["2"], batch=3)
    torch.testing.assert_close(opt.state[model[2].weight]["kfac_A"], a)
    torch.testing.assert_close(opt.state[model[2].weight]["kfac_G"], gg)
    fisher = torch.kron(gg, a) + 1e-3 * torch.eye(a.shape[0] * gg.shape[0], dtype=torch.float64)
    expected = before - 0.1 * torch.linalg.solve(fisher, grad.flatten()).view_as(grad)
    torch.testing.assert_close(layer_block(model[2]), expected, rtol=1e-9, atol=1e-12)


def test_accumulated_micro_batches_equal_one_large_batch():
    kwargs = dict(lr=0.2, damping=1e-3, momentum=0.0, stat_decay=0.0)
    big, small = make_mlp(), make_mlp()
    x, y = mlp_batch(3, batch=8)
    opt_big = KFAC(big, **kwargs)
    nn.functional.cross_entropy(big(x), y).backward()
    opt_big.step()
    opt_small = KFAC(small, gradient_accumulation_steps=2, **kwargs)
    for part in (slice(0, 4), slice(4, 8)):
        (nn.functional.cross_entropy(small(x[part]), y[part]) / 2).backward()
    opt_small.step()
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt_small.state[small[0].weight]["kfac_G"], opt_big.state[big[0].weight]["kfac_G"])


# --------------------------------------------------------------------- running averages
def test_running_average_and_update_frequencies():
    model = make_mlp()
    records = []
    model[0].register_forward_hook(lambda m, args, out: records.append(args[0].detach().clone()))
    opt = KFAC(model, lr=0.05, stat_decay=0.5, factor_update_freq=2, inverse_update_freq=3)
    state = opt.state[model[0].weight]

    def batch_a(x):
        xh = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        return xh.T @ xh / x.shape[0]

    train_steps(model, opt, seeds=[0])  # step 0: factors = batch factors, inverses computed
    a0 = batch_a(records[0])
    torch.testing.assert_close(state["kfac_A"], a0)
    q0 = state["kfac_QA"].clone()
    train_steps(model, opt, seeds=[1])  # step 1: neither factors nor inverses change
    torch.testing.assert_close(state["kfac_A"], a0)
    assert torch.equal(state["kfac_QA"], q0)
    train_steps(model, opt, seeds=[2])  # step 2: running average, inverses kept (2 % 3 != 0)
    a2 = 0.5 * a0 + 0.5 * batch_a(records[2])
    torch.testing.assert_close(state["kfac_A"], a2)
    assert torch.equal(state["kfac_QA"], q0)
    train_steps(model, opt, seeds=[3])  # step 3: inverses from the stored factors
    torch.testing.assert_close(state["kfac_A"], a2)
    values, vectors = torch.linalg.eigh(a2)
    torch.testing.assert_close(state["kfac_dA"], values.clamp(min=0))
    torch.testing.assert_close(state["kfac_QA"] @ torch.diag(state["kfac_dA"]) @ state["kfac_QA"].T, a2)


# ----------------------------------------------------------------------- state and modes
def test_state_dict_resume_equals_uninterrupted():
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=0.01, stat_decay=0.9, factor_update_freq=2,
                  inverse_update_freq=3, kl_clip=1e-2)
    ref = make_mlp(dtype=torch.float32)
    ref_opt = KFAC(ref, **kwargs)
    train_steps(ref, ref_opt, seeds=range(8))

    first = make_mlp(dtype=torch.float32)
    first_opt = KFAC(first, **kwargs)
    train_steps(first, first_opt, seeds=range(5))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["layerwise"]["global_step"] == 5

    resumed = make_mlp(seed=123, dtype=torch.float32)
    resumed.load_state_dict(saved["model"])
    resumed_opt = KFAC(resumed, **kwargs)
    resumed_opt.load_state_dict(saved["opt"])
    train_steps(resumed, resumed_opt, seeds=range(5, 8))
    for a, b in zip(ref.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_factors_stay_float32_for_bf16_parameters():
    model = make_mlp(dtype=torch.bfloat16)
    opt = KFAC(model, lr=0.01)
    train_steps(model, opt, seeds=[0, 1])
    fresh = KFAC(make_mlp(dtype=torch.bfloat16), lr=0.01)
    fresh.load_state_dict(opt.state_dict())
    for key in ("kfac_A", "kfac_G", "kfac_QA", "kfac_dG"):
        value = fresh.state[fresh.param_groups[0]["params"][0]][key]
        assert value.dtype == torch.float32
        assert torch.equal(value, opt.state[model[0].weight][key])


def test_no_capture_in_eval_or_optimizer_eval(monkeypatch):
    calls = []
    original = KFAC._layer_gradient

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(KFAC, "_layer_gradient", counting)
    model = make_mlp()
    opt = KFAC(model)
    x, y = mlp_batch(0)
    model.eval()
    nn.functional.cross_entropy(model(x), y).backward()
    model.train()
    opt.eval()
    nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        assert model(x).grad_fn is None
    assert calls == [] and not opt._staged
    opt.train()
    nn.functional.cross_entropy(model(x), y).backward()
    assert len(calls) == 2 and len(opt._staged) == 2


def test_non_finite_input_skips_step_and_keeps_factors():
    model = make_mlp(dtype=torch.float32)
    opt = KFAC(model, lr=0.01, inverse_update_freq=1)
    train_steps(model, opt, seeds=[0])
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    x, y = mlp_batch(1, dtype=torch.float32)
    x[2, 0] = float("nan")
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="skipped step 1"):
        opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for key, value in state.items():
        assert torch.equal(value, opt.state[model[0].weight][key]), key
    train_steps(model, opt, seeds=[2])
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_kl_clip_bounds_the_update():
    model, reference = make_mlp(), make_mlp()
    x, y = mlp_batch(0)
    kwargs = dict(lr=1.0, momentum=0.0, stat_decay=0.0, damping=1e-3)
    clipped = KFAC(model, kl_clip=1e-6, **kwargs)
    plain = KFAC(reference, **kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    for m, opt in ((model, clipped), (reference, plain)):
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    moved = [b - p.detach() for b, p in zip(before, model.parameters())]
    moved_plain = [b - p.detach() for b, p in zip(before, reference.parameters())]
    ratio = moved[0].norm() / moved_plain[0].norm()
    assert ratio < 1.0
    torch.testing.assert_close(moved[4].norm() / moved_plain[4].norm(), ratio)  # one factor for all layers (W of model[3])


def test_conv1d_layer_matches_equivalent_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    conv = nn.Sequential(Conv1D(5, 6), nn.Tanh(), Conv1D(3, 5)).double()
    with torch.no_grad():
        for lin, c in ((linear[0], conv[0]), (linear[2], conv[2])):
            c.weight.copy_(lin.weight.T)
            c.bias.copy_(lin.bias)
    x = torch.randn(4, 7, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 7))
    opts = [KFAC(m, lr=0.1, momentum=0.0, inverse_method=method)
            for m, method in ((linear, "eigen"), (conv, "eigen"))]
    for model, opt in zip((linear, conv), opts):
        nn.functional.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
        opt.step()
    assert len(opts[1].managed_modules) == 2
    for lin, c in ((linear[0], conv[0]), (linear[2], conv[2])):
        torch.testing.assert_close(c.weight.T, lin.weight)
        torch.testing.assert_close(c.bias, lin.bias)


# -------------------------------------------------------------------------- a tiny BART
@pytest.mark.parametrize("method", ["eigen", "cholesky"])
def test_tiny_bart_trains(method):
    model = tiny_bart()
    opt = KFAC(model, lr=0.05, damping=0.1, inverse_update_freq=2, adamw_lr=1e-2, inverse_method=method)
    assert len(opt.managed_modules) == 16
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 40, (8, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    input_ids[:3, 5:], attention_mask[:3, 5:] = 1, 0  # padded sources
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    losses = []
    for _ in range(30):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert opt.skipped_steps == 0
    assert losses[-1] < 0.5 * losses[0], losses
    # Generation after training: capture off, nothing staged.
    model.eval()
    opt.eval()
    with torch.no_grad():
        model.generate(input_ids=input_ids[:2], attention_mask=attention_mask[:2], max_new_tokens=4)
    assert not opt._staged


# ----------------------------------------------------------------------------- DDP
DDP_WORKER = r"""
import sys, torch, torch.distributed as dist
from torch import nn
from fngd_hf.kfac import KFAC
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()
opt = KFAC(model, lr=0.2, damping=1e-3, momentum=0.5, stat_decay=0.5)
ddp = nn.parallel.DistributedDataParallel(model)
for step in range(3):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 6, generator=g).double(), torch.randint(0, 3, (8,), generator=g)
    part = slice(4 * rank, 4 * rank + 4)
    nn.functional.cross_entropy(ddp(x[part]), y[part]).backward()
    opt.step()
    opt.zero_grad()
torch.save([p.detach() for p in model.parameters()], out)
dist.destroy_process_group()
"""


def test_ddp_ranks_share_factors_and_equal_one_process(tmp_path):
    import socket
    import subprocess
    import sys

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(port), str(tmp_path / f"rank{r}.pt")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    opt = KFAC(model, lr=0.2, damping=1e-3, momentum=0.5, stat_decay=0.5)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g).double(), torch.randint(0, 3, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for a, b, ref in zip(*ranks, model.parameters()):
        assert torch.equal(a, b)  # every rank applies the same update
        torch.testing.assert_close(a, ref.detach(), rtol=1e-9, atol=1e-12)  # = one process with the whole batch


def test_bf16_autocast_keeps_float32_factors_and_plain_gradients():
    model, reference = tiny_bart(), tiny_bart()
    opt = KFAC(model, lr=1e-2, damping=1e-2)
    g = torch.Generator().manual_seed(0)
    batch = dict(input_ids=torch.randint(3, 40, (4, 6), generator=g), labels=torch.randint(3, 40, (4, 5), generator=g))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch).loss.backward()
    reference(**batch).loss.backward()
    fc1, ref_fc1 = model.model.encoder.layers[0].fc1, reference.model.encoder.layers[0].fc1
    # Before step() the managed layers hold their plain gradient (in bf16 precision here).
    torch.testing.assert_close(fc1.weight.grad, ref_fc1.weight.grad, rtol=0.1, atol=0.05 * float(ref_fc1.weight.grad.abs().max()))
    opt.step()
    assert opt.skipped_steps == 0
    state = opt.state[fc1.weight]
    assert all(state[k].dtype == torch.float32 and torch.isfinite(state[k]).all() for k in ("kfac_A", "kfac_G", "kfac_QA"))
