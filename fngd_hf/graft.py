"""Grafting: FNGD's direction per layer, AdamW's step length per layer (Agarwal et al., 2020).

``step_length="adamw"``: each managed layer ``L`` moves by the norm AdamW's update would have there, along
FNGD's (momentum) direction::

    Δ_L = -lr · ‖u_L‖ · m_L / ‖m_L‖,    u = m̂_g / (√v̂_g + ε)  (AdamW's update from the plain gradient g)

so "which direction" is the natural gradient's and "how far" is AdamW's, which replaces the trust region.
Costs one plain weight-gradient matmul per managed layer and backward (AdamW's statistics need ``g``;
FNGD's ``.grad`` holds ``d``) and AdamW's two buffers per managed parameter. ``lr`` is then AdamW-scale.
"""

from __future__ import annotations

import torch

from . import functional as F
from .block_norms import layer_norms
from .capture import CapturedLayer
from .runtime import _distributed


def adam_update_lengths(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    betas: tuple[float, float],
    eps: float,
) -> torch.Tensor:
    """Update AdamW's moments in place with ``grads`` and return ``‖m̂/(√v̂+ε)‖`` of each tensor (its
    update per unit learning rate, before weight decay); ``steps``: each tensor's step count, this one included."""
    beta1, beta2 = betas
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    # torch.optim.AdamW's bias corrections: m / (1 - β1^t) over sqrt(v / (1 - β2^t)) + ε, as multi-tensor ops.
    denom = torch._foreach_div(exp_avg_sqs, [1.0 - beta2**step for step in steps])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(update, [1.0 - beta1**step for step in steps])
    return torch.stack(torch._foreach_norm(update))


def graft_factors(
    direction_norms: torch.Tensor, length_norms: torch.Tensor, owner: torch.Tensor, layers: int
) -> torch.Tensor:
    """Per tensor: ``‖u_L‖ / ‖m_L‖`` of its layer ``L``, the norms taken over each layer's tensors together
    (weight and bias form one block, as in the trust region). A layer with no direction moves by nothing."""
    layer_d = layer_norms(direction_norms, owner, layers)
    layer_u = layer_norms(length_norms, owner, layers)
    factor = torch.where(layer_d > 0, layer_u / layer_d.clamp(min=1e-30), torch.zeros_like(layer_u))
    return factor[owner]


class AdamWStepLength:
    """Mixin of :class:`~fngd_hf.FNGD`: the plain gradients of the managed layers and AdamW's moments of them.

    Its state: ``_plain_gradients`` (per managed parameter, the plain gradient summed over this step's
    micro-batches; dropped at every step) and, per managed parameter in ``self.state``, ``graft_exp_avg``,
    ``graft_exp_avg_sq`` and ``graft_step``. What it uses of the optimizer: ``step_length``, ``param_groups``
    and the AdamW part's ``betas``/``eps``.
    """

    def _init_graft(self) -> None:
        self._plain_gradients: dict[torch.Tensor, torch.Tensor] = {}

    @property
    def _grafting(self) -> bool:
        return self.step_length == "adamw"

    def _record_plain_gradient(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor) -> None:
        """Called from the layer's backward, before its natural gradient: add this micro-batch's ``g``."""
        d_weight, d_bias = F.plain_gradient(x, delta, layer.has_bias, layer.transposed)
        for param, grad in zip(layer.params, (d_weight, d_bias)):
            if grad is None:
                continue
            grad = grad.to(param.dtype)
            held = self._plain_gradients.get(param)
            self._plain_gradients[param] = grad if held is None else held.add_(grad)

    def _discard_plain_gradients(self) -> None:
        self._plain_gradients.clear()

    def _graft(self, params: list, directions: list, owner: torch.Tensor, group: dict) -> list:
        """``directions`` (after momentum) rescaled per layer to AdamW's update length."""
        betas, eps = self._adamw_defaults["betas"], self._adamw_defaults["eps"]
        # A parameter whose layer ran no captured forward has its plain gradient in .grad (untagged).
        grads = [self._plain_gradients.get(p, p.grad) for p in params]
        if _distributed():
            grads = _averaged_over_ranks(grads)
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if "graft_exp_avg" not in state:
                state["graft_exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["graft_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["graft_step"] = 0  # a Python int: no device read to bias-correct
            state["graft_step"] += 1
            exp_avgs.append(state["graft_exp_avg"])
            exp_avg_sqs.append(state["graft_exp_avg_sq"])
            steps.append(state["graft_step"])
        grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
        lengths = adam_update_lengths(grads, exp_avgs, exp_avg_sqs, steps, betas, eps)
        direction_norms = torch.stack(torch._foreach_norm(directions))
        dtype = torch.promote_types(torch.promote_types(lengths.dtype, direction_norms.dtype), torch.float32)
        factors = graft_factors(direction_norms.to(dtype), lengths.to(direction_norms.device, dtype), owner,
                                len(self._layers))
        return torch._foreach_mul(directions, [f.to(d.dtype) for f, d in zip(factors.unbind(0), directions)])


def _averaged_over_ranks(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's plain gradients are its own micro-batches': average them as DDP averages ``.grad``."""
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    return [part.view_as(g).to(g.dtype) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
