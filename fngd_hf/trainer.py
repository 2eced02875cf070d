"""Hugging Face ``Seq2SeqTrainer`` integration: :class:`FNGDTrainingArguments` and :class:`FNGDTrainer`.

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

import ast
import logging
import math
import time
import warnings
from dataclasses import dataclass, field, fields

import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
from transformers.trainer_utils import has_length

from .base import LayerwiseOptimizer, direction_tag
from .checkpointing import restore_on_load, save_rank_state
from .cwngd import CWNGD
from .kfac import KFAC
from .optimizer import FNGD
from .sample_sharing import sample_keys

logger = logging.getLogger(__name__)

OPTIMIZERS = ("fngd", "ngd", "cwngd", "kfac", "sngd", "shampoo", "muon", "adamw", "sgd")
# Methods built on LayerwiseOptimizer: the trainer scales their loss and clips their update.
LAYERWISE = ("fngd", "ngd", "cwngd", "kfac", "sngd")
STAT_DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64}
BATCH_LAYERS = {"auto": "auto", "true": True, "false": False}
SGD_MOMENTUM = 0.9


def parse_optim_args(text: str | None) -> dict:
    """``'damping=1e-3,inverse_method=eigen'`` -> ``{'damping': 0.001, 'inverse_method': 'eigen'}``."""
    kwargs = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"optim_args items must be key=value, got {item!r}")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return kwargs


def unwrap_fngd(optimizer) -> LayerwiseOptimizer | None:
    """The :class:`FNGD` inside ``optimizer`` (accelerate wraps it; ``.optimizer`` reaches in), else ``None``."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, LayerwiseOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


