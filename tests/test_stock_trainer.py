"""FNGD handed to a *stock* Trainer / Seq2SeqTrainer with stock arguments: correct, or a loud error.

The mission's promise is "change one line": ``Seq2SeqTrainer(..., optimizers=(FNGD(model), None))`` with the
stock ``Seq2SeqTrainingArguments`` (``max_grad_norm=1.0``, no epoch length given, any dtype), or
``Trainer(optimizer_cls_and_kwargs=(FNGD.factory, kwargs))``. Each test compares with a reference loop
written here, not with the stock loss scale.
"""

import math
import warnings

import pytest
import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from fngd_hf import FNGD
from fngd_hf.integrations.trainer import unwrap_fngd

import tiny_models

VOCAB = 40


class CopyTask(torch.utils.data.Dataset):
    """Fixed-length copy task (no padding: the default collator stacks it)."""

    def __init__(self, n, length=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(3, VOCAB, (n, length), generator=g)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        x = self.rows[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    def batch(self):
        return {"input_ids": self.rows, "attention_mask": torch.ones_like(self.rows), "labels": self.rows.clone()}


def stock_args(tmp_path, cls=Seq2SeqTrainingArguments, **kwargs):
    """The stock arguments, only what a test needs changed (no tqdm, no report, no checkpoints)."""
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True,
                save_strategy="no", logging_steps=1, seed=0)
    base.update(kwargs)
    return cls(**base)


def managed_ids(opt):
    return {id(p) for g in opt.param_groups if g["fngd"] for p in g["params"]}


# ------------------------------------------------------------------------------------ clipping
def test_stock_max_grad_norm_clips_the_adamw_part_and_leaves_the_natural_gradient(tmp_path, caplog):
    """The stock Trainer clips every .grad at max_grad_norm. FNGD's layers hold a tagged direction, so the
    clip and the logged grad_norm see the AdamW part's gradients; FNGD undoes the clip for its own layers.
    Reference: a plain loop that clips only the AdamW part's gradients and steps FNGD unclipped."""
    clip, lr = 1e-3, 1e-2  # a clip that binds, so the test can fail
    data = CopyTask(16)
    model, reference = tiny_models.tiny_bart(vocab_size=VOCAB), tiny_models.tiny_bart(vocab_size=VOCAB)
    # The trust-region step: Muon's step runs Newton-Schulz in bf16, where the clip's scale-and-undo (exact
    # to float32 rounding) can flip roundings and move the result by more than this comparison allows.
    opt = FNGD(model, lr=lr, steps_per_epoch=1, step_length="trust_region")
    args = stock_args(tmp_path, max_steps=1, per_device_train_batch_size=16, max_grad_norm=clip,
                      lr_scheduler_type="constant")
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    with caplog.at_level("INFO", logger="fngd_hf.directions"):
        trainer.train()
    assert sum("undoes that scale" in r.message for r in caplog.records) == 1  # said once

    ref_opt = FNGD(reference, lr=lr, steps_per_epoch=1, step_length="trust_region")
    reference(**data.batch()).loss.backward()
    adamw_norm = float(torch.nn.utils.clip_grad_norm_(ref_opt.adamw_parameters(), clip))
    assert adamw_norm > 10 * clip
    ref_opt.step()

    record = next(r for r in trainer.state.log_history if "loss" in r)
    assert record["grad_norm"] == pytest.approx(adamw_norm, rel=1e-4)  # the AdamW part's, readable
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    # The FNGD layers really moved by the natural gradient's step, not by a clipped one.
    fc1 = dict(model.named_parameters())["model.encoder.layers.0.fc1.weight"]
    start = dict(tiny_models.tiny_bart(vocab_size=VOCAB).named_parameters())["model.encoder.layers.0.fc1.weight"]
    assert float((fc1.detach() - start.detach()).norm()) > 0.1 * lr * float(start.detach().norm())


def test_accelerate_clip_grad_norm_over_all_parameters_is_undone_for_fngd_layers(caplog):
    """A plain loop clipping model.parameters() (as an accelerate loop would): same step as no clip at all
    for the FNGD layers when the AdamW part is not clipped (its norm is below the bound)."""
    data = CopyTask(8)
    clipped, plain = tiny_models.tiny_bart(vocab_size=VOCAB), tiny_models.tiny_bart(vocab_size=VOCAB)
    opts = [FNGD(m, lr=1e-2, share_coefficients=False) for m in (clipped, plain)]
    for step in range(3):
        for model, opt in zip((clipped, plain), opts):
            model(**data.batch()).loss.backward()
            if model is clipped:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e3)
                assert float(norm) < 1e3  # the tagged directions do not count: no clip of the AdamW part
            opt.step()
            opt.zero_grad()
    for p, q in zip(clipped.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    # A clip that scales everything by 1/2 (a user's own rescale): FNGD's layers ignore it, AdamW's keep it.
    model, reference = tiny_models.tiny_bart(vocab_size=VOCAB), tiny_models.tiny_bart(vocab_size=VOCAB)
    opt, ref_opt = FNGD(model, lr=1e-2, share_coefficients=False), FNGD(reference, lr=1e-2, share_coefficients=False)
    model(**data.batch()).loss.backward()
    reference(**data.batch()).loss.backward()
    torch._foreach_mul_([p.grad for p in model.parameters()], 0.5)
    torch._foreach_mul_([p.grad for p in ref_opt.adamw_parameters()], 0.5)
    with caplog.at_level("INFO", logger="fngd_hf.directions"):
        opt.step()
    assert any("scaled by 0.5 " in r.message for r in caplog.records)
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------- accumulation
def test_stock_gradient_accumulation_is_refused_at_the_first_step_with_nothing_changed(tmp_path):
    model = tiny_models.tiny_bart(vocab_size=VOCAB)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = FNGD(model, steps_per_epoch=2)
    args = stock_args(tmp_path, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=CopyTask(16), optimizers=(opt, None))
    try:
        with pytest.raises(ValueError, match="gradient accumulation") as error:
            trainer.train()
    finally:  # the interrupted epoch leaves accelerate's dataloader registered as active: forget it
        from accelerate.state import GradientState

        GradientState._reset_state()
    assert "FNGDTrainer" in str(error.value) and "attach_accelerator" in str(error.value)
    assert opt.global_step == 0
    for name, p in model.named_parameters():
        assert torch.equal(p, start[name]), name


# -------------------------------------------------------------------------------- epoch length
def test_epoch_length_is_learnt_from_the_trainers_dataloader(tmp_path):
    """FNGD(model) without steps_per_epoch in a stock Trainer: the first epoch's end gives the length, and
    the run equals the one told steps_per_epoch=3 up front (sharing from epoch 2, bit for bit)."""
    runs = {}
    for told in (None, 3):
        model = tiny_models.tiny_bart(vocab_size=VOCAB)
        opt = FNGD(model, lr=1e-2, steps_per_epoch=told)
        args = stock_args(tmp_path, num_train_epochs=3, per_device_train_batch_size=4)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=CopyTask(12), optimizers=(opt, None))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        assert not [w for w in caught if "epoch length" in str(w.message)]
        runs[told] = (model, opt)
    (learnt, learnt_opt), (told, told_opt) = runs[None], runs[3]
    assert learnt_opt.steps_per_epoch == 3
    for p, q in zip(learnt.parameters(), told.parameters()):
        assert torch.equal(p, q)
    for m, n in zip(learnt_opt.managed_modules.values(), told_opt.managed_modules.values()):
        assert torch.equal(learnt_opt.state[m.weight]["coef_bank"], told_opt.state[n.weight]["coef_bank"])
    assert learnt_opt.diagnostics()["fngd/fresh_fraction"] < 1.0  # it did share


