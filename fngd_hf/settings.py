"""Every setting of the optimizers and of ``FNGDTrainingArguments``, parsed and validated here only.

Small validators that return the value they accept and raise ``ValueError("Invalid <name>: ...")``
otherwise (``name`` is the caller's spelling: ``damping`` for ``FNGD``, ``fngd_damping`` for the
arguments), the choices each setting accepts, ``"auto"``'s meaning for the trust region, and
:class:`LayerwiseSettings`, the arguments every layer-wise optimizer (FNGD, CW-NGD, K-FAC, SNGD) shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterable

import torch

AUTO = "auto"
DAMPING_MODES = ("relative", "fixed")
# "shared": reuse β as stored; "refreshed": rescale it by tr(K_stored)/tr(K_new).
SCALE_MODES = ("shared", "refreshed")
SHARE_BY = ("position", "sample")
# What the managed layers do after the first epoch: reuse its coefficients (the paper), or train with
# AdamW on their plain gradient (the first epoch's natural gradient as a warm start; docs/convergence.md).
SHARED_PHASES = ("coefficients", "adamw")
# How far a managed layer moves along FNGD's direction: Muon's orthogonalised, RMS-matched step (the default,
# fngd_hf/orthogonal.py), the trust region's bound on FNGD's own step (the paper's step with our safeguard), or
# AdamW's update length for that layer (grafting, fngd_hf/graft.py).
STEP_LENGTHS = ("muon", "trust_region", "adamw")
DEFAULT_STEP_LENGTH = "muon"
# (lr, adamw_lr) when not given, per step length: the best of each on full Multi30K (docs/convergence.md). muon:
# 6e-3/4e-3 against 4e-3/4e-3, 3 seeds each, at today's other defaults: test BLEU 36.2 against 36.0, validation
# loss 1.795 against 1.806, and within 1 BLEU of the best rate in the short base run of the robustness table
# where 4e-3 was 3 below (at batch 8 the automatic step scale brings it down to ~2e-3, that cell's best). The
# trust region: 32.2 at 1e-2/2e-3, 3 seeds (its AdamW part at 1e-2 lost 2.3). adamw (grafting) did not train at
# 2e-3 or 4e-3, so its rate is only AdamW's usual one.
DEFAULT_RATES = {"muon": (6e-3, 4e-3), "trust_region": (1e-2, 2e-3), "adamw": (2e-3, 2e-3)}
# Relative damping γ when not given, per step length. muon: γ = 10 against 0.1 on full Multi30K, 3 seeds: test BLEU
# 36.0 against 35.8, final validation loss lower on every seed (1.806 against 1.843; docs/convergence.md): along the
# damping path the less empirical Fisher, the lower the loss. The trust region's step was tuned at 0.1 (grafting kept
# it). Fixed damping's λ has no per-step-length evidence: 0.1.
DEFAULT_RELATIVE_DAMPING = {"muon": 10.0, "trust_region": 0.1, "adamw": 0.1}
DEFAULT_FIXED_DAMPING = 0.1
# Which Fisher the natural gradient inverts: the empirical one (per-sample gradients of the data's labels: the
# paper, and what coefficient sharing stores), or the Monte-Carlo estimate of the true Fisher (per-sample gradients
# of labels sampled from the model, one more backward per step; fngd_hf/sampled_fisher.py).
FISHERS = ("empirical", "monte_carlo")
GRAM_PATHS = (AUTO, "token", "per_sample")
SOLVE_CHECKS = (AUTO, "per_layer", "per_step")
# How each micro-batch loss of an accumulated step was divided: by the micro-batches the step really had
# (so they sum to the whole step's loss: FNGDTrainer, `loss / len(window)`), or always by
# gradient_accumulation_steps (accelerate's `accelerator.backward`, also in an epoch's shorter last window).
LOSS_DIVISORS = ("micro_batches", "gradient_accumulation_steps")
BATCH_LAYERS = (AUTO, True, False)
# Whether a step is bound by kernel launches and host syncs (GPUs) rather than arithmetic (CPUs): it picks every
# "auto" choice above (auto: a CUDA tensor is); True on a CPU runs the GPU choices (benchmarks/step_time.py).
LAUNCH_BOUND = (AUTO, True, False)
INVERSE_METHODS = ("eigen", "cholesky")
# The command line's spelling of stat_dtype and batch_layers (FNGDTrainingArguments) -> the optimizer's.
STAT_DTYPE_NAMES = {AUTO: None, "float32": torch.float32, "float64": torch.float64}
BATCH_LAYERS_NAMES = {AUTO: AUTO, "true": True, "false": False}
_NONE_NAMES = ("none", "null", "off", "")


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _alternatives(choices: Iterable) -> str:
    """``('a', 'b', 'c')`` -> ``"'a', 'b' or 'c'"``."""
    names = [repr(choice) for choice in choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def positive(name: str, value, *, optional: bool = False, finite: bool = False):
    """``value > 0`` (``None`` too if ``optional``; ``finite``: a real, finite number)."""
    if value is None and optional:
        return None
    if (finite and not _real(value)) or not value > 0.0:
        what = "a finite number > 0" if finite else "must be > 0"
        raise ValueError(f"Invalid {name}: {value} ({what}{', or None' if optional else ''})")
    return value


def non_negative(name: str, value, *, finite: bool = False):
    if (finite and not _real(value)) or not value >= 0.0:
        raise ValueError(f"Invalid {name}: {value} ({'a finite number >= 0' if finite else 'must be >= 0'})")
    return value


def fraction(name: str, value, *, finite: bool = False):
    """``0 <= value < 1`` (momentum, a decay rate, an Adam beta)."""
    if (finite and not _real(value)) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")
    return value


def nesterov_momentum(nesterov, momentum, name: str = "nesterov") -> None:
    """``nesterov`` a bool, and only with a momentum (as torch.optim.SGD: Nesterov without momentum is no step)."""
    if not isinstance(nesterov, bool):
        raise ValueError(f"Invalid {name}: {nesterov!r} (True or False)")
    if nesterov and momentum == 0.0:
        raise ValueError(f"{name}=True needs a momentum > 0 (got momentum {momentum!r})")


def resolve_normalize_directions(value, step_length: str, name: str = "normalize_directions") -> bool:
    """``None`` (the default): on with Muon's step, which discards the direction's norm, off otherwise; ``True``
    only with Muon's step (the other step lengths use the norm, which normalising would throw away)."""
    one_of(name, value, (None, True, False))
    if value is None:
        return step_length == "muon"
    if value and step_length != "muon":
        raise ValueError(f"{name}=True needs step_length='muon' (got {step_length!r}): the other step lengths use "
                         f"the direction's norm, which normalising would throw away")
    return bool(value)


