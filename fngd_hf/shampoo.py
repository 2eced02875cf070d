"""Shampoo baseline: a maintained library's Shampoo on FNGD's layers, AdamW on the rest.

Shampoo is not implemented here: it comes from ``pytorch-optimizer``
(``pytorch_optimizer.Shampoo``, Gupta et al., 2018), an optional extra::

    pip install "fngd-hf[shampoo]"

:func:`build_shampoo` splits a model exactly as :class:`~fngd_hf.FNGD` does
(:func:`fngd_hf.layers.select_modules`: every ``nn.Linear``/``Conv1D`` except vocabulary heads,
or ``target_modules``): the weights and biases of those layers go to the library's ``Shampoo``,
every other trainable parameter to ``torch.optim.AdamW``. The two are held by
:class:`ShampooAdamW`, a real ``torch.optim.Optimizer`` whose ``param_groups`` are the very group
dicts the two inner optimizers read, so LR schedulers (and the Hugging Face Trainer) act on both;
``state_dict()`` is the ordinary ``torch.optim`` format (loadable with ``weights_only=True``).

The library's ``Shampoo`` (not ``ScalableShampoo``, whose state holds Python objects that
``torch.load(weights_only=True)`` refuses) keeps, per parameter and dimension, the sum of
``G Gᵀ`` (AdaGrad style, initialised at ``matrix_eps·I``) and its inverse ``2k``-th root,
refreshed every ``preconditioning_compute_steps`` steps by an SVD.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from .composite import CompositeOptimizer
from .layers import split_parameters, weight_decay_groups

SHAMPOO_REQUIREMENT = "pytorch-optimizer>=4.1,<5"


def _shampoo_class():
    try:
        from pytorch_optimizer import Shampoo
    except ImportError as error:
        raise ImportError(
            "build_shampoo needs the optional Shampoo dependency (pytorch-optimizer): "
            f"pip install fngd-hf[shampoo]   (or: pip install '{SHAMPOO_REQUIREMENT}')"
        ) from error
    return Shampoo


@contextlib.contextmanager
def _float64_retry_of_failed_inverse_roots():
    """pytorch-optimizer's Shampoo takes inverse roots by a float32 SVD, which can fail to converge on
    an ill-conditioned statistic (seen in the Multi30K benchmark at lr 1e-2) and would end the run
    half-way through a step. While Shampoo steps, a failed root is retried in float64 (the same
    root, more robust); roots that succeed are untouched."""
    import pytorch_optimizer.optimizer.shampoo as module

    original = module.compute_power_svd

    def inverse_root(matrix: torch.Tensor, power: float) -> torch.Tensor:
        try:
            return original(matrix, power)
        except torch.linalg.LinAlgError:
            return original(matrix.double(), power).to(matrix.dtype)

    module.compute_power_svd = inverse_root
    try:
        yield
    finally:
        module.compute_power_svd = original


class ShampooAdamW(CompositeOptimizer):
    """Steps two optimizers as one: Shampoo for the managed layers, AdamW for the rest.

    Groups carry ``"shampoo": True`` or ``False``; see :class:`~fngd_hf.composite.CompositeOptimizer`
    for the shared groups and state and the skipped non-finite steps.
    """

    def __init__(self, shampoo: torch.optim.Optimizer | None, adamw: torch.optim.Optimizer | None):
        self.shampoo, self.adamw = shampoo, adamw
        super().__init__([shampoo, adamw], {})

    def _step_part(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer is self.shampoo:
            with _float64_retry_of_failed_inverse_roots():
                optimizer.step()
        else:
            optimizer.step()


def build_shampoo(
    model: nn.Module,
    lr: float = 1e-3,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    target_modules: Iterable[str] | None = None,
    adamw_lr: float | None = None,
    adamw_betas: tuple[float, float] = (0.9, 0.999),
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float = 0.0,
    *,
    preconditioning_compute_steps: int = 1,
    matrix_eps: float = 1e-6,
    weight_decouple: bool = True,
    adamw_no_decay: Iterable[str] | None = None,
    **shampoo_kwargs,
) -> ShampooAdamW:
    """``pytorch_optimizer.Shampoo`` on the layers FNGD would manage, ``torch.optim.AdamW`` elsewhere.

    ``lr``, ``momentum``, ``weight_decay`` (decoupled unless ``weight_decouple=False``),
    ``preconditioning_compute_steps``, ``matrix_eps`` and any other keyword go to Shampoo;
    ``adamw_*`` to AdamW (``adamw_lr`` defaults to ``lr``; ``adamw_no_decay``: names exempt from its
    weight decay). Raises ``ImportError`` with the
    install command when pytorch-optimizer is missing.
    """
    shampoo_class = _shampoo_class()
    if not isinstance(model, nn.Module):
        raise TypeError(f"build_shampoo takes the model (an nn.Module), got {type(model).__name__}")
    modules, managed, others = split_parameters(model, target_modules)
    if not managed and not others:
        raise ValueError("The model has no trainable parameters")
    shampoo = None
    if managed:
        shampoo = shampoo_class(
            [{"params": managed, "shampoo": True}],
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            weight_decouple=weight_decouple,
            preconditioning_compute_steps=preconditioning_compute_steps,
            matrix_eps=matrix_eps,
            **shampoo_kwargs,
        )
    adamw = None
    if others:
        adamw = torch.optim.AdamW(
            [{"params": params, "shampoo": False, "weight_decay": decay}
             for params, decay in weight_decay_groups(model, others, adamw_weight_decay, adamw_no_decay)],
            lr=lr if adamw_lr is None else adamw_lr,
            betas=tuple(adamw_betas),
            eps=adamw_eps,
            weight_decay=adamw_weight_decay,
        )
    optimizer = ShampooAdamW(shampoo, adamw)
    optimizer.managed_modules = dict(modules)
    return optimizer
