"""The Monte-Carlo Fisher (``fisher="monte_carlo"``): exact against a dense float64 reference built from the
per-sample gradients of the sampled labels, and loud wherever it cannot run.

The reference: ``F̂ = (1/B) Σ_n ĝ_n ĝ_nᵀ`` from the ``torch.func`` per-sample gradients of the labels the optimizer
drew, ``ḡ`` the mean of the data's, ``d = (F̂ + λI)⁻¹ ḡ`` solved densely; the optimizer moves each layer by
``-lr·d`` (momentum 0, the paper's step, no trust region).
"""

import pytest
import torch
from torch import nn

import reference as ref
from fngd_hf import CWNGD, FNGD
from fngd_hf import functional as F
from fngd_hf.integrations.arguments import FNGDTrainingArguments
from fngd_hf.sampled_fisher import sample_labels, sampled_label_loss
from test_exactness import (
    assert_moves, builder, damping_of, has_bias, is_mlp, make_batch, make_fngd, snapshot, block,
)


def forward(kind, model, batch):
    """``(loss, logits, labels)`` as training computes them."""
    if is_mlp(kind):
        logits = model(batch["x"])
        return nn.functional.cross_entropy(logits, batch["y"]), logits, batch["y"]
    out = model(**batch)
    return out.loss, out.logits, batch["labels"]


def sampled_grads(kind, ref_model, batch, sampled, layers):
    """Per-sample gradients of the sampled labels, on the data's inputs (teacher forcing keeps the data's
    decoder inputs: only the targets are the model's)."""
    names = ref.layer_param_names(ref_model, layers)
    if is_mlp(kind):
        return ref.per_sample_grads(ref_model, {**batch, "y": sampled}, ref.mlp_contribution(len(sampled)), names,
                                    vectorize=True)
    inputs = {**ref.with_decoder_inputs(ref_model, batch), "labels": sampled}
    return ref.per_sample_grads(ref_model, inputs, ref.seq2seq_contribution(ref.n_label_tokens(batch)), names)


def dense_monte_carlo(kind, ref_model, batch, sampled, opt, mode):
    layers = list(opt.managed_modules)
    data = ref.reference_grads("mlp" if is_mlp(kind) else "seq2seq", ref_model, batch, layers)
    model_samples = sampled_grads(kind, ref_model, batch, sampled, layers)
    out = {}
    for name, module in opt.managed_modules.items():
        bias = has_bias(module)
        out[name] = block(*ref.dense_natural_gradient(
            ref.layer_per_sample(data, name, bias), damping_of(kind, mode), mode, bias=bias,
            fisher_samples=ref.layer_per_sample(model_samples, name, bias)))
    return out, data


@pytest.mark.parametrize("mode", ["fixed", "relative"])
@pytest.mark.parametrize("kind, solve_check", [("mlp", "per_layer"), ("mlp_nobias", "per_layer"), ("bart", "per_layer"),
                                               ("t5", "per_layer"), ("mlp", "per_step"), ("bart", "per_step")])
def test_one_step_moves_by_the_dense_monte_carlo_natural_gradient(kind, solve_check, mode):
    """Both solve checks: per layer (CPUs' default) and once per step (GPUs' default, no host sync)."""
    build = builder(kind)
    model = build()
    reference_model = ref.clone_model(model, build)
    opt = make_fngd(kind, model, mode, fisher="monte_carlo", solve_check=solve_check)
    batch = make_batch(kind, seed=1)
    before = snapshot(opt)
    loss, logits, labels = forward(kind, model, batch)
    sampled = opt.sampled_fisher_backward(logits, labels, generator=torch.Generator().manual_seed(3))
    assert all(p.grad is None for p in model.parameters())  # the sampled backward leaves .grad alone
    if not is_mlp(kind):
        assert torch.equal(sampled == -100, labels == -100)  # padding stays out of the sampled loss
    loss.backward()
    opt.step()
    expected, data = dense_monte_carlo(kind, reference_model, batch, sampled, opt, mode)
    # The test can fail: the empirical Fisher's direction differs from the Monte-Carlo one.
    name = max(expected, key=lambda n: float(expected[n].norm()))
    module = opt.managed_modules[name]
    empirical = block(*ref.dense_natural_gradient(ref.layer_per_sample(data, name, has_bias(module)),
                                                  damping_of(kind, mode), mode, bias=has_bias(module)))
    assert float(torch.nn.functional.cosine_similarity(empirical, expected[name], dim=0)) < 0.999
    assert_moves(opt, before, expected)