def positive_int(name: str, value, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"Invalid {name}: {value} (a positive integer{', or None' if optional else ''})")
    return int(value)


def one_of(name: str, value, choices: Iterable):
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected {_alternatives(choices)})")
    return value


def default_rates(step_length: str, lr: float | None = None, adamw_lr: float | None = None,
                  name: str = "step_length") -> tuple[float, float]:
    """``(lr, adamw_lr)``: each given one as it is, each missing one the step length's default (``DEFAULT_RATES``)."""
    default_lr, default_adamw_lr = DEFAULT_RATES[one_of(name, step_length, STEP_LENGTHS)]
    return (default_lr if lr is None else lr), (default_adamw_lr if adamw_lr is None else adamw_lr)


def default_damping(step_length: str, damping_mode: str, damping: float | None = None,
                    name: str = "damping") -> float:
    """``damping`` as given (it must be > 0), or the default for ``step_length`` and ``damping_mode``
    (``DEFAULT_RELATIVE_DAMPING``, ``DEFAULT_FIXED_DAMPING``)."""
    one_of("step_length", step_length, STEP_LENGTHS)
    one_of("damping_mode", damping_mode, DAMPING_MODES)
    if damping is not None:
        return positive(name, damping)
    return DEFAULT_RELATIVE_DAMPING[step_length] if damping_mode == "relative" else DEFAULT_FIXED_DAMPING


