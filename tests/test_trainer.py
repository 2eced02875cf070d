"""FNGDTrainer / FNGDTrainingArguments: optimizer construction, accumulation, clipping, precision, resume, eval."""

import math
import warnings

import pytest
import torch
from transformers import (
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
)

import fngd_hf.functional as functional
from fngd_hf import FNGD
from fngd_hf.integrations import FNGDTrainer, FNGDTrainingArguments
from fngd_hf.integrations.trainer import unwrap_fngd

from fngd_hf.kfac import KFAC
from fngd_hf.sngd import SNGD
import tiny_models

VOCAB = 20


class CopyTask(torch.utils.data.Dataset):
    """Fixed-length copy task: no padding, so the default collator stacks it."""

    def __init__(self, n, length=6, seed=0, repeat=1):
        g = torch.Generator().manual_seed(seed)
        base = torch.randint(3, VOCAB, (n, length), generator=g)
        # repeat=2: every block of 4 rows appears twice in a row (see the accumulation tests)
        self.rows = base if repeat == 1 else base.view(-1, 4, length).repeat_interleave(repeat, dim=0).view(-1, length)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        x = self.rows[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def tiny_bart(seed=0):
    return tiny_models.tiny_bart(seed, vocab_size=VOCAB, d_model=32, ffn_dim=64, max_position_embeddings=16)


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def make_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
    )
    defaults.update(kwargs)
    return FNGDTrainingArguments(**defaults)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def losses(trainer):
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def relative_difference(a, b):
    """‖a - b‖ / ‖b‖ over all tensors of two name -> tensor dicts together."""
    diff = sum(float((a[n] - b[n]).pow(2).sum()) for n in a)
    return math.sqrt(diff / sum(float(b[n].pow(2).sum()) for n in b))


def moved(final, start):
    return {n: final[n] - start[n] for n in final}


# ----------------------------------------------------------------------------- arguments
def test_arguments_parse_from_the_command_line(tmp_path):
    parser = HfArgumentParser(FNGDTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--optimizer", "ngd", "--fngd_damping", "0.1",
            "--fngd_damping_mode", "fixed", "--fngd_trust_ratio", "none", "--fngd_target_modules", "q_proj",
            "fc1", "--fngd_stat_dtype", "float64", "--fngd_adamw_lr", "1e-3", "--fngd_share_coefficients", "false",
            "--fngd_scale_mode", "refreshed", "--fngd_batch_layers", "true", "--fngd_nesterov", "true", "--use_cpu",
        ]
    )
    assert args.optimizer == "ngd" and args.fngd_damping == 0.1 and args.fngd_damping_mode == "fixed"
    assert args.fngd_trust_ratio is None and args.fngd_target_modules == ["q_proj", "fc1"]
    assert args.fngd_dtype == torch.float64 and args.fngd_adamw_lr == 1e-3
    assert args.fngd_share_coefficients is False and args.fngd_scale_mode == "refreshed"
    assert args.fngd_batch_layers == "true" and args.fngd_nesterov is True
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fngd_trust_ratio", "0.05"])
    assert args.fngd_trust_ratio == 0.05 and args.optimizer == "fngd"
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert args.fngd_trust_ratio == "auto" and args.fngd_target_modules is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(optimizer="lion"), "optimizer"),
        (dict(fngd_damping=0.0), "fngd_damping"),
        (dict(fngd_damping_mode="adaptive"), "fngd_damping_mode"),
        (dict(fngd_damping_floor=-1.0), "fngd_damping_floor"),
        (dict(fngd_momentum=1.0), "fngd_momentum"),
        (dict(fngd_nesterov=True, fngd_momentum=0.0), "fngd_nesterov=True needs a momentum"),
        (dict(fngd_scale_mode="both"), "fngd_scale_mode"),
        (dict(fngd_trust_ratio=0.0), "fngd_trust_ratio"),
        (dict(fngd_trust_ratio="big"), "fngd_trust_ratio"),
        (dict(fngd_target_modules=[]), "fngd_target_modules"),
        (dict(fngd_stat_dtype="float16"), "fngd_stat_dtype"),
        (dict(fngd_batch_layers="yes"), "fngd_batch_layers"),
        (dict(fngd_adamw_lr=0.0), "fngd_adamw_lr"),
        (dict(fp16=True), "fp16"),
    ],
)
def test_invalid_arguments_raise(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        FNGDTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs)