# ------------------------------------------------------------------------------------ factory
def test_factory_path_of_a_plain_trainer_builds_fngd_from_the_model(tmp_path):
    """Trainer(optimizer_cls_and_kwargs=(FNGD.factory, kwargs)): transformers 5 calls factory()(model, **kwargs);
    the run equals optimizers=(FNGD(model, **kwargs), None) bit for bit."""
    kwargs = {"lr": 1e-2, "steps_per_epoch": 2}
    results = []
    for path in ("factory", "instance"):
        model = tiny_models.tiny_bart(vocab_size=VOCAB)
        args = stock_args(tmp_path, cls=TrainingArguments, num_train_epochs=2, per_device_train_batch_size=4)
        extra = (dict(optimizer_cls_and_kwargs=(FNGD.factory, dict(kwargs))) if path == "factory"
                 else dict(optimizers=(FNGD(model, **kwargs), None)))
        trainer = Trainer(model=model, args=args, train_dataset=CopyTask(8), **extra)
        trainer.train()
        opt = unwrap_fngd(trainer.optimizer)
        assert isinstance(opt, FNGD) and opt.global_step == 4
        results.append(model)
    for p, q in zip(*(m.parameters() for m in results)):
        assert torch.equal(p, q)


# -------------------------------------------------------------------------------------- dtypes
def test_float32_model_under_a_float64_default_dtype():
    """Buffers follow the parameters' dtype and device, never torch's default dtype."""
    data = CopyTask(8)
    results = []
    for default in (torch.float32, torch.float64):
        model = tiny_models.tiny_bart(vocab_size=VOCAB)  # the same initial weights (drawn in float32)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            opt = FNGD(model, lr=1e-2, steps_per_epoch=2)
            for _ in range(4):  # two epochs: fresh, then shared
                model(**data.batch()).loss.backward()
                opt.step()
                opt.zero_grad()
            states = [s for s in opt.state.values() if "coef_bank" in s]
            assert states and all(s["coef_bank"].dtype == torch.float32 for s in states)
            results.append(model)
        finally:
            torch.set_default_dtype(previous)
    for p, q in zip(*(m.parameters() for m in results)):
        assert p.dtype == torch.float32
        # AdamW's step counter follows the default dtype, as torch.optim's does: bias corrections differ in rounding
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_float64_model_through_a_stock_trainer(tmp_path):
    model = tiny_models.tiny_bart(vocab_size=VOCAB).double()
    opt = FNGD(model, lr=5e-2, adamw_lr=1e-2)  # a quick task: rates that learn it in a few dozen steps
    args = stock_args(tmp_path, num_train_epochs=16, per_device_train_batch_size=8)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=CopyTask(16), optimizers=(opt, None))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < 0.9 * losses[0]
    assert opt.steps_per_epoch == 2  # learnt in the first epoch
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_bf16_autocast_through_a_stock_trainer(tmp_path):
    model = tiny_models.tiny_bart(vocab_size=VOCAB)
    opt = FNGD(model, lr=5e-2, adamw_lr=1e-2)
    args = stock_args(tmp_path, num_train_epochs=16, per_device_train_batch_size=8, bf16=True)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=CopyTask(16), optimizers=(opt, None))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.9 * losses[0]
    assert opt.skipped_steps == 0
    assert all(s["coef_bank"].dtype == torch.float32 for s in opt.state.values() if "coef_bank" in s)