def betas(name: str, value, *, finite: bool = False) -> tuple[float, float]:
    """Two Adam betas in ``[0, 1)``."""
    pair = tuple(value) if isinstance(value, (tuple, list)) or not finite else ()
    if len(pair) != 2 or not all((_real(b) or not finite) and 0.0 <= b < 1.0 for b in pair):
        raise ValueError(f"Invalid {name}: {value} (two numbers in [0, 1))")
    return pair


def parse_trust_ratio(value, name: str = "trust_ratio") -> float | str | None:
    """A positive number, ``None`` (off) or ``"auto"``; from a command line also as text (``"0.5"``, ``"none"``)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text in _NONE_NAMES:
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"Invalid {name}: {value!r} (a positive number, 'auto' or 'none')") from None
    elif value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise ValueError(f"Invalid {name}: {value!r} (a positive number, 'auto' or 'none')")
    return positive(name, None if value is None else float(value), optional=True)


def resolve_trust_ratio(value, damping_mode: str | None = None, name: str = "trust_ratio") -> float | None:
    """:func:`parse_trust_ratio`, with ``"auto"`` resolved for FNGD's ``damping_mode``: 1.0 with relative
    damping (scaled per step by :func:`auto_trust_scale`), off with fixed. Measured (benchmarks/stability_trial.py): without it relative damping
    diverges; at the trust region's default lr 1e-2 this bounds a step to 1% of the layer's norm. ``"auto"`` needs a
    ``damping_mode`` (K-FAC and SNGD have no automatic trust region)."""
    ratio = parse_trust_ratio(value, name)
    if ratio == AUTO:
        if damping_mode is None:
            raise ValueError(f"Invalid {name}: 'auto' is FNGD's (it follows damping_mode); a positive number or None")
        return 1.0 if damping_mode == "relative" else None
    return ratio


def trust_ratio_for_step_length(value, step_length: str, damping_mode: str, name: str = "trust_ratio") -> float | None:
    """:func:`resolve_trust_ratio`; with ``step_length="adamw"`` or ``"muon"`` that step's length replaces the
    trust region, so a ratio given there would be silently ignored: only ``"auto"`` or ``None`` is accepted, and
    it is off."""
    one_of("step_length", step_length, STEP_LENGTHS)
    if step_length != "trust_region":
        if parse_trust_ratio(value, name) not in (AUTO, None):
            raise ValueError(f"Invalid {name}: {value!r} with step_length={step_length!r} (its own update length "
                             f"replaces the trust region): leave it 'auto' or None")
        return None
    return resolve_trust_ratio(value, damping_mode, name)


# FNGD's automatic step scale (trust_ratio="auto") is 1.0 at this many samples per step, and shrinks like
# sqrt(B/64) below it (the square-root scaling rule). Both step lengths have a fixed size that does not shrink
# when the gradient is mostly noise. The trust region's: at 1.0 a small batch's many noisy steps random-walked
# the cross-attention until the model ignored its source (batch 8 and 16 collapsed). Muon's: at batch 8 the
# best rate was a third of batch 64's (docs/convergence.md, "Batch size" and "Robustness").
TRUST_REFERENCE_BATCH = 64
# Muon's step also grows above 64 samples by the same square root, up to this factor (batch 256): at batch 128
# 8.5e-3 (= sqrt(2)·6e-3) beat 6e-3 on full Multi30K (test BLEU 35.9 against 35.2, validation loss 1.819 against
# 1.837, seed 0) and 8e-3 beat 6e-3 by 1.7 BLEU in the robustness table's short run; larger batches were not
# measured, hence the cap. The trust region's bound does not grow (not measured above 64).
AUTO_MUON_MAX_SCALE = 2.0


def auto_trust_scale(samples_per_step: int, step_length: str = "trust_region") -> float:
    """The factor ``"auto"`` applies to the trust ratio (at most 1), or to Muon's step (at most
    ``AUTO_MUON_MAX_SCALE``), for a step of ``samples_per_step`` samples."""
    largest = AUTO_MUON_MAX_SCALE if step_length == "muon" else 1.0
    return min(largest, (samples_per_step / TRUST_REFERENCE_BATCH) ** 0.5)


def auto_step_scaling(trust_ratio, step_length: str, damping_mode: str) -> bool:
    """Whether ``trust_ratio="auto"`` scales FNGD's step by :func:`auto_trust_scale`: the trust region's bound
    (relative damping; with fixed damping "auto" means no trust region) or Muon's step; not AdamW's (grafted)
    step, whose length already shrinks with the gradient's signal-to-noise ratio."""
    if parse_trust_ratio(trust_ratio) != AUTO:
        return False
    return step_length == "muon" or (step_length == "trust_region" and damping_mode == "relative")


