"""Muon baseline: torch's own ``torch.optim.Muon`` on the weights of FNGD's layers, AdamW on the rest.

Muon is not implemented here. :class:`MuonHybrid` splits a model exactly as :class:`~fngd_hf.FNGD`
does (:func:`fngd_hf.layers.select_modules`: every ``nn.Linear``/``Conv1D`` except vocabulary heads,
or ``target_modules``): the 2-D weights of those layers go to ``torch.optim.Muon``; their biases and
every other trainable parameter (embeddings, LayerNorm, a tied output head) to ``torch.optim.AdamW``.
Groups carry ``"use_muon": True`` or ``False``.

The two inner optimizers are real torch optimizers whose group dicts *are* this optimizer's
``param_groups`` and whose ``state`` is this optimizer's ``state``, so an LR scheduler (and the
Hugging Face Trainer) acts on both, each part's update is bit for bit that of torch's class, and
``state_dict()`` is the ordinary ``torch.optim`` format (loadable with ``weights_only=True``).

What ``lr`` means: with ``adjust_lr_fn="match_rms_adamw"`` (the default here; ``None`` selects it)
torch scales Muon's step on an ``A×B`` weight to ``0.2·lr·sqrt(max(A, B))``, which gives the
orthogonalised update the RMS of a typical AdamW update (Liu et al., 2025, "Muon is Scalable for LLM
Training"). So ``lr`` is an AdamW-scale learning rate: Muon runs at AdamW's rate, and the AdamW part
uses the same rate unless ``adamw_lr`` is given. With ``adjust_lr_fn="original"`` (Keller Jordan's
scale, ``lr·sqrt(max(1, A/B))``) ``lr`` is Muon's own, typically 0.02, and ``adamw_lr`` should then be
set to an AdamW rate. Note that torch's Muon reads a weight's shape as stored: a transformers
``Conv1D`` stores ``(in, out)``, so under "original" its ``A/B`` is the inverse of an ``nn.Linear``'s;
"match_rms_adamw" is symmetric in ``A`` and ``B`` and unaffected.

Requires a torch with ``torch.optim.Muon`` (2.9 or later).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from . import settings
from .composite import CompositeOptimizer
from .layers import split_parameters, weight_decay_groups

ADJUST_LR_FNS = ("original", "match_rms_adamw")
DEFAULT_ADJUST_LR_FN = "match_rms_adamw"


def _muon_class():
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        raise ImportError(f"MuonHybrid needs torch.optim.Muon (torch 2.9 or later); this is torch {torch.__version__}")
    return muon


class MuonHybrid(CompositeOptimizer):
    """``torch.optim.Muon`` on the 2-D weights of the layers FNGD manages, ``torch.optim.AdamW`` on the rest.

    Args:
        model: the model (an ``nn.Module``); the split is made from its modules.
        lr: Muon's learning rate; with the default ``adjust_lr_fn`` an AdamW-scale rate (see the module
            docstring). Also the AdamW part's rate unless ``adamw_lr`` is given.
        momentum, nesterov: Muon's momentum (``0 <= momentum < 1``) and Nesterov switch (torch's defaults).
        weight_decay: Muon's decoupled weight decay (``param *= 1 - lr·weight_decay``).
        adjust_lr_fn: ``"match_rms_adamw"`` (default; ``None`` means the same) or ``"original"``.
        target_modules: which layers, as for FNGD (default: every Linear/Conv1D but vocabulary heads).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW part (``adamw_lr`` defaults to ``lr``).
        adamw_no_decay: names from ``model.named_parameters()`` exempt from the AdamW part's weight decay.

    ``self.muon`` and ``self.adamw`` are the inner optimizers (``None`` when a part is empty);
    ``self.managed_modules`` the layers whose weights Muon steps. ``add_param_group`` is not supported.
    """

    @classmethod
    def factory(cls):
        """For ``Trainer(optimizer_cls_and_kwargs=(MuonHybrid.factory, kwargs))``: transformers 5 calls
        ``factory()(model, **kwargs)`` for anything that is not an optimizer class."""
        return cls

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        adjust_lr_fn: str | None = None,
        target_modules: Iterable[str] | None = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        *,
        adamw_no_decay: Iterable[str] | None = None,
    ):
        muon_class = _muon_class()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"MuonHybrid takes the model (an nn.Module), got {type(model).__name__}: it finds the layers "
                f"to hand to Muon itself. With a Trainer pass optimizers=(MuonHybrid(model, ...), None)."
            )
        settings.positive("lr", lr, finite=True)
        settings.fraction("momentum", momentum, finite=True)
        settings.non_negative("weight_decay", weight_decay, finite=True)
        if not isinstance(nesterov, bool):
            raise ValueError(f"Invalid nesterov: {nesterov!r} (True or False)")
        adjust_lr_fn = settings.one_of("adjust_lr_fn", DEFAULT_ADJUST_LR_FN if adjust_lr_fn is None else adjust_lr_fn,
                                       ADJUST_LR_FNS)
        adamw_lr, betas = settings.adamw_part(lr, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, finite=True)

        # Muon takes matrices only: the layers' biases go to AdamW. A weight shared by two layers once.
        modules, weights, others = split_parameters(model, target_modules, matrices_only=True)
        adamw_groups = weight_decay_groups(model, others, adamw_weight_decay, adamw_no_decay)
        if not weights and not others:
            raise ValueError("The model has no trainable parameters")

        self.muon = None
        if weights:
            self.muon = muon_class(
                [{"params": weights, "use_muon": True}],
                lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn,
            )
        self.adamw = None
        if adamw_groups:
            self.adamw = torch.optim.AdamW(
                [{"params": params, "use_muon": False, "weight_decay": decay} for params, decay in adamw_groups],
                lr=adamw_lr, betas=betas, eps=adamw_eps, weight_decay=adamw_weight_decay,
            )
        super().__init__([self.muon, self.adamw], dict(lr=lr))  # "lr" is in every group: the defaults add nothing
        self.managed_modules = dict(modules)

    def _check_loaded_groups(self, saved_groups: list[dict]) -> None:
        flags = [bool(g.get("use_muon")) for g in saved_groups]
        if flags != [bool(g["use_muon"]) for g in self.param_groups]:
            raise ValueError(
                f"the loaded state dict's groups (use_muon {flags}) do not match this optimizer's "
                f"({[g['use_muon'] for g in self.param_groups]}): it was saved for another model, "
                f"target_modules or adamw_no_decay"
            )


def build_muon(model: nn.Module, **kwargs) -> MuonHybrid:
    """``MuonHybrid(model, **kwargs)``: Muon on FNGD's layers' weights, AdamW elsewhere (see :class:`MuonHybrid`)."""
    return MuonHybrid(model, **kwargs)
