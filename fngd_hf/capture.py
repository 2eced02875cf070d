"""Capture of layer inputs and output gradients during the normal backward.

A forward hook hands the layer's output to :class:`_NaturalGradientLinear`, an autograd
function whose backward computes the input gradient exactly as ``nn.Linear`` would, and
writes the natural gradient ``d = Jβ`` (instead of the plain gradient) to the weight and
bias. So the plain weight-gradient matmul is *replaced*, never done twice: no second
backward, no ``vmap`` over the model, and in the shared phase a step costs what a plain
backward costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .layers import is_transposed

# (layer, x of shape (B, T, i), delta of shape (B, T, o)) -> (d_weight, d_bias)
NaturalGradientFn = Callable[["CapturedLayer", torch.Tensor, torch.Tensor], tuple]


@dataclass(eq=False)
class CapturedLayer:
    """What the optimizer knows about one managed layer (no tensors: those live in optimizer state)."""

    name: str
    module: nn.Module
    has_bias: bool
    transposed: bool
    micro_batches: int = 0  # backward passes through this layer since the last step()
    handle: torch.utils.hooks.RemovableHandle | None = field(default=None, repr=False)

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.module.bias if self.has_bias else None


class _Holder:
    """Passes the already-computed layer output through ``Function.apply`` without making it an input."""

    __slots__ = ("output",)

    def __init__(self, output: torch.Tensor):
        self.output = output


class _NaturalGradientLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, holder, layer, natural_gradient):
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        ctx.natural_gradient = natural_gradient
        ctx.input_shape = x.shape
        return holder.output

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        layer: CapturedLayer = ctx.layer
        grad_input = None
        # dtype checks before .to(): on GPUs a step is bound by host time, and a no-op .to() costs
        # a dispatch per call (several per layer).
        if ctx.needs_input_grad[0]:
            w = weight if weight.dtype == grad_output.dtype else weight.to(grad_output.dtype)
            grad_input = grad_output @ (w.T if layer.transposed else w)
            if grad_input.dtype != x.dtype:
                grad_input = grad_input.to(x.dtype)
            grad_input = grad_input.reshape(ctx.input_shape)
        batch = x.shape[0] if x.dim() > 1 else 1
        x3 = x.reshape(batch, -1, x.shape[-1])
        delta3 = grad_output.reshape(batch, -1, grad_output.shape[-1])
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # A backward() called inside an autocast block would run the statistics in bf16/fp16.
            with torch.autocast(device_type=device_type, enabled=False):
                d_weight, d_bias = ctx.natural_gradient(layer, x3, delta3)
        else:
            d_weight, d_bias = ctx.natural_gradient(layer, x3, delta3)
        if d_weight.dtype != weight.dtype:
            d_weight = d_weight.to(weight.dtype)
        if d_bias is not None and d_bias.dtype != layer.bias.dtype:
            d_bias = d_bias.to(layer.bias.dtype)
        return grad_input, d_weight, d_bias, None, None, None


def attach(
    name: str,
    module: nn.Module,
    natural_gradient: NaturalGradientFn,
    is_enabled: Callable[[], bool],
) -> CapturedLayer:
    """Register the capture hook on ``module``; the returned layer keeps the removable handle."""
    has_bias = module.bias is not None and module.bias.requires_grad
    layer = CapturedLayer(name=name, module=module, has_bias=has_bias, transposed=is_transposed(module))

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor):
        # Zero overhead in evaluation and generation: nothing is captured or replaced.
        if not (mod.training and torch.is_grad_enabled() and is_enabled() and mod.weight.requires_grad):
            return None
        if not args or not isinstance(output, torch.Tensor):
            return None
        x = args[0]
        bias = mod.bias if has_bias else None
        # The layer's own graph node is dropped: our function computes both gradients.
        return _NaturalGradientLinear.apply(
            x, mod.weight, bias, _Holder(output.detach()), layer, natural_gradient
        )

    layer.handle = module.register_forward_hook(hook)
    return layer