@dataclass
class FNGDTrainingArguments(Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` plus the optimizer choice and FNGD's settings.

    ``learning_rate`` is FNGD's ``lr``, ``weight_decay`` the AdamW part's decoupled weight decay
    (biases and LayerNorm exempt, as with the stock Trainer),
    ``adam_beta1/2`` and ``adam_epsilon`` the AdamW part's constants, ``max_grad_norm`` the
    global clip of the applied FNGD update ``lr·d`` (see :class:`FNGDTrainer`).
    """

    optimizer: str = field(
        default="fngd",
        metadata={
            "help": "fngd: FNGD with coefficient sharing; ngd: the same with coefficients recomputed every step; "
            "cwngd: component-wise NGD (FNGD's settings); kfac: K-FAC; sngd: structured NGD; shampoo: Shampoo from "
            "pytorch-optimizer (extra `shampoo`); muon: torch.optim.Muon on the same 2-D weights FNGD manages, AdamW on the "
            "rest (fngd_hf.muon.MuonHybrid); adamw: the Trainer's own optimizer (`optim`); sgd: torch.optim.SGD "
            "with momentum 0.9. kfac/sngd/shampoo take their own settings from `optim_args` "
            "(e.g. 'damping=1e-3,inverse_update_freq=10'); the FNGD layers' momentum, weight decay and targets "
            "come from the fngd_* fields.",
            "choices": list(OPTIMIZERS),
        },
    )
    fngd_damping: float = field(
        default=0.1,
        metadata={"help": "FNGD damping: gamma (relative mode; 0.1 won benchmarks/convergence.py) or lambda (fixed mode)."},
    )
    fngd_damping_mode: str = field(
        default="relative",
        metadata={
            "help": "relative: lambda*B = gamma*||K||_F; fixed: lambda as given.",
            "choices": ["relative", "fixed"],
        },
    )
    fngd_damping_floor: float = field(
        default=0.0, metadata={"help": "Relative damping only: lambda >= damping_floor."}
    )
    fngd_momentum: float = field(default=0.9, metadata={"help": "Heavy-ball momentum on the FNGD direction."})
    fngd_weight_decay: float = field(
        default=0.0, metadata={"help": "Decoupled weight decay of the FNGD-managed layers (weight and bias)."}
    )
    fngd_share_coefficients: bool = field(
        default=True,
        metadata={"help": "Reuse the first epoch's coefficients in later epochs (ignored for optimizer=ngd)."},
    )
    fngd_share_by: str = field(
        default="position",
        metadata={
            "help": "position: step s of a later epoch reuses the coefficients of step s of the first epoch (the "
            "paper); sample: every training sample keeps the coefficient it got when first seen (the trainer "
            "identifies samples by a hash of their token ids).",
            "choices": ["position", "sample"],
        },
    )
    fngd_scale_mode: str = field(
        default="shared",
        metadata={
            "help": "shared: reuse beta as stored; refreshed: rescale it by tr(K_stored)/tr(K_new).",
            "choices": ["shared", "refreshed"],
        },
    )
    fngd_shared_phase: str = field(
        default="coefficients",
        metadata={
            "help": "What the FNGD layers do after the first epoch: coefficients: reuse the first epoch's (the "
            "paper); adamw: train with AdamW on their plain gradient at the AdamW part's rate (fngd_adamw_lr).",
            "choices": ["coefficients", "adamw"],
        },
    )
    fngd_batch_layers: str = field(
        default="auto",
        metadata={
            "help": "true: in the first epoch, equally shaped layers form their Gram matrices and solves together at "
            "the end of each backward (few GPU kernels; holds their inputs and output gradients until then, at most "
            "1 GiB); false: each layer in its own backward; auto: true on GPUs, false on CPUs.",
            "choices": list(BATCH_LAYERS),
        },
    )
    fngd_trust_ratio: float | str | None = field(
        default="auto",
        metadata={
            "help": "Per-layer trust region ||d|| <= ratio*||[W|b]|| (a step moves a layer by at most "
            "lr*ratio of its norm, before momentum): a float, 'auto' (1.0 with relative damping, off with fixed) "
            "or 'none'."
        },
    )
    fngd_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module-name regexes or suffixes of the layers FNGD manages; default: every nn.Linear/Conv1D "
            "except vocabulary heads and layers tied to embeddings."
        },
    )
    fngd_stat_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the Gram matrix and the Cholesky solve; auto: float64 for a float64 model, else float32.",
            "choices": list(STAT_DTYPES),
        },
    )
    fngd_adamw_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the AdamW part (default: learning_rate)."}
    )

    def __post_init__(self):
        self._validate_fngd()
        super().__post_init__()
        # After the parent: it reads `accelerate launch --mixed_precision` from the environment.
        if self.optimizer in LAYERWISE and (self.fp16 or getattr(self, "mixed_precision", "no") == "fp16"):
            raise ValueError(_FP16_MESSAGE)

    def _validate_fngd(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer: {self.optimizer!r} (expected one of {', '.join(OPTIMIZERS)})")
        if not self.fngd_damping > 0.0:
            raise ValueError(f"Invalid fngd_damping: {self.fngd_damping} (must be > 0)")
        if self.fngd_damping_mode not in ("relative", "fixed"):
            raise ValueError(f"Invalid fngd_damping_mode: {self.fngd_damping_mode!r} (expected 'relative' or 'fixed')")
        if self.fngd_damping_floor < 0.0:
            raise ValueError(f"Invalid fngd_damping_floor: {self.fngd_damping_floor} (must be >= 0)")
        if not 0.0 <= self.fngd_momentum < 1.0:
            raise ValueError(f"Invalid fngd_momentum: {self.fngd_momentum} (must be in [0, 1))")
        if self.fngd_weight_decay < 0.0:
            raise ValueError(f"Invalid fngd_weight_decay: {self.fngd_weight_decay} (must be >= 0)")
        if self.fngd_share_by not in ("position", "sample"):
            raise ValueError(f"Invalid fngd_share_by: {self.fngd_share_by!r} (expected 'position' or 'sample')")
        if self.fngd_scale_mode not in ("shared", "refreshed"):
            raise ValueError(f"Invalid fngd_scale_mode: {self.fngd_scale_mode!r} (expected 'shared' or 'refreshed')")
        if self.fngd_shared_phase not in ("coefficients", "adamw"):
            raise ValueError(f"Invalid fngd_shared_phase: {self.fngd_shared_phase!r} (expected 'coefficients' or 'adamw')")
        if self.fngd_batch_layers not in BATCH_LAYERS:
            raise ValueError(f"Invalid fngd_batch_layers: {self.fngd_batch_layers!r} (expected 'auto', 'true' or 'false')")
        self.fngd_trust_ratio = _parse_ratio(self.fngd_trust_ratio)
        if isinstance(self.fngd_target_modules, str):
            self.fngd_target_modules = [self.fngd_target_modules]
        if self.fngd_target_modules is not None and len(self.fngd_target_modules) == 0:
            raise ValueError("Invalid fngd_target_modules: an empty list (use None for the default choice)")
        if self.fngd_stat_dtype not in STAT_DTYPES:
            raise ValueError(f"Invalid fngd_stat_dtype: {self.fngd_stat_dtype!r} (expected 'auto', 'float32' or 'float64')")
        if self.fngd_adamw_lr is not None and not self.fngd_adamw_lr > 0.0:
            raise ValueError(f"Invalid fngd_adamw_lr: {self.fngd_adamw_lr} (must be > 0, or None)")

    @property
    def uses_fngd(self) -> bool:
        return self.optimizer in ("fngd", "ngd")

    @property
    def fngd_dtype(self) -> torch.dtype | None:
        return STAT_DTYPES[self.fngd_stat_dtype]


_FP16_MESSAGE = (
    "FNGD does not support fp16 with a GradScaler: the scaler multiplies the loss before backward, and FNGD's "
    "Gram matrix and coefficients (computed during backward) are not linear in that scale, and steps the scaler "
    "skips would leave half-accumulated statistics behind. Use bf16=True (statistics stay float32) or float32."
)


def _parse_ratio(value):
    """``fngd_trust_ratio`` from the command line arrives as a string."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        ratio = None if value is None else float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text in ("none", "null", "off", ""):
            return None
        try:
            ratio = float(text)
        except ValueError:
            raise ValueError(
                f"Invalid fngd_trust_ratio: {value!r} (a positive number, 'auto' or 'none')"
            ) from None
    else:
        raise ValueError(f"Invalid fngd_trust_ratio: {value!r} (a positive number, 'auto' or 'none')")
    if ratio is not None and not ratio > 0.0:
        raise ValueError(f"Invalid fngd_trust_ratio: {value!r} (must be > 0)")
    return ratio


_ARG_DEFAULTS = {
    f.name: f.default for f in fields(FNGDTrainingArguments) if f.name.startswith(("fngd_", "optimizer"))
}


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
                raise ValueError(_FP16_MESSAGE)
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError("FNGD needs whole nn.Linear weights: DeepSpeed and FSDP are not supported")

    # ----------------------------------------------------------------------------- settings
    def _arg(self, name: str):
        return getattr(self.args, name, _ARG_DEFAULTS[name])

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
            if name in ("fngd", "ngd", "cwngd"):
                self.optimizer = self._build_fngd(opt_model, share=name != "ngd", cls=CWNGD if name == "cwngd" else FNGD)
            elif name in ("kfac", "sngd", "shampoo", "muon"):
                self.optimizer = self._build_peer(opt_model, name)
            elif name == "sgd":
                self.optimizer = self._build_sgd(opt_model)
            else:
                super().create_optimizer(model)
        self._configure_fngd()
        return self.optimizer

    def _build_peer(self, model, name: str):
        """K-FAC, SNGD or Shampoo: lr, momentum, targets and the AdamW part as for FNGD, the rest from optim_args."""
        args = self.args
        common = dict(
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
        extra = parse_optim_args(args.optim_args)
        if name == "muon":
            from .muon import build_muon  # torch.optim.Muon: torch >= 2.9

            common.pop("momentum")  # Muon's own default (0.95), or optim_args
            return build_muon(model, **common, **extra)
        if name == "shampoo":
            from .shampoo import build_shampoo  # optional dependency: a clear ImportError if missing

            return build_shampoo(model, **common, **extra)
        common.update(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            clip_update_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
        )
        if name == "kfac":
            return KFAC(model, **common, **extra)
        from .sngd import SNGD

        return SNGD(model, **common, **extra)

    def _build_fngd(self, model, share: bool, cls: type[FNGD] = FNGD) -> FNGD:
        args = self.args
        ratio = _parse_ratio(self._arg("fngd_trust_ratio"))
        return cls(
            model,
            lr=args.learning_rate,
            damping=self._arg("fngd_damping"),
            damping_mode=self._arg("fngd_damping_mode"),
            momentum=self._arg("fngd_momentum"),
            weight_decay=self._arg("fngd_weight_decay"),
            share_coefficients=share and self._arg("fngd_share_coefficients"),
            steps_per_epoch=self._fngd_steps_per_epoch,
            target_modules=self._arg("fngd_target_modules"),
            adamw_lr=self._arg("fngd_adamw_lr"),
            adamw_betas=(args.adam_beta1, args.adam_beta2),
            adamw_eps=args.adam_epsilon,
            adamw_weight_decay=args.weight_decay,
            adamw_no_decay=self._no_decay_names(model),
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            damping_floor=self._arg("fngd_damping_floor"),
            trust_ratio=ratio,
            scale_mode=self._arg("fngd_scale_mode"),
            shared_phase=self._arg("fngd_shared_phase"),
            share_by=self._arg("fngd_share_by"),
            batch_layers=BATCH_LAYERS[self._arg("fngd_batch_layers")],
            clip_update_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
            stat_dtype=STAT_DTYPES[self._arg("fngd_stat_dtype")],
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
        if model.training and self.compute_loss_func is None and self.fngd_optimizer is not None:
            num_items_in_batch = None  # see the class docstring: each micro-batch's own mean, divided by GA
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

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
