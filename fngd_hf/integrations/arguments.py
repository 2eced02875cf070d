"""``FNGDTrainingArguments``: ``Seq2SeqTrainingArguments`` plus the optimizer choice and FNGD's settings.

Every field is validated by :mod:`fngd_hf.settings`, the functions the optimizers use themselves.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field, fields

import torch
from transformers import Seq2SeqTrainingArguments

from .. import settings

OPTIMIZERS = ("fngd", "ngd", "cwngd", "kfac", "sngd", "shampoo", "muon", "adamw", "sgd")
# Methods built on LayerwiseOptimizer: the trainer scales their loss and clips their update.
LAYERWISE = ("fngd", "ngd", "cwngd", "kfac", "sngd")
# FNGD's direction (shared coefficients, fresh ones, column-wise): the fngd_* step-length settings apply.
FNGD_FAMILY = ("fngd", "ngd", "cwngd")

FP16_MESSAGE = (
    "FNGD does not support fp16 with a GradScaler: the scaler multiplies the loss before backward, and FNGD's "
    "Gram matrix and coefficients (computed during backward) are not linear in that scale, and steps the scaler "
    "skips would leave half-accumulated statistics behind. Use bf16=True (statistics stay float32) or float32."
)


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


def _choice(default: str, choices, help: str):
    """A field that takes one of ``choices`` (the command line's ``choices`` too)."""
    return field(default=default, metadata={"help": help, "choices": list(choices)})


@dataclass
class FNGDTrainingArguments(Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` plus the optimizer choice and FNGD's settings.

    ``learning_rate`` is FNGD's ``lr``, ``weight_decay`` the AdamW part's decoupled weight decay
    (biases and LayerNorm exempt, as with the stock Trainer),
    ``adam_beta1/2`` and ``adam_epsilon`` the AdamW part's constants, ``max_grad_norm`` the
    global clip of the applied FNGD update ``lr·d`` (see :class:`~fngd_hf.FNGDTrainer`).
    """

    optimizer: str = _choice(
        "fngd",
        OPTIMIZERS,
        "fngd: FNGD with coefficient sharing; ngd: the same with coefficients recomputed every step; "
        "cwngd: component-wise NGD (FNGD's settings); kfac: K-FAC; sngd: structured NGD; shampoo: Shampoo from "
        "pytorch-optimizer (extra `shampoo`); muon: torch.optim.Muon on the same 2-D weights FNGD manages, AdamW on the "
        "rest (fngd_hf.muon.MuonHybrid); adamw: the Trainer's own optimizer (`optim`); sgd: torch.optim.SGD "
        "with momentum 0.9. kfac/sngd/shampoo take their own settings from `optim_args` "
        "(e.g. 'damping=1e-3,inverse_update_freq=10'); the FNGD layers' momentum, weight decay and targets "
        "come from the fngd_* fields.",
    )
    fngd_damping: float | None = field(
        default=None,
        metadata={"help": "FNGD damping: gamma (relative) or lambda (fixed). Default: gamma 10 with Muon's step, "
                          "0.1 with the others; lambda 0.1."},
    )
    fngd_damping_mode: str = _choice(
        "relative", settings.DAMPING_MODES, "relative: lambda*B = gamma*||K||_F; fixed: lambda as given."
    )
    fngd_damping_floor: float = field(
        default=0.0, metadata={"help": "Relative damping only: lambda >= damping_floor."}
    )
    fngd_momentum: float = field(default=0.9, metadata={"help": "Heavy-ball momentum on the FNGD direction."})
    fngd_nesterov: bool = field(
        default=False, metadata={"help": "Nesterov momentum (torch.optim.SGD's form) instead of heavy ball."}
    )
    fngd_weight_decay: float = field(
        default=0.0, metadata={"help": "Decoupled weight decay of the FNGD-managed layers (weight and bias)."}
    )
    fngd_share_coefficients: bool = field(
        default=True,
        metadata={"help": "Reuse the first epoch's coefficients in later epochs (ignored for optimizer=ngd)."},
    )
    fngd_share_by: str = _choice(
        "position",
        settings.SHARE_BY,
        "position: step s of a later epoch reuses the coefficients of step s of the first epoch (the "
        "paper); sample: every training sample keeps the coefficient it got when first seen (the trainer "
        "identifies samples by a hash of their token ids).",
    )
    fngd_scale_mode: str = _choice(
        "shared", settings.SCALE_MODES, "shared: reuse beta as stored; refreshed: rescale it by tr(K_stored)/tr(K_new)."
    )
    fngd_shared_phase: str = _choice(
        "coefficients",
        settings.SHARED_PHASES,
        "What the FNGD layers do after the first epoch: coefficients: reuse the first epoch's (the "
        "paper); adamw: train with AdamW on their plain gradient at the AdamW part's rate (fngd_adamw_lr).",
    )
    fngd_batch_layers: str = _choice(
        settings.AUTO,
        settings.BATCH_LAYERS_NAMES,
        "true: in the first epoch, equally shaped layers are solved together at the end of each backward "
        "(few GPU kernels, at most 1 GiB held); false: each layer in its own backward; auto: true on GPUs.",
    )
    fngd_trust_ratio: float | str | None = field(
        default=settings.AUTO,
        metadata={
            "help": "Per-layer trust region ||d|| <= ratio*||[W|b]|| (a layer moves by at most lr*ratio of its "
            "norm): a float, 'auto' (FNGD: min(1, sqrt(B/64)), B the samples per step, with relative damping, off "
            "with fixed; the muon step is scaled by min(2, sqrt(B/64)) instead; K-FAC and SNGD: their own default) "
            "or 'none'. A given value also reaches K-FAC and SNGD."
        },
    )
    fngd_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module-name regexes or suffixes of the layers FNGD manages; default: every nn.Linear/Conv1D "
            "except vocabulary heads and layers tied to embeddings."
        },
    )
    fngd_stat_dtype: str = _choice(
        settings.AUTO,
        settings.STAT_DTYPE_NAMES,
        "dtype of the Gram matrix and the Cholesky solve; auto: float64 for a float64 model, else float32.",
    )
    fngd_adamw_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the AdamW part (default: FNGD's for its step length, 4e-3 "
                                        "with muon, 2e-3 with trust_region; the peers: learning_rate)."}
    )

    fngd_step_length: str = _choice(
        settings.DEFAULT_STEP_LENGTH,
        settings.STEP_LENGTHS,
        "How far an FNGD layer moves along its natural gradient: muon (default): Muon's orthogonalised, "
        "RMS-matched step (learning_rate AdamW-scale, e.g. 6e-3); trust_region: learning_rate times the natural "
        "gradient, bounded by the trust region (the paper's step with our safeguard, e.g. 1e-2); adamw: AdamW's "
        "update length for that layer (grafting; did not train on Multi30K).",
    )
    fngd_normalize_directions: bool | None = field(
        default=None,
        metadata={"help": "Unit-norm layer directions before momentum (Muon's step only). None: on with muon."},
    )
    fngd_fisher: str = _choice(
        "empirical",
        settings.FISHERS,
        "empirical: the data's labels (the paper); monte_carlo: the model's (ngd only).",
    )

    def __post_init__(self):
        self._validate_fngd()
        super().__post_init__()
        # After the parent: it reads `accelerate launch --mixed_precision` from the environment.
        if self.optimizer in LAYERWISE and (self.fp16 or getattr(self, "mixed_precision", "no") == "fp16"):
            raise ValueError(FP16_MESSAGE)

    def _validate_fngd(self) -> None:
        settings.one_of("optimizer", self.optimizer, OPTIMIZERS)
        settings.positive("fngd_damping", self.fngd_damping, optional=True)
        settings.one_of("fngd_damping_mode", self.fngd_damping_mode, settings.DAMPING_MODES)
        settings.non_negative("fngd_damping_floor", self.fngd_damping_floor)
        settings.fraction("fngd_momentum", self.fngd_momentum)
        settings.nesterov_momentum(self.fngd_nesterov, self.fngd_momentum, "fngd_nesterov")
        settings.non_negative("fngd_weight_decay", self.fngd_weight_decay)
        settings.one_of("fngd_share_by", self.fngd_share_by, settings.SHARE_BY)
        settings.one_of("fngd_scale_mode", self.fngd_scale_mode, settings.SCALE_MODES)
        settings.one_of("fngd_shared_phase", self.fngd_shared_phase, settings.SHARED_PHASES)
        settings.one_of("fngd_step_length", self.fngd_step_length, settings.STEP_LENGTHS)
        settings.resolve_normalize_directions(self.fngd_normalize_directions, self.fngd_step_length,
                                              "fngd_normalize_directions")
        settings.one_of("fngd_batch_layers", self.fngd_batch_layers, settings.BATCH_LAYERS_NAMES)
        if self.optimizer in FNGD_FAMILY:
            settings.fisher_with_sharing(self.fngd_fisher, self.optimizer == "fngd" and self.fngd_share_coefficients,
                                         settings.BATCH_LAYERS_NAMES[self.fngd_batch_layers], "fngd_fisher")
            if self.fngd_fisher == "monte_carlo" and self.optimizer == "cwngd":
                raise ValueError("Invalid fngd_fisher: 'monte_carlo' has no CW-NGD path (use optimizer ngd)")
            if self.fngd_fisher == "monte_carlo" and self.gradient_accumulation_steps != 1:
                raise ValueError("Invalid fngd_fisher: 'monte_carlo' needs gradient_accumulation_steps=1")
        # From the command line it arrives as text; "auto" is resolved when FNGD is built (it follows damping_mode).
        self.fngd_trust_ratio = settings.parse_trust_ratio(self.fngd_trust_ratio, "fngd_trust_ratio")
        if isinstance(self.fngd_target_modules, str):
            self.fngd_target_modules = [self.fngd_target_modules]
        if self.fngd_target_modules is not None and len(self.fngd_target_modules) == 0:
            raise ValueError("Invalid fngd_target_modules: an empty list (use None for the default choice)")
        settings.one_of("fngd_stat_dtype", self.fngd_stat_dtype, settings.STAT_DTYPE_NAMES)
        settings.positive("fngd_adamw_lr", self.fngd_adamw_lr, optional=True)

    @property
    def uses_fngd(self) -> bool:
        return self.optimizer in ("fngd", "ngd")

    @property
    def fngd_dtype(self) -> torch.dtype | None:
        return settings.STAT_DTYPE_NAMES[self.fngd_stat_dtype]


# What FNGDTrainer uses when it is given stock Seq2SeqTrainingArguments (an optimizer passed in).
ARG_DEFAULTS = {f.name: f.default for f in fields(FNGDTrainingArguments) if f.name.startswith(("fngd_", "optimizer"))}
