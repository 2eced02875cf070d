"""CW-NGD: component-wise natural gradient, one Fisher block per output unit of a layer."""

from __future__ import annotations

import torch

from . import functional as F
from .capture import CapturedLayer
from .fngd import FNGD


class CWNGD(FNGD):
    """Component-wise NGD with FNGD's machinery: same arguments, sharing, AdamW for the rest.

    Each output unit ``j`` of a managed layer (row ``j`` of ``[W|b]``) is its own Fisher block.
    Its coefficients ``β⁽ʲ⁾ = (K⁽ʲ⁾ + λB I)⁻¹ 1`` come from the per-unit Gram matrix
    ``K⁽ʲ⁾_nm = B² Σ_{t∈n,s∈m} δ_{t,j} δ_{s,j} (x̂_t·x̂_s)``, so a layer has a ``(B, o)``
    coefficient matrix; the weighted gradient is still one matmul. Relative damping is per
    unit (``λB = γ‖K⁽ʲ⁾‖_F``), and so is the refreshed scale (``tr K⁽ʲ⁾``).

    Usage::

        from fngd_hf import CWNGD
        opt = CWNGD(model, lr=1e-2, damping=0.1, steps_per_epoch=len(train_loader))
    """

    _batchable = False  # one system per output unit: the per-layer path
    _supports_sampled_fisher = False

    def _fresh_coefficients(
        self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor, scale: float, group: dict, tokens=None
    ):
        # The per-unit Gram works on padded per-sample gradients; ``tokens`` only serve the weighted gradient.
        grams = F.unit_gram_matrices(x, delta, layer.has_bias, scale, self.gram_path)
        beta, damping_b, norms = self._damped_solve(grams, group)  # beta: (o, B)
        diagonal = grams.diagonal(dim1=-2, dim2=-1).T  # (B, o): ‖row j of g_n‖²
        return beta.T.contiguous(), diagonal, damping_b, norms

    def _coefficient_shape(self, layer: CapturedLayer) -> tuple[int, ...]:
        return (layer.weight.shape[1 if layer.transposed else 0],)

    def _trace(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
        return F.unit_gram_traces(x, delta, layer.has_bias, scale)