def test_pure_direction_matches_the_woodbury_identity():
    """``sampled_fisher_direction`` alone, on token batches with a transposed (Conv1D) layout."""
    g = torch.Generator().manual_seed(0)
    batch, length, i, o, lam = 4, 3, 5, 6, 0.2
    x = torch.randn(batch, length, i, generator=g, dtype=torch.float64)
    delta = torch.randn(batch, length, o, generator=g, dtype=torch.float64) / batch
    sampled = torch.randn(batch, length, o, generator=g, dtype=torch.float64) / batch
    x_hat = torch.cat([x, torch.ones(batch, length, 1, dtype=x.dtype)], -1)
    jac = torch.stack([(batch * sampled[n].T @ x_hat[n]).reshape(-1) for n in range(batch)], 1)
    mean_grad = sum(delta[n].T @ x_hat[n] for n in range(batch)).reshape(-1)
    expected = torch.linalg.solve(jac @ jac.T / batch + lam * torch.eye(len(mean_grad), dtype=x.dtype), mean_grad)
    gram = F.gram_matrix(x, sampled, True, float(batch), "per_sample")
    plain = F.plain_gradient(x, delta, True, transposed=True)
    products = F.sampled_gradient_products(x, sampled, plain, float(batch), transposed=True)
    alpha, damping_b = F.solve_coefficients(gram, torch.tensor(lam * batch, dtype=x.dtype), rhs=products)
    d_weight, d_bias = F.sampled_fisher_direction(x, plain, sampled, alpha, damping_b, transposed=True)
    got = torch.cat([d_weight.T, d_bias[:, None]], 1).reshape(-1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_sampled_labels_follow_the_model_and_keep_ignored_positions():
    logits = torch.full((2, 3, 5), -30.0)
    logits[..., 4] = 30.0  # the model is sure of class 4 everywhere
    labels = torch.tensor([[1, 2, -100], [0, -100, -100]])
    sampled = sample_labels(logits, labels)
    assert torch.equal(sampled, torch.tensor([[4, 4, -100], [4, -100, -100]]))
    uniform = sample_labels(torch.zeros(4000, 4), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(uniform, minlength=4).float() / 4000
    assert torch.all((counts - 0.25).abs() < 0.03), counts  # drawn, not argmax
    with pytest.raises(ValueError, match="do not match"):
        sample_labels(logits, labels[:, :2])
    loss = sampled_label_loss(logits.requires_grad_(), sampled)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)  # sure and right: ignored positions add nothing


def test_settings_that_cannot_work_are_refused(mlp_factory):
    with pytest.raises(ValueError, match="share_coefficients=False"):
        FNGD(mlp_factory(), fisher="monte_carlo", steps_per_epoch=3)
    with pytest.raises(ValueError, match="batch_layers"):
        FNGD(mlp_factory(), fisher="monte_carlo", share_coefficients=False, batch_layers=True)
    with pytest.raises(ValueError, match="CWNGD"):
        CWNGD(mlp_factory(), fisher="monte_carlo", share_coefficients=False)
    with pytest.raises(ValueError, match="fisher"):
        FNGD(mlp_factory(), fisher="true")
    empirical = FNGD(mlp_factory(), share_coefficients=False)
    with pytest.raises(ValueError, match="monte_carlo"):
        empirical.sampled_fisher_backward(torch.zeros(2, 3, requires_grad=True))
    accumulating = FNGD(mlp_factory(), fisher="monte_carlo", share_coefficients=False, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient accumulation"):
        accumulating.sampled_fisher_backward(torch.zeros(2, 3, requires_grad=True))
    with pytest.raises(ValueError, match="share_coefficients=False"):
        FNGDTrainingArguments(output_dir="unused", optimizer="fngd", fngd_fisher="monte_carlo")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        FNGDTrainingArguments(output_dir="unused", optimizer="ngd", fngd_fisher="monte_carlo",
                              gradient_accumulation_steps=2)


def test_a_backward_without_the_sampled_one_raises_and_changes_nothing(mlp_factory):
    """A stock Trainer never calls sampled_fisher_backward: its backward must fail loudly, not fall back to the
    empirical Fisher."""
    model = mlp_factory()
    opt = FNGD(model, fisher="monte_carlo", share_coefficients=False)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="sampled_fisher_backward"):
        nn.functional.cross_entropy(model(x), y).backward()
    assert all(layer.micro_batches == 0 for layer in opt._layers)  # nothing counted as a micro-batch
    opt.zero_grad()  # the AdamW part's gradients of the failed backward
    # and a second step is not fed the first one's sampled gradients
    logits = model(x)
    opt.sampled_fisher_backward(logits, y)
    nn.functional.cross_entropy(logits, y).backward()
    opt.step()
    opt.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(RuntimeError, match="sampled_fisher_backward"):
        nn.functional.cross_entropy(model(x), y).backward()


def test_fngd_trainer_draws_labels_every_step_and_trains(tmp_path, copy_task, bart_factory, monkeypatch):
    """Through FNGDTrainer with a label smoother (which pops the labels before the model runs): one sampled
    backward per step, and the loss falls."""
    from fngd_hf import FNGDTrainer

    calls = []
    original = FNGD.sampled_fisher_backward

    def spy(self, logits, labels=None, *args, **kwargs):
        calls.append(labels is not None and bool((labels != -100).any()))
        return original(self, logits, labels, *args, **kwargs)

    monkeypatch.setattr(FNGD, "sampled_fisher_backward", spy)
    args = FNGDTrainingArguments(
        output_dir=str(tmp_path / "out"), optimizer="ngd", fngd_fisher="monte_carlo", learning_rate=2e-2,
        per_device_train_batch_size=8, num_train_epochs=6, label_smoothing_factor=0.1, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
    )
    trainer = FNGDTrainer(model=bart_factory(d_model=32), args=args, train_dataset=copy_task(32))
    trainer.train()
    assert trainer.fngd_optimizer.fisher == "monte_carlo" and not trainer.fngd_optimizer.share_coefficients
    assert len(calls) == trainer.state.global_step == 24 and all(calls)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses  # from ln(40) = 3.69 at the start


def test_a_stock_trainer_with_the_monte_carlo_fisher_fails_loudly(tmp_path, copy_task, bart_factory, seq2seq_args):
    from transformers import Seq2SeqTrainer

    model = bart_factory(d_model=32)
    opt = FNGD(model, fisher="monte_carlo", share_coefficients=False)
    trainer = Seq2SeqTrainer(model=model, args=seq2seq_args(max_steps=2, per_device_train_batch_size=8),
                             train_dataset=copy_task(16), optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="FNGDTrainer"):
        trainer.train()


def test_a_checkpoint_says_which_fisher_it_was_written_with(mlp_factory):
    model = mlp_factory()
    opt = FNGD(model, fisher="monte_carlo", share_coefficients=False)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    logits = model(x)
    opt.sampled_fisher_backward(logits, y)
    nn.functional.cross_entropy(logits, y).backward()
    opt.step()
    state = opt.state_dict()
    FNGD(mlp_factory(), fisher="monte_carlo", share_coefficients=False).load_state_dict(state)  # same: silent
    with pytest.warns(RuntimeWarning, match="fisher='monte_carlo'"):
        FNGD(mlp_factory(), share_coefficients=False).load_state_dict(state)
