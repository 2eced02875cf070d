"""Self-tests of the float64 reference in tests/reference.py (no optimizer involved)."""

import pytest
import torch
from torch import nn

import reference as ref

KINDS = ["mlp", "mlp_nobias", "bart", "marian"]


def build(kind, seed=0):
    if kind == "mlp":
        return ref.tiny_mlp(bias=True, seed=seed)
    if kind == "mlp_nobias":
        return ref.tiny_mlp(bias=False, seed=seed)
    return ref.tiny_seq2seq(kind, seed=seed)


def make_batch(kind, seed=0, batch=None):
    if kind.startswith("mlp"):
        return ref.mlp_batch(batch or 6, seed)
    return ref.seq2seq_batch(batch or 4, seed)


def batch_loss(kind, model, batch):
    return ref.mlp_loss(model, batch) if kind.startswith("mlp") else ref.seq2seq_loss(model, batch)


def grad_kind(kind):
    return "mlp" if kind.startswith("mlp") else "seq2seq"


def all_param_names(model):
    return [name for name, p in model.named_parameters() if p.requires_grad]


def close(a, b, rtol=1e-10, scale=None):
    """max|a-b| <= rtol * max|b| (or rtol * scale: mathematically-zero gradients such as the
    k_proj bias of attention are pure rounding noise, so compare them on the model's scale)."""
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), 1e-300) if scale is None else scale
    return float((a - b).abs().max()) <= rtol * scale


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_grads_average_to_backward_gradient(kind):
    model = build(kind)
    batch = make_batch(kind)
    model.zero_grad()
    batch_loss(kind, model, batch).backward()
    names = all_param_names(model)  # every parameter, embeddings and LayerNorm included
    if grad_kind(kind) == "mlp":
        grads = ref.per_sample_grads(model, batch, ref.mlp_contribution(6), names, vectorize=True)
    else:
        grads = ref.per_sample_grads(
            model, ref.with_decoder_inputs(model, batch), ref.seq2seq_contribution(ref.n_label_tokens(batch)), names
        )
    params = dict(model.named_parameters())
    batch_size = ref._batch_size(batch)
    scale = max(float(p.grad.abs().max()) for p in params.values() if p.grad is not None)
    for name in names:
        assert grads[name].shape == (batch_size, *params[name].shape)
        assert grads[name].dtype == torch.float64
        assert close(grads[name].mean(0), params[name].grad, scale=scale), name
        # the per-sample gradients really differ from sample to sample
        if grads[name].abs().max() > 0 and name.endswith("fc1.weight"):
            assert not close(grads[name][0], grads[name][1], 1e-3)


def test_mlp_vmap_matches_loop():
    model = ref.tiny_mlp()
    batch = ref.mlp_batch(5)
    names = all_param_names(model)
    fast = ref.per_sample_grads(model, batch, ref.mlp_contribution(5), names, vectorize=True)
    slow = ref.per_sample_grads(model, batch, ref.mlp_contribution(5), names, vectorize=False)
    for name in names:
        assert close(fast[name], slow[name])


def test_mlp_per_sample_is_single_sample_gradient():
    """For a mean-over-samples loss, g_n is sample n's own loss gradient."""
    model = ref.tiny_mlp()
    batch = ref.mlp_batch(4)
    names = all_param_names(model)
    grads = ref.per_sample_grads(model, batch, ref.mlp_contribution(4), names, vectorize=True)
    for n in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(batch["x"][n : n + 1]), batch["y"][n : n + 1]).backward()
        for name, p in model.named_parameters():
            assert close(grads[name][n], p.grad)


@pytest.mark.parametrize("kind", ["bart", "marian"])
def test_seq2seq_batch_is_padded_and_loss_is_token_mean(kind):
    model = build(kind)
    batch = make_batch(kind)
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).any()
    assert len({int(v) for v in batch["attention_mask"].sum(1)}) > 1
    assert len({int(v) for v in (batch["labels"] != -100).sum(1)}) > 1
    # model(**batch).loss is the mean token CE over labels != -100, with the decoder inputs we build
    out = model(**ref.with_decoder_inputs(model, batch))
    ce = nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), batch["labels"].reshape(-1),
                                     reduction="sum")
    assert close(ref.seq2seq_loss(model, batch), ce / ref.n_label_tokens(batch), 1e-12)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.training