def test_fp16_with_a_passed_fngd_is_a_clear_error(tmp_path):
    model = tiny_bart()
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    args.fp16 = True  # set after validation: CPU arguments refuse fp16 on some versions
    with pytest.raises(ValueError, match="fp16"):
        FNGDTrainer(model=model, args=args, optimizers=(FNGD(model, steps_per_epoch=1), None))


def test_fp16_from_the_accelerate_launcher_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch --mixed_precision fp16` sets
    with pytest.raises(ValueError, match="fp16"):
        make_args(tmp_path)


def test_grad_scaler_with_fngd_is_a_clear_error():
    model = tiny_bart()
    opt = FNGD(model, steps_per_epoch=4)
    scaler = torch.amp.GradScaler("cpu")
    batch = CopyTask(4)[0]
    scaler.scale(model(**{k: v[None] for k, v in batch.items()}).loss).backward()
    before = params_of(model)
    with pytest.raises(ValueError, match="GradScaler"):
        scaler.step(opt)
    after = params_of(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


# ------------------------------------------------------------------------- optimizer construction
def test_fngd_built_from_arguments(tmp_path):
    args = make_args(
        tmp_path, learning_rate=3e-3, weight_decay=0.01, fngd_damping=0.5, fngd_damping_mode="fixed",
        fngd_momentum=0.5, fngd_nesterov=True, fngd_adamw_lr=1e-3, fngd_stat_dtype="float64", max_grad_norm=2.0,
        fngd_trust_ratio="0.02", adam_beta1=0.8, gradient_accumulation_steps=2, fngd_step_length="trust_region",
    )
    trainer = FNGDTrainer(model=tiny_bart(), args=args, train_dataset=CopyTask(32))
    opt = trainer.create_optimizer()
    assert isinstance(opt, FNGD) and trainer.fngd_optimizer is opt
    fngd_group, adamw_group, exempt_group = opt.param_groups
    # As the stock Trainer: no weight decay on biases and LayerNorm (here: in the AdamW part).
    exempt = {id(p) for p in exempt_group["params"]}
    names = {n for n, p in trainer.model.named_parameters() if id(p) in exempt}
    assert names and all(n.endswith("bias") or "layernorm" in n or "layer_norm" in n for n in names)
    assert "model.encoder.layernorm_embedding.weight" in names and "model.shared.weight" not in names
    assert exempt_group["weight_decay"] == 0.0 and not exempt_group["fngd"] and exempt_group["lr"] == 1e-3
    assert fngd_group["fngd"] and fngd_group["lr"] == 3e-3 and fngd_group["damping"] == 0.5
    assert fngd_group["damping_mode"] == "fixed" and fngd_group["momentum"] == 0.5 and fngd_group["nesterov"] is True
    assert fngd_group["trust_ratio"] == 0.02 and fngd_group["weight_decay"] == 0.0
    assert not adamw_group["fngd"] and adamw_group["lr"] == 1e-3 and adamw_group["weight_decay"] == 0.01
    assert adamw_group["betas"] == (0.8, 0.999)
    assert opt.share_coefficients and opt.stat_dtype == torch.float64 and opt.clip_update_norm == 2.0
    assert opt.gradient_accumulation_steps == 2 and opt.step_length == "trust_region"
    assert trainer.loss_is_scaled_for_ga is False  # each micro-batch mean is divided by GA (see FNGDTrainer)
    names = set(opt.managed_modules)
    assert "model.encoder.layers.0.self_attn.q_proj" in names and "model.decoder.layers.0.fc2" in names
    assert "lm_head" not in names


def test_damping_left_unset_follows_the_step_length(tmp_path):
    """fngd_damping defaults to None in the arguments: the built FNGD takes γ = 10 with Muon's step and 0.1 with
    the trust region's (settings.DEFAULT_RELATIVE_DAMPING), and a given value wins over both."""
    def built_damping(**kwargs):
        trainer = FNGDTrainer(model=tiny_bart(), args=make_args(tmp_path, **kwargs), train_dataset=CopyTask(16))
        return trainer.create_optimizer().param_groups[0]["damping"]

    assert built_damping() == 10.0
    assert built_damping(fngd_step_length="trust_region") == 0.1
    assert built_damping(fngd_damping=0.3) == 0.3
    with pytest.raises(ValueError, match="fngd_damping"):
        make_args(tmp_path, fngd_damping=-1.0)


def test_default_step_length_and_its_momentum_settings_reach_fngd(tmp_path):
    args = make_args(tmp_path, fngd_normalize_directions=True, fngd_nesterov=True)
    opt = FNGDTrainer(model=tiny_bart(), args=args, train_dataset=CopyTask(32)).create_optimizer()
    assert opt.step_length == "muon" and opt.normalize_directions is True
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["trust_ratio"] is None


def test_ngd_sgd_and_adamw_choices(tmp_path):
    ngd = FNGDTrainer(model=tiny_bart(), args=make_args(tmp_path, optimizer="ngd", max_grad_norm=0.0))
    opt = ngd.create_optimizer()
    assert isinstance(opt, FNGD) and not opt.share_coefficients and opt.clip_update_norm is None
    sgd = FNGDTrainer(model=tiny_bart(), args=make_args(tmp_path, optimizer="sgd", weight_decay=0.1))
    opt = sgd.create_optimizer()
    assert type(opt) is torch.optim.SGD and all(g["momentum"] == 0.9 for g in opt.param_groups)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}
    adamw = FNGDTrainer(model=tiny_bart(), args=make_args(tmp_path, optimizer="adamw", optim="adamw_torch"))
    assert type(adamw.create_optimizer()) is torch.optim.AdamW and adamw.fngd_optimizer is None


def test_steps_per_epoch_counts_the_short_last_window(tmp_path):
    """18 samples, batch 4: 5 batches; GA 2: the Trainer makes 3 steps per epoch, the last with 1 micro-batch."""
    args = make_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2)
    trainer = FNGDTrainer(model=tiny_bart(), args=args, train_dataset=CopyTask(18))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no accumulation-count or bank-restart warning
        trainer.train()
    opt = trainer.fngd_optimizer
    assert opt.steps_per_epoch == 3 and opt.global_step == trainer.state.global_step == 6
    sizes = opt.state[trainer.model.model.encoder.layers[0].fc1.weight]["coef_size"]
    assert sizes.tolist() == [[4, 4], [4, 4], [2, 0]]  # the remainder step: one micro-batch of 2 samples
    fresh = [r["fngd/fresh_fraction"] for r in trainer.state.log_history if "fngd/fresh_fraction" in r]
    assert fresh[:3] == [1.0, 1.0, 1.0] and fresh[-1] == 0.0  # the remainder step reuses its own beta


def test_every_accumulated_micro_batch_is_shared_in_the_second_epoch(tmp_path):
    args = make_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2)
    trainer = FNGDTrainer(model=tiny_bart(), args=args, train_dataset=CopyTask(16))
    trainer.train()
    fresh = [r["fngd/fresh_fraction"] for r in trainer.state.log_history if "fngd/fresh_fraction" in r]
    assert fresh == [1.0, 1.0, 0.0, 0.0]


def test_sharing_by_sample_in_the_trainer_and_resume(tmp_path):
    """share_by='sample': the trainer passes content keys; from epoch 2 on no Gram matrix; resume is exact."""
    def run(output_dir, resume=None):
        args = make_args(
            tmp_path, output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2,
            num_train_epochs=3, save_strategy="steps", save_steps=3, logging_steps=1, fngd_share_by="sample",
        )
        trainer = FNGDTrainer(model=tiny_bart(seed=2), args=args, train_dataset=CopyTask(16))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    opt = full.fngd_optimizer
    assert opt.share_by == "sample" and len(opt._sample_index) == 16  # every training sample has its row
    fresh = [r["fngd/fresh_fraction"] for r in full.state.log_history if "fngd/fresh_fraction" in r]
    assert fresh == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # the shuffled later epochs reuse each sample's beta
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-3"))  # mid-epoch 2
    a, b = params_of(full.model), params_of(resumed.model)
    assert max(float((a[n] - b[n]).abs().max()) for n in a) < 1e-6


def test_sample_keys_ignore_padding_and_tell_samples_apart():
    from fngd_hf.sample_sharing import sample_keys

    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 0], [7, 6, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[9, 9, -100], [9, 9, -100], [9, 9, -100]])
    keys = sample_keys(ids, labels, masks=(mask, None))
    assert len(set(keys.tolist())) == 3  # same source tokens in another order or one more token: other keys
    shorter = sample_keys(ids[:, :4], labels[:, :2], masks=(mask[:, :4], None))  # the same pairs padded less
    assert torch.equal(shorter, keys)
    swapped = sample_keys(labels[:, :2].clamp(min=0), ids[:, :3])  # source and target do not commute
    assert not torch.equal(swapped[:1], sample_keys(ids[:, :3], labels[:, :2])[:1])
    with pytest.raises(ValueError, match="batch"):
        sample_keys(ids, labels[:2])


def test_global_norm_of_mixed_dtypes_equals_the_norm_of_everything():
    from fngd_hf.integrations.trainer import _global_norm

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g).bfloat16(), torch.randn(2, 2, generator=g).double()]
    expected = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors]))
    norm = _global_norm(tensors)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), expected, rtol=1e-2, atol=0)  # bf16 norms: about 3 digits


def test_diagnostics_are_logged(tmp_path):
    args = make_args(tmp_path, max_steps=4, logging_steps=2)
    trainer = FNGDTrainer(model=tiny_bart(), args=args, train_dataset=CopyTask(32))
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert len(records) == 2
    for record in records:
        for key in ("fngd/damping", "fngd/gram_norm", "fngd/fresh_fraction", "fngd/skipped_steps",
                    "fngd/direction_norm", "grad_norm"):
            assert math.isfinite(record[key]), key
        assert record["fngd/damping"] > 0 and record["fngd/skipped_steps"] == 0


# ----------------------------------------------------------------------- gradient accumulation
def accumulation_run(tmp_path, batch, accumulation, steps, dataset, **kwargs):
    args = make_args(
        tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=steps,
        train_sampling_strategy="sequential", lr_scheduler_type="constant", max_grad_norm=0.0,
        fngd_trust_ratio="none", fngd_stat_dtype="float64", **kwargs,
    )
    trainer = FNGDTrainer(model=tiny_bart(), args=args, train_dataset=dataset)
    trainer.train()
    return params_of(trainer.model)


@pytest.mark.parametrize(
    "settings",
    [
        # The trust region's step -lr*d keeps the exactness; Muon's bfloat16 Newton-Schulz does not (1e-2 apart).
        dict(fngd_damping_mode="fixed", fngd_damping=1e-3, learning_rate=1e-2, fngd_step_length="trust_region"),
        dict(fngd_damping_mode="relative", fngd_damping=1.0, learning_rate=1e-8, fngd_adamw_lr=1e-3, fngd_momentum=0.0),
    ],
)
def test_accumulation_of_duplicated_micro_batches_equals_one_batch(tmp_path, settings):
    """GA=2 x batch 4 of the same 4 samples == GA=1 x batch 8 holding them twice (one epoch: 4 steps).

    Exact in the maths: duplicating samples gives K = [[K0, K0], [K0, K0]], whose beta is (beta0/2, beta0/2),
    so d = J0 beta0, the natural gradient of either micro-batch. It only holds if every micro-batch loss is
    (its mean) / 2, which is what FNGDTrainer enforces; relative damping checks the scale (a wrong loss scale
    multiplies d by a constant), fixed damping the direction.
    """
    dataset = CopyTask(16, repeat=2)  # rows: s0..s3, s0..s3, s4..s7, s4..s7, ...
    one = accumulation_run(tmp_path / "one", 8, 1, 4, dataset, **settings)
    two = accumulation_run(tmp_path / "two", 4, 2, 4, dataset, **settings)
    start = params_of(tiny_bart())
    assert relative_difference(one, start) > 1e-3  # they moved
    assert relative_difference(moved(two, start), moved(one, start)) < 1e-4


def test_accumulation_matches_one_batch_only_under_large_damping(tmp_path):
    """Without duplicates GA averages two 4-sample natural gradients, GA=1 takes one 8-sample natural gradient:
    (1/2)(Σ_m (F_m + λI)⁻¹ ḡ_m) vs (F + λI)⁻¹ ḡ. They agree to O(‖K‖/λB) when the damping dominates
    (both are ḡ/λ), and differ otherwise."""
    dataset = CopyTask(16)
    fngd_layers = lambda p: {n: v for n, v in p.items() if "proj" in n or "fc" in n}  # noqa: E731
    start = fngd_layers(params_of(tiny_bart()))
    deltas = {}
    for damping, lr in ((1e3, 1e2), (1e-4, 1e-4)):
        for batch, accumulation in ((8, 1), (4, 2)):
            final = accumulation_run(
                tmp_path / f"{damping}-{batch}", batch, accumulation, 1, dataset, fngd_damping_mode="fixed",
                fngd_damping=damping, learning_rate=lr, fngd_momentum=0.0,
                fngd_step_length="trust_region",  # the directions themselves: Muon's step orthogonalises in bf16
            )
            deltas[damping, batch] = moved(fngd_layers(final), start)
    assert relative_difference(deltas[1e3, 4], deltas[1e3, 8]) < 1e-4
    assert relative_difference(deltas[1e-4, 4], deltas[1e-4, 8]) > 1e-2


# --------------------------------------------------------------------------------- clipping
class RecordNorms(TrainerCallback):
    """On the pre-optimizer-step event (after the Trainer clipped), record the .grad norms of both parts."""

    def __init__(self):
        self.records = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_fngd(optimizer)
        norm = lambda ps: float(torch.stack([opt.direction(p).norm() for p in ps if p.grad is not None]).norm())  # noqa: E731
        fngd = [p for g in opt.param_groups if g["fngd"] for p in g["params"]]
        plain = [p for g in opt.param_groups if not g["fngd"] for p in g["params"]]
        self.records.append((norm(fngd), norm(plain)))


def test_max_grad_norm_clips_the_applied_fngd_update_and_the_adamw_gradients(tmp_path):
    clip, lr = 1e-3, 1e-2
    args = make_args(tmp_path, max_steps=1, max_grad_norm=clip, learning_rate=lr, fngd_momentum=0.0,
                     fngd_trust_ratio="none", lr_scheduler_type="constant")
    model = tiny_bart()
    recorder = RecordNorms()
    trainer = FNGDTrainer(model=model, args=args, train_dataset=CopyTask(16), callbacks=[recorder])
    start = params_of(model)
    trainer.train()
    opt = trainer.fngd_optimizer
    assert opt.clip_update_norm == clip
    ((fngd_norm, plain_norm),) = recorder.records
    assert plain_norm <= clip * 1.001  # the Trainer clipped the AdamW part ...
    assert lr * fngd_norm > 10 * clip  # ... and left the FNGD direction to the optimizer
    record = next(r for r in trainer.state.log_history if "loss" in r)
    assert record["fngd/direction_norm"] == pytest.approx(fngd_norm, rel=1e-5)
    assert record["grad_norm"] > clip  # the pre-clip norm of the ordinary gradients
    fngd_ids = {id(p) for g in opt.param_groups if g["fngd"] for p in g["params"]}
    moved = [p.detach() - start[n] for n, p in model.named_parameters() if id(p) in fngd_ids]
    update_norm = float(torch.stack([m.norm() for m in moved]).norm())
    assert update_norm == pytest.approx(clip, rel=1e-4)  # the applied update lr·d is what is clipped


@pytest.mark.parametrize("share_by", ["position", "sample"])
def test_batched_first_epoch_trains_exactly_like_the_per_layer_one(tmp_path, share_by, monkeypatch):
    """fngd_batch_layers=true (the GPU default, forced here on the CPU) gives the same training as false:
    gradient accumulation, sharing, the trust region, the logged direction norm."""
    batched = []
    original = FNGD._batched_layer_gradients
    monkeypatch.setattr(FNGD, "_batched_layer_gradients", lambda self, e, *a: (batched.append(len(e)), original(self, e, *a))[1])
    runs = {}
    for flag in ("false", "true"):
        args = make_args(tmp_path / flag, max_steps=12, gradient_accumulation_steps=2, fngd_share_by=share_by,
                         lr_scheduler_type="constant", fngd_batch_layers=flag)
        trainer = FNGDTrainer(model=tiny_bart().double(), args=args, train_dataset=CopyTask(48))
        trainer.train()
        assert trainer.fngd_optimizer.batch_layers is (flag == "true")
        norms = [r["fngd/direction_norm"] for r in trainer.state.log_history if "fngd/direction_norm" in r]
        runs[flag] = params_of(trainer.model), losses(trainer), norms
    # The first epoch only: 3 steps of 2 micro-batches, 16 managed layers (encoder 6, decoder 10).
    assert sum(batched) == 3 * 2 * 16
    assert relative_difference(runs["true"][0], runs["false"][0]) < 1e-12
    assert runs["true"][1] == pytest.approx(runs["false"][1], rel=1e-12)
    assert runs["true"][2] == pytest.approx(runs["false"][2], rel=1e-9)


# ------------------------------------------------------------------------------- precision
def test_bf16_autocast_on_cpu_trains(tmp_path, monkeypatch):
    args = make_args(tmp_path, bf16=True, max_steps=24, logging_steps=4, lr_scheduler_type="constant")
    model = tiny_bart()
    dtypes = set()
    model.model.encoder.layers[0].fc1.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    trainer = FNGDTrainer(model=model, args=args, train_dataset=CopyTask(64))
    gram_dtypes = set()
    original_gram = functional.gram_matrix

    def gram_matrix(x, delta, *rest, **kwargs):
        gram_dtypes.update((x.dtype, delta.dtype))
        return original_gram(x, delta, *rest, **kwargs)

    monkeypatch.setattr(functional, "gram_matrix", gram_matrix)
    trainer.train()
    assert dtypes == {torch.bfloat16}  # autocast really ran the Linear layers in bf16
    opt = trainer.fngd_optimizer
    assert opt.stat_dtype is None and gram_dtypes == {torch.float32}  # "auto": float32 statistics
    assert opt.skipped_steps == 0
    values = losses(trainer)
    assert all(math.isfinite(v) for v in values)
    assert values[-1] < values[0] - 0.1
    bank = opt.state[trainer.model.model.encoder.layers[0].fc1.weight]["coef_bank"]
    assert bank.dtype == torch.float32


# ---------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("checkpoint_step", [4, 6])  # epoch boundary, and mid-way through the shared epoch
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, checkpoint_step):
    def run(output_dir, resume=None):
        args = make_args(
            tmp_path, output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            num_train_epochs=2, save_strategy="steps", save_steps=2, logging_steps=2,
        )
        trainer = FNGDTrainer(model=tiny_bart(seed=1), args=args, train_dataset=CopyTask(16))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    assert full.state.global_step == 8 and full.fngd_optimizer.steps_per_epoch == 4
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / f"checkpoint-{checkpoint_step}"))
    opt = resumed.fngd_optimizer
    bank = opt.state[resumed.model.model.encoder.layers[0].fc1.weight]["coef_bank"]
    assert opt.global_step == 8 and bank.shape[0] == 4
    a, b = params_of(full.model), params_of(resumed.model)
    assert max(float((a[n] - b[n]).abs().max()) for n in a) < 1e-6


# ------------------------------------------------------------------------ eval and generate
def count_maths(monkeypatch):
    """Counts Gram matrices and weighted gradients (either entry: the shared phase's fast path
    calls ``apply_sample_weights`` directly)."""
    calls = {"gram": 0, "weighted": 0}

    def counting(key, original):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(functional, "gram_matrix", counting("gram", functional.gram_matrix))
    for name in ("weighted_gradient", "apply_sample_weights"):
        monkeypatch.setattr(functional, name, counting("weighted", getattr(functional, name)))
    return calls


def test_evaluate_and_predict_with_generate_capture_nothing(tmp_path, monkeypatch):
    calls = count_maths(monkeypatch)
    args = make_args(tmp_path, max_steps=2, predict_with_generate=True, generation_max_length=8,
                     per_device_eval_batch_size=4)
    trainer = FNGDTrainer(model=tiny_bart(), args=args, train_dataset=CopyTask(16), eval_dataset=CopyTask(8, seed=1))
    trainer.train()
    assert calls["gram"] > 0 and calls["weighted"] > 0
    trainer.fngd_optimizer.diagnostics()  # reset
    calls.update(gram=0, weighted=0)
    metrics = trainer.evaluate()
    prediction = trainer.predict(CopyTask(8, seed=2))
    assert calls == {"gram": 0, "weighted": 0}
    assert math.isfinite(metrics["eval_loss"]) and prediction.predictions.shape[0] == 8
    assert math.isnan(trainer.fngd_optimizer.diagnostics()["fngd/fresh_fraction"])  # nothing computed
    trainer.train()  # capture comes back on for training (shared phase now: no Gram, only the weighted sum)
    assert calls["weighted"] > 0


# ------------------------------------------------------------- a plain Seq2SeqTrainer with FNGD
@pytest.mark.parametrize("model_fn", [tiny_bart, tiny_t5], ids=["bart", "t5"])
def test_plain_seq2seq_trainer_with_fngd(tmp_path, model_fn):
    model = model_fn()
    batches_per_epoch = 8
    optimizer = FNGD(model, lr=1e-2, steps_per_epoch=batches_per_epoch)
    if model_fn is tiny_t5:
        assert all(m.bias is None for m in optimizer.managed_modules.values())
        assert "lm_head" not in optimizer.managed_modules
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=32, logging_steps=4, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, max_grad_norm=0.0,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=CopyTask(64), optimizers=(optimizer, None))
    trainer.train()
    values = losses(trainer)
    assert all(math.isfinite(v) for v in values)
    assert values[-1] < values[0] - 0.1
    assert optimizer.global_step == 32 and optimizer.skipped_steps == 0
    assert optimizer.diagnostics()["fngd/fresh_fraction"] == pytest.approx(8 / 32)  # epochs 2-4 shared
    # The same run through FNGDTrainer (GA 1, no clipping) lands on the same parameters.
    twin = model_fn()
    twin_trainer = FNGDTrainer(model=twin, args=make_args(tmp_path / "twin", max_steps=32, max_grad_norm=0.0),
                               train_dataset=CopyTask(64), optimizers=(FNGD(twin, lr=1e-2, steps_per_epoch=8), None))
    twin_trainer.train()
    assert relative_difference(params_of(twin), params_of(model)) < 1e-6


def test_source_check_and_training_clock_are_logged(tmp_path):
    """The translation app's ShuffledSourceCheck callback logs once per evaluation; the clock leaves evaluations out."""
    from fngd_hf.translation.evaluation import ShuffledSourceCheck

    args = make_args(tmp_path, num_train_epochs=2, eval_strategy="epoch", per_device_eval_batch_size=8)
    trainer = FNGDTrainer(model=tiny_bart(), args=args, train_dataset=CopyTask(16), eval_dataset=CopyTask(8, seed=1),
                          callbacks=[ShuffledSourceCheck()])
    trainer.train()
    checks = [r for r in trainer.state.log_history if "eval_source_gap" in r]
    assert len(checks) == 2  # once per epoch
    for record in checks:
        assert record["eval_shuffled_source_loss"] == pytest.approx(record["eval_source_gap"] + next(
            r["eval_loss"] for r in trainer.state.log_history if r.get("epoch") == record["epoch"] and "eval_loss" in r
        ), rel=1e-4)
        assert record["eval_source_collapsed"] == float(record["eval_source_gap"] < 0.05)
    clock = [r["train_seconds"] for r in trainer.state.log_history if "loss" in r]
    assert clock == sorted(clock) and clock[0] >= 0.0


def test_evaluation_time_is_kept_out_of_the_training_clock(tmp_path):
    """Time spent in evaluate(), on_evaluate callbacks included, does not count as training time, and counts once
    with several eval datasets (Trainer.evaluate calls evaluate() again for each)."""
    import time

    class SlowCallback(TrainerCallback):
        calls = 0

        def on_evaluate(self, args, state, control, **kwargs):
            SlowCallback.calls += 1
            time.sleep(0.5)

    args = make_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=8)
    evals = {"a": CopyTask(8, seed=1), "b": CopyTask(8, seed=2)}
    trainer = FNGDTrainer(model=tiny_bart(), args=args, train_dataset=CopyTask(16), eval_dataset=evals,
                          callbacks=[SlowCallback()])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    assert SlowCallback.calls == 4  # 2 evaluations x 2 datasets: 2 s asleep
    final = trainer.state.log_history[-1]
    assert "train_loss" in final and 0.0 < final["train_seconds"] <= wall - 2.0
    # One evaluate() of two datasets: its time once, not once more for each dataset.
    trainer._eval_seconds = 0.0
    start = time.perf_counter()
    trainer.evaluate()
    assert 1.0 <= trainer._eval_seconds <= time.perf_counter() - start


def test_source_check_flags_a_model_that_ignores_its_source(tmp_path, caplog):
    from fngd_hf.translation.evaluation import ShuffledSourceCheck

    model = tiny_bart()
    with torch.no_grad():  # a decoder that never attends to the encoder output ignores its source
        for layer in model.model.decoder.layers:
            layer.encoder_attn.v_proj.weight.zero_()
            layer.encoder_attn.v_proj.bias.zero_()
            layer.encoder_attn.out_proj.bias.zero_()
    args = make_args(tmp_path, per_device_eval_batch_size=8)
    trainer = FNGDTrainer(model=model, args=args, eval_dataset=CopyTask(8, seed=1), callbacks=[ShuffledSourceCheck()])
    with caplog.at_level("WARNING", logger="fngd_hf.translation.evaluation"):
        metrics = trainer.evaluate()
    assert metrics["eval_source_gap"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_source_collapsed"] == 1.0
    assert "the model ignores its source" in caplog.text  # the warning, as FNGDTrainer gave it before
    record = next(r for r in trainer.state.log_history if "eval_source_gap" in r)
    assert record["eval_source_collapsed"] == 1.0 and record["eval_source_gap"] == metrics["eval_source_gap"]


@pytest.mark.parametrize(
    "name, optim_args, expected",
    [("cwngd", None, "CWNGD"), ("kfac", "damping=0.1,inverse_update_freq=2", "KFAC"), ("sngd", "rank=8", "SNGD"),
     ("shampoo", None, "ShampooAdamW")],
)
def test_trainer_builds_every_peer_method(tmp_path, name, optim_args, expected):
    if name == "shampoo":
        pytest.importorskip("pytorch_optimizer")
    rate = 1e-2 if name == "shampoo" else 0.05
    # The AdamW part at the same rate and the batch-64 trust region: a quick toy, not the defaults' test.
    args = make_args(tmp_path, optimizer=name, optim_args=optim_args, num_train_epochs=3, learning_rate=rate,
                     fngd_adamw_lr=rate, fngd_trust_ratio=1.0 if name == "cwngd" else "auto",
                     fngd_step_length="trust_region")
    trainer = FNGDTrainer(model=tiny_bart(), args=args, train_dataset=CopyTask(32))
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == expected
    history = losses(trainer)
    assert history[-1] < history[0] - 0.2


def test_optim_args_parsing():
    from fngd_hf.integrations.arguments import parse_optim_args

    assert parse_optim_args("damping=1e-3, inverse_method=eigen,rank=8") == {
        "damping": 1e-3, "inverse_method": "eigen", "rank": 8}
    assert parse_optim_args(None) == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_optim_args("damping")


@pytest.mark.parametrize("name", ["kfac", "sngd"])
def test_a_given_trust_ratio_reaches_kfac_and_sngd(tmp_path, name):
    """fngd_trust_ratio is not FNGD's alone: given, the peers get it; 'auto' leaves them their own default."""
    model = tiny_bart()
    trainer = FNGDTrainer(model=model, args=make_args(tmp_path, optimizer=name, fngd_trust_ratio="0.3"),
                          train_dataset=CopyTask(8))
    opt = unwrap_fngd(trainer.create_optimizer())
    assert [g["trust_ratio"] for g in opt.param_groups if g["fngd"]] == [0.3]
    default = FNGDTrainer(model=tiny_bart(), args=make_args(tmp_path, optimizer=name), train_dataset=CopyTask(8))
    reference = (KFAC if name == "kfac" else SNGD)(tiny_bart())
    assert ([g["trust_ratio"] for g in unwrap_fngd(default.create_optimizer()).param_groups if g["fngd"]]
            == [g["trust_ratio"] for g in reference.param_groups if g["fngd"]])
