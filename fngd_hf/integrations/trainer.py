"""Hugging Face ``Seq2SeqTrainer`` integration: :class:`FNGDTrainer` (its arguments: :mod:`.arguments`).

Usage::

    from fngd_hf import FNGDTrainer, FNGDTrainingArguments

    args = FNGDTrainingArguments(output_dir="out", optimizer="fngd", learning_rate=1e-2,
                                 per_device_train_batch_size=32, num_train_epochs=3)
    trainer = FNGDTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    trainer.train()

``FNGDTrainer`` builds :class:`~fngd_hf.FNGD` from the arguments (or uses the one passed in
``optimizers=(FNGD(...), None)``), tells it the epoch length and the accumulation count, scales
the loss the way FNGD's per-sample statistics assume, clips the FNGD update instead of its raw
gradient, logs the optimizer's diagnostics and keeps the per-rank coefficient banks in
checkpoints. With ``optimizer="adamw"`` or ``"sgd"`` it behaves like the stock ``Seq2SeqTrainer``.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from transformers import Seq2SeqTrainer
from transformers.trainer_utils import has_length

from .. import settings
from ..base import LayerwiseOptimizer
from ..cwngd import CWNGD
from ..directions import direction_tag
from ..fngd import FNGD
from ..kfac import KFAC
from ..sample_sharing import sample_keys
from .arguments import ARG_DEFAULTS, FNGD_FAMILY, FP16_MESSAGE, LAYERWISE, parse_optim_args
from .checkpointing import restore_on_load, save_rank_state

SGD_MOMENTUM = 0.9


def unwrap_fngd(optimizer) -> LayerwiseOptimizer | None:
    """The :class:`FNGD` inside ``optimizer`` (accelerate wraps it; ``.optimizer`` reaches in), else ``None``."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, LayerwiseOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


class FNGDTrainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` that trains with :class:`~fngd_hf.FNGD` (or AdamW/SGD baselines).

    What it changes when the optimizer is FNGD (built from :class:`FNGDTrainingArguments`, or
    passed as ``optimizers=(FNGD(model, ...), None)``); with AdamW/SGD nothing below applies:

    * **Epoch length and accumulation.** ``optimizer.steps_per_epoch`` is set to the Trainer's
      own count of optimizer steps per epoch, ``ceil(len(train_dataloader) / GA)`` (the last,
      shorter accumulation window of an epoch is one step; under DDP ``len`` is per rank).
      ``optimizer.gradient_accumulation_steps`` is set before every step to the number of
      micro-batches that step really has (``GA``, or the remainder at an epoch's end), so FNGD's
      per-sample scale ``B·M`` is exact for both damping modes.
    * **Loss scaling under gradient accumulation.** FNGD assumes the micro-batch losses sum to the
      mean loss of the accumulated batch. Trainer 5.x passes ``num_items_in_batch`` to any model
      whose ``forward`` takes ``**kwargs`` and then treats the loss as already normalised for
      accumulation, so it does *not* divide by GA; BART, Marian and T5 ignore ``num_items_in_batch``
      and return their micro-batch token mean, so the stock Trainer backpropagates ``M`` times the
      mean loss (with relative damping FNGD's step would then be ``M`` times too small; under DDP
      ``average_tokens_across_devices`` multiplies the loss by the world size as well). For FNGD
      this trainer therefore drops ``num_items_in_batch`` in training and sets
      ``loss_is_scaled_for_ga = False``: every micro-batch backpropagates
      ``(its mean loss) / (micro-batches in this step)``, whatever the model does with loss kwargs.
      A ``compute_loss_func`` is trusted to normalise by ``num_items_in_batch`` itself (the
      Trainer's contract), and is left alone.
    * **max_grad_norm.** The ``.grad`` of FNGD layers holds the natural-gradient direction ``d``,
      not a gradient (its norm is often 1e5 or more: relative damping scales it like ``1/‖g‖``), so
      clipping it with the gradients would be meaningless. ``max_grad_norm`` becomes FNGD's
      ``clip_update_norm`` when the trainer builds the optimizer: the global L2 norm of the
      *applied update* ``lr·(momentum buffer)`` over all FNGD layers is clipped at ``step()``
      (after the per-layer trust region; the buffer itself is not changed). The Trainer's own
      clipping (and the logged ``grad_norm``) covers only the ordinary gradients of the AdamW part
      (embeddings, LayerNorms, heads). ``"fngd/direction_norm"`` logs the norm of ``d`` as the
      backward wrote it.
    * **Precision.** bf16 autocast works; FNGD's statistics stay in ``fngd_stat_dtype`` (``auto``: float32,
      float64 for a float64 model). fp16
      (GradScaler) raises a ``ValueError`` at argument/trainer construction.
    * **Logging.** Each training log record gets ``optimizer.diagnostics()`` (means since the last
      log; entries that are NaN because nothing was computed, e.g. damping in the shared phase, are
      left out) and ``fngd/direction_norm``.
    * **Distributed.** Each rank computes ``β`` from its own micro-batch (per-sample scale from
      the local batch size) and writes its local ``d``; DDP averages ``d`` over ranks, so the step
      is the mean of the ranks' natural gradients, and trust region/clipping then see identical
      values on every rank. Each rank's coefficient bank differs, so checkpoints store every
      rank's bank (``fngd_coefficients_rank{r}.pt``) besides the Trainer's ``optimizer.pt``.
    * **Evaluation and generate().** The Trainer calls ``optimizer.eval()``; FNGD also captures
      nothing under ``no_grad`` or ``model.eval()``.

    FSDP and DeepSpeed are not supported with FNGD (they flatten or shard the Linear weights).
    """

    def __init__(self, *args, **kwargs):
        self._clock_start: float | None = None  # wall clock of train(), evaluation excluded
        self._eval_seconds = 0.0
        self._eval_start: float | None = None  # start of the evaluation running now
        self._loss_scaled_override: bool | None = None
        self._fngd_steps_per_epoch: int | None = None
        self._fngd_direction_norm: torch.Tensor | None = None
        super().__init__(*args, **kwargs)
        if self._fngd_requested() or unwrap_fngd(self.optimizer) is not None:
            # `accelerate launch --mixed_precision fp16` reaches the accelerator without setting args.fp16.
            if self.args.fp16 or getattr(self.accelerator, "mixed_precision", "no") == "fp16":
                raise ValueError(FP16_MESSAGE)
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError("FNGD needs whole nn.Linear weights: DeepSpeed and FSDP are not supported")

    # ----------------------------------------------------------------------------- settings
    def _arg(self, name: str):
        return getattr(self.args, name, ARG_DEFAULTS[name])

    def _fngd_requested(self) -> bool:
        return self._arg("optimizer") in LAYERWISE

    @property
    def fngd_optimizer(self) -> LayerwiseOptimizer | None:
        """The FNGD (or other layer-wise method) in use, unwrapped from accelerate, or ``None``."""
        return unwrap_fngd(getattr(self, "optimizer", None))

    @property
    def loss_is_scaled_for_ga(self) -> bool | None:
        if self._loss_scaled_override is not None:
            return self._loss_scaled_override
        if self.fngd_optimizer is not None and self.compute_loss_func is None:
            return False  # we drop num_items_in_batch: the loss is each micro-batch's mean
        return None

    @loss_is_scaled_for_ga.setter
    def loss_is_scaled_for_ga(self, value: bool | None) -> None:
        self._loss_scaled_override = value

    # ---------------------------------------------------------------------------- optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            name = self._arg("optimizer")
            opt_model = self.model if model is None else model
            if name in FNGD_FAMILY:
                self.optimizer = self._build_fngd(opt_model, share=name != "ngd", cls=CWNGD if name == "cwngd" else FNGD)
            elif name in ("kfac", "sngd", "shampoo", "muon"):
                self.optimizer = self._build_peer(opt_model, name)
            elif name == "sgd":
                self.optimizer = self._build_sgd(opt_model)
            else:
                super().create_optimizer(model)
        self._configure_fngd()
        return self.optimizer

    def _shared_kwargs(self, model) -> dict:
        """What every method but SGD takes from the arguments: lr, the managed layers' momentum, weight decay
        and targets (the fngd_* fields), and the AdamW part."""
        args = self.args
        return dict(
            lr=args.learning_rate,
            momentum=self._arg("fngd_momentum"),
            weight_decay=self._arg("fngd_weight_decay"),
            target_modules=self._arg("fngd_target_modules"),
            adamw_lr=self._arg("fngd_adamw_lr"),
            adamw_betas=(args.adam_beta1, args.adam_beta2),
            adamw_eps=args.adam_epsilon,
            adamw_weight_decay=args.weight_decay,
            adamw_no_decay=self._no_decay_names(model),
        )

    def _layerwise_kwargs(self, model) -> dict:
        """:meth:`_shared_kwargs` plus what the layer-wise methods take: the accumulation count, and
        ``max_grad_norm`` as the clip of the applied update (see the class docstring)."""
        args = self.args
        return dict(
            self._shared_kwargs(model),
            nesterov=self._arg("fngd_nesterov"),
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            clip_update_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
        )

    def _build_peer(self, model, name: str):
        """K-FAC, SNGD or Shampoo: lr, momentum, targets and the AdamW part as for FNGD, the rest from optim_args."""
        extra = parse_optim_args(self.args.optim_args)
        if name == "muon":
            from ..muon import build_muon  # torch.optim.Muon: torch >= 2.9

            common = self._shared_kwargs(model)
            common.pop("momentum")  # Muon's own default (0.95), or optim_args
            return build_muon(model, **common, **extra)
        if name == "shampoo":
            from ..shampoo import build_shampoo  # optional dependency: a clear ImportError if missing

            return build_shampoo(model, **self._shared_kwargs(model), **extra)
        common = self._layerwise_kwargs(model)
        ratio = self._arg("fngd_trust_ratio")
        if ratio != settings.AUTO and "trust_ratio" not in extra:  # given: K-FAC and SNGD take it too
            common["trust_ratio"] = settings.parse_trust_ratio(ratio, "fngd_trust_ratio")
        if name == "kfac":
            return KFAC(model, **common, **extra)
        from ..sngd import SNGD

        return SNGD(model, **common, **extra)

    def _build_fngd(self, model, share: bool, cls: type[FNGD] = FNGD) -> FNGD:
        return cls(
            model,
            damping=self._arg("fngd_damping"),
            damping_mode=self._arg("fngd_damping_mode"),
            share_coefficients=share and self._arg("fngd_share_coefficients"),
            steps_per_epoch=self._fngd_steps_per_epoch,
            damping_floor=self._arg("fngd_damping_floor"),
            trust_ratio=self._arg("fngd_trust_ratio"),  # parsed, "auto" resolved, by FNGD itself
            scale_mode=self._arg("fngd_scale_mode"),
            shared_phase=self._arg("fngd_shared_phase"),
            step_length=self._arg("fngd_step_length"),
            normalize_directions=self._arg("fngd_normalize_directions"),
            fisher=self._arg("fngd_fisher"),
            share_by=self._arg("fngd_share_by"),
            batch_layers=settings.BATCH_LAYERS_NAMES[self._arg("fngd_batch_layers")],
            stat_dtype=settings.STAT_DTYPE_NAMES[self._arg("fngd_stat_dtype")],
            **self._layerwise_kwargs(model),
        )

    def _no_decay_names(self, model) -> list[str]:
        """What the stock Trainer exempts from ``weight_decay`` (biases, LayerNorm): the same for the AdamW part."""
        decay = set(self.get_decay_parameter_names(model))
        return [name for name, _ in model.named_parameters() if name not in decay]

    def _build_sgd(self, model) -> torch.optim.SGD:
        decay = set(self.get_decay_parameter_names(model))
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in params if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
        ]
        return torch.optim.SGD([g for g in groups if g["params"]], lr=self.args.learning_rate, momentum=SGD_MOMENTUM)

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        # values[1] is the Trainer's own num_update_steps_per_epoch: ceil(len / GA), remainder included.
        self._fngd_steps_per_epoch = int(values[1]) if has_length(dataloader) else None
        return values

    def _configure_fngd(self) -> None:
        opt = self.fngd_optimizer
        if opt is None:
            return
        period = self._fngd_steps_per_epoch
        if period is not None and isinstance(opt, FNGD) and opt.steps_per_epoch != period:
            if opt.steps_per_epoch is not None:
                warnings.warn(
                    f"FNGD steps_per_epoch={opt.steps_per_epoch} differs from the Trainer's {period} optimizer "
                    f"steps per epoch; using {period}.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            opt.steps_per_epoch = period
        opt.accumulation_declared_by = "FNGDTrainer"  # it scales every micro-batch loss itself
        micro = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        if opt.gradient_accumulation_steps != micro:
            opt.gradient_accumulation_steps = micro

    # ------------------------------------------------------------------------- the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        # current_gradient_accumulation_steps is the micro-batch count of this step (the remainder at an epoch's end).
        self._configure_fngd()
        opt = self.fngd_optimizer
        if isinstance(opt, FNGD) and opt.share_coefficients and opt.share_by == "sample":
            opt.set_sample_ids(_batch_sample_keys(inputs))
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        opt = self.fngd_optimizer
        if model.training and self.compute_loss_func is None and opt is not None:
            num_items_in_batch = None  # see the class docstring: each micro-batch's own mean, divided by GA
        if not (model.training and isinstance(opt, FNGD) and opt.fisher == "monte_carlo"):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # The Monte-Carlo Fisher: the backward of labels sampled from these logits, before the Trainer's backward.
        labels = inputs.get("labels")  # read first: a label smoother pops them from inputs
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        opt.sampled_fisher_backward(logits, labels)
        return (loss, outputs) if return_outputs else loss

    def _fngd_split(self):
        opt = self.fngd_optimizer
        fngd = [p for g in opt.param_groups if g["fngd"] for p in g["params"] if p.grad is not None]
        plain = [p for p in opt.adamw_parameters() if p.grad is not None]
        return fngd, plain

    def _clip_grad_norm(self, model):
        if self.fngd_optimizer is None:
            return super()._clip_grad_norm(model)
        fngd, plain = self._fngd_split()
        self._record_direction_norm(fngd)
        if not plain:
            return torch.zeros((), device=self.args.device)
        return self.accelerator.clip_grad_norm_(plain, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if self.fngd_optimizer is None or grad_norm is not None:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        fngd, plain = self._fngd_split()
        self._record_direction_norm(fngd)
        if not plain:
            return torch.zeros((), device=self.args.device)
        return _global_norm([p.grad for p in plain])

    def _record_direction_norm(self, params) -> None:
        opt = self.fngd_optimizer
        if params and opt._writes_directions:  # .grad holds the direction times its tag
            self._fngd_direction_norm = _global_norm([p.grad.detach() for p in params]) / direction_tag(params[0].dtype)

    # ------------------------------------------------------------------------------ logging
    def train(self, *args, **kwargs):
        self._clock_start, self._eval_seconds, self._eval_start = time.perf_counter(), 0.0, None
        try:
            return super().train(*args, **kwargs)
        finally:
            self._clock_start = None  # logs after train() (a final evaluate) carry no training clock

    def training_seconds(self) -> float | None:
        """Wall clock of ``train()`` so far without its evaluations (the one running now included)."""
        if self._clock_start is None:
            return None
        now = time.perf_counter()
        running = 0.0 if getattr(self, "_eval_start", None) is None else now - self._eval_start
        return now - self._clock_start - self._eval_seconds - running

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        """The usual evaluation; its time, ``on_evaluate`` callbacks included, is kept out of ``train_seconds``."""
        if getattr(self, "_evaluating", False):  # one of several eval datasets: the outer call keeps the time
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix, **gen_kwargs)
        self._eval_start, self._evaluating = time.perf_counter(), True
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix, **gen_kwargs)
        finally:
            self._evaluating = False
            self._eval_seconds += time.perf_counter() - self._eval_start
            self._eval_start = None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        seconds = self.training_seconds()
        if seconds is not None:
            logs["train_seconds"] = round(seconds, 3)
        opt = self.fngd_optimizer
        if opt is not None and "loss" in logs:
            diagnostics = getattr(opt, "diagnostics", dict)
            for key, value in diagnostics().items():
                if not math.isnan(value):
                    logs[key] = value
            if self._fngd_direction_norm is not None:
                logs["fngd/direction_norm"] = float(self._fngd_direction_norm)
        super().log(logs, start_time)

    # -------------------------------------------------------------------------- checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        opt = self.fngd_optimizer
        if opt is None or self.args.world_size <= 1:
            return  # optimizer.pt already holds the only bank
        save_rank_state(opt, output_dir, self.args.process_index)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        opt = self.fngd_optimizer
        if checkpoint is not None and opt is not None and self.args.world_size > 1:
            restore_on_load(opt, checkpoint, self.args.process_index)  # after optimizer.pt, the main rank's
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            if opt is not None:
                opt._restore_after_load = None


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together, as float32, from multi-tensor kernels: one norm kernel per
    tensor would cost a launch per managed parameter at every step (host time on GPUs)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).float())


def _batch_sample_keys(inputs) -> torch.Tensor:
    """Content keys of a batch's samples (source ids under the attention mask, plus labels) for share_by='sample'."""
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("fngd_share_by='sample' identifies samples by their 'input_ids'; this batch has none")
    labels = inputs.get("labels")
    labels = labels if isinstance(labels, torch.Tensor) and labels.dim() == 2 else None
    return sample_keys(input_ids, labels, masks=(inputs.get("attention_mask"), None))