def fisher_with_sharing(fisher: str, share_coefficients: bool, batch_layers, name: str = "fisher") -> str:
    """The Monte-Carlo Fisher needs the model's sampled-label gradients of every step: nothing to share, and
    the batched end-of-backward path does not carry them."""
    one_of(name, fisher, FISHERS)
    if fisher == "monte_carlo" and share_coefficients:
        raise ValueError(f"{name}='monte_carlo' needs share_coefficients=False (optimizer 'ngd'): its direction "
                         "needs the gradients of labels sampled from the model at every step, so there are no "
                         "coefficients to share")
    if fisher == "monte_carlo" and batch_layers is True:
        raise ValueError(f"{name}='monte_carlo' computes each layer in its own backward: batch_layers must be "
                         "'auto' or False")
    return fisher


def share_by_with_phase(share_by: str, shared_phase: str) -> None:
    if shared_phase == "adamw" and share_by == "sample":
        raise ValueError("shared_phase='adamw' switches after the first epoch: it needs share_by='position'")


def adamw_part(lr, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, *, finite: bool = False):
    """``(adamw_lr, adamw_betas)`` of the AdamW part, validated (``adamw_lr=None``: ``lr``)."""
    adamw_lr = positive("adamw_lr", lr if adamw_lr is None else adamw_lr, finite=finite)
    pair = betas("adamw_betas", adamw_betas, finite=finite)
    non_negative("adamw_eps", adamw_eps, finite=finite)
    non_negative("adamw_weight_decay", adamw_weight_decay, finite=finite)
    return adamw_lr, pair


@dataclass(kw_only=True)
class LayerwiseSettings:
    """The arguments every layer-wise optimizer shares (see :class:`~fngd_hf.FNGD` for their meaning),
    validated once, when made (``adamw_lr`` then holds the AdamW part's rate, ``lr`` when it was ``None``)."""

    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    target_modules: Iterable[str] | None
    adamw_lr: float | None
    adamw_betas: tuple[float, float]
    adamw_eps: float
    adamw_weight_decay: float
    adamw_no_decay: Iterable[str] | None
    gradient_accumulation_steps: int
    trust_ratio: float | None
    clip_update_norm: float | None

    def __post_init__(self):
        positive("learning rate", self.lr)
        fraction("momentum", self.momentum)
        nesterov_momentum(self.nesterov, self.momentum)
        non_negative("weight_decay", self.weight_decay)
        self.adamw_lr, self.adamw_betas = adamw_part(
            self.lr, self.adamw_lr, self.adamw_betas, self.adamw_eps, self.adamw_weight_decay
        )
        positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        self.trust_ratio = resolve_trust_ratio(self.trust_ratio)
        positive("clip_update_norm", self.clip_update_norm, optional=True)

    @classmethod
    def pick(cls, arguments: dict) -> "LayerwiseSettings":
        """From an optimizer constructor's ``locals()``: the shared arguments, by name."""
        return cls(**{field.name: arguments[field.name] for field in fields(cls)})