@pytest.mark.parametrize("kind", ["bart", "marian"])
def test_seq2seq_sample_alone_equals_sample_in_batch(kind):
    """Running sample n on its own row gives its share of the batch gradient (padding is inert)."""
    model = build(kind)
    batch = make_batch(kind)
    full = ref.with_decoder_inputs(model, batch)
    n_tokens = ref.n_label_tokens(batch)
    names = ["model.encoder.layers.0.fc1.weight", "model.decoder.layers.1.encoder_attn.k_proj.weight"]
    grads = ref.per_sample_grads(model, full, ref.seq2seq_contribution(n_tokens), names)
    for n in range(2):
        model.zero_grad()
        out = model(**{k: v for k, v in full.items() if k != "labels"})
        ce = nn.functional.cross_entropy(out.logits[n], batch["labels"][n], reduction="sum")
        (ce / n_tokens * ref._batch_size(batch)).backward()
        params = dict(model.named_parameters())
        for name in names:
            assert close(grads[name][n], params[name].grad, 1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_accumulated_per_sample_grads_average_to_full_objective(kind):
    """Two halves, each loss scaled by 1/2: g_n = B_total · contribution_n averages to ∂(L1+L2)/2."""
    model = build(kind)
    halves = [make_batch(kind, seed=s, batch=3) for s in (1, 2)]
    model.zero_grad()
    for half in halves:
        (batch_loss(kind, model, half) / 2).backward()
    names = ref.layer_param_names(model, ref.linear_layer_names(model))
    collected = {name: [] for name in names}
    for half in halves:
        grads = ref.reference_grads(grad_kind(kind), model, half, ref.linear_layer_names(model), multiplier=6,
                                    loss_scale=0.5)
        for name in names:
            collected[name].append(grads[name])
    params = dict(model.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in params.values() if p.grad is not None)
    for name in names:
        assert close(torch.cat(collected[name]).mean(0), params[name].grad, scale=scale), name


def random_layer_grads(batch=5, out=4, inp=3, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(batch, out, inp, generator=g, dtype=torch.float64)
    return (weight, torch.randn(batch, out, generator=g, dtype=torch.float64) if bias else None)


@pytest.mark.parametrize("mode, damping", [("fixed", 1e-3), ("fixed", 0.5), ("relative", 1e-2), ("relative", 1.0)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_solution_satisfies_damped_fisher_equation(mode, damping, bias):
    per_sample = random_layer_grads(bias=bias)
    d_weight, d_bias = ref.dense_natural_gradient(per_sample, damping, mode, bias=bias)
    assert d_weight.shape == (4, 3) and (d_bias is None) == (not bias)
    rows = torch.cat([per_sample[0].reshape(5, -1)] + ([per_sample[1]] if bias else []), dim=1)
    fisher = rows.T @ rows / 5
    lam = damping if mode == "fixed" else damping * torch.linalg.matrix_norm(rows @ rows.T) / 5
    d = torch.cat([d_weight.reshape(-1)] + ([d_bias] if bias else []))
    residual = (fisher + lam * torch.eye(rows.shape[1], dtype=torch.float64)) @ d - rows.mean(0)
    assert float(residual.abs().max()) < 1e-10 * float(rows.mean(0).abs().max())


@pytest.mark.parametrize("mode, damping", [("fixed", 1e-3), ("fixed", 0.5), ("relative", 1e-2), ("relative", 1.0)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 4, 3), (12, 2, 2)])  # B < p and B > p
def test_smw_form_matches_dense_solve(mode, damping, bias, shape):
    batch, out, inp = shape
    per_sample = random_layer_grads(batch, out, inp, bias=bias, seed=3)
    dense = ref.dense_natural_gradient(per_sample, damping, mode, bias=bias)
    beta = ref.smw_coefficients(per_sample, damping, mode, bias=bias)
    smw = ref.apply_coefficients(per_sample, beta, bias=bias)
    assert close(smw[0], dense[0], 1e-9)
    if bias:
        assert close(smw[1], dense[1], 1e-9)
    # β weights the per-sample gradients; with huge damping it tends to 1/(λB) · 1 and d to ḡ/λ
    big = 1e8
    d_big = ref.dense_natural_gradient(per_sample, big, "fixed", bias=bias)
    assert close(d_big[0] * big, per_sample[0].mean(0), 1e-6)


def test_relative_damping_value():
    per_sample = random_layer_grads()
    rows = torch.cat([per_sample[0].reshape(5, -1), per_sample[1]], dim=1)
    gram = rows @ rows.T
    assert abs(ref.damping_value(per_sample, 0.1, "relative") - 0.1 * float(torch.linalg.matrix_norm(gram)) / 5) < 1e-12
    # scale invariance of relative damping: d(c·g) = d(g)/c
    d1 = ref.dense_natural_gradient(per_sample, 0.1, "relative")
    d3 = ref.dense_natural_gradient((3 * per_sample[0], 3 * per_sample[1]), 0.1, "relative")
    assert close(d3[0] * 3, d1[0], 1e-9)
