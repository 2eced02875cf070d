"""Capture of layer inputs and output gradients during the normal backward.

Each managed layer's class is swapped for a subclass (as ``torch.nn.utils.parametrize`` does) whose
``forward`` routes the layer through :class:`_NaturalGradientLinear`: an autograd function that
computes the output with the layer's own ``forward`` and, in backward, the input gradient exactly as
``nn.Linear`` would, while the weight and bias receive the natural gradient ``d = Jβ`` instead of
the plain gradient. So the plain weight-gradient matmul is *replaced*, never done twice: no second
backward, no ``vmap`` over the model, and in the shared phase a step costs what a plain backward
costs. A subclass rather than a forward hook: a hook would build the layer's own graph node only to
drop it, and puts every call through ``nn.Module``'s slow path (host time, which bounds a GPU step).
The returned handle's ``remove()`` restores the original class.
"""

from __future__ import annotations

import copyreg
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .layers import is_transposed, layer_parameters

# (layer, x of shape (B, T, i), delta of shape (B, T, o)) -> (d_weight, d_bias); (None, None): the optimizer
# writes .grad itself at the end of the backward
NaturalGradientFn = Callable[["CapturedLayer", torch.Tensor, torch.Tensor], tuple]


@dataclass(eq=False)
class CapturedLayer:
    """What the optimizer knows about one managed layer (no tensors: those live in optimizer state)."""

    name: str
    module: nn.Module
    has_bias: bool
    transposed: bool
    natural_gradient: NaturalGradientFn = field(repr=False)
    is_enabled: Callable[[], bool] = field(repr=False)
    original_class: type = field(repr=False)  # its forward computes the output
    index: int = 0  # position among the optimizer's managed layers
    micro_batches: int = 0  # backward passes through this layer since the last step()
    handle: "CaptureHandle | None" = field(default=None, repr=False)
    params: tuple = field(default=(), repr=False)  # the Fisher block: weight, and bias if trainable

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.module.bias if self.has_bias else None


class _NaturalGradientLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        # Autograd functions run forward without grad: the layer's own forward builds no graph here.
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        ctx.bias_dtype = None if bias is None else bias.dtype
        return layer.original_class.forward(layer.module, x)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        layer: CapturedLayer = ctx.layer
        grad_input = None
        # dtype checks before .to(): on GPUs a step is bound by host time, and a no-op .to() costs
        # a dispatch per call (several per layer).
        if ctx.needs_input_grad[0]:
            w = weight if weight.dtype == grad_output.dtype else weight.to(grad_output.dtype)
            grad_input = grad_output @ (w.T if layer.transposed else w)  # already x's shape
            if grad_input.dtype != x.dtype:
                grad_input = grad_input.to(x.dtype)
        if x.dim() == 3:  # (B, T, i) already: no reshape (a dispatch each on the host)
            x3, delta3 = x, grad_output
        else:
            batch = x.shape[0] if x.dim() > 1 else 1
            x3 = x.reshape(batch, -1, x.shape[-1])
            delta3 = grad_output.reshape(batch, -1, grad_output.shape[-1])
        if torch.is_grad_enabled():  # backward(create_graph=True): the statistics stay out of the graph
            x3, delta3 = x3.detach(), delta3.detach()
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # A backward() called inside an autocast block would run the statistics in bf16/fp16.
            with torch.autocast(device_type=device_type, enabled=False):
                d_weight, d_bias = layer.natural_gradient(layer, x3, delta3)
        else:
            d_weight, d_bias = layer.natural_gradient(layer, x3, delta3)
        if d_weight is None:  # deferred: the optimizer writes .grad when the backward ends
            return grad_input, None, None, None
        if d_weight.dtype != weight.dtype:
            d_weight = d_weight.to(weight.dtype)
        if d_bias is not None and d_bias.dtype != ctx.bias_dtype:
            d_bias = d_bias.to(ctx.bias_dtype)
        return grad_input, d_weight, d_bias, None


# ``Function.apply`` is a Python wrapper (argument binding, functorch checks, 4-5 µs a call: a fifth
# of the host time the capture adds per layer, which bounds a GPU step) that ends in this C call
# whenever no functorch transform is active; under one, the wrapper runs as usual. Private torch
# API: a torch without these names takes the wrapper every time.
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_unwrap_if_dead = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)
_apply_natural_gradient = (
    super(torch.autograd.Function, _NaturalGradientLinear).apply if _transforms_active and _unwrap_if_dead else None
)


def _capturing_forward(self, *args, **kwargs):
    layer: CapturedLayer | None = self.__dict__.get("_fngd_capture")  # None: made as type(layer)(...)
    # Zero overhead in evaluation and generation: nothing is captured or replaced. A call other than
    # layer(x) is left to the layer itself (it then gets its plain gradient, and step() says so).
    if layer is None or len(args) != 1 or kwargs or not (
        self.training and torch.is_grad_enabled() and layer.is_enabled()
    ):
        return self._fngd_original_class.forward(self, *args, **kwargs)
    if self is not layer.module:
        # Only nn.DataParallel's replicas share the layer's __dict__ (copies and pickles are plain layers).
        raise RuntimeError(
            f"{layer.name}: fngd_hf's layer-wise optimizers do not support torch.nn.DataParallel (the Trainer "
            "uses it for several GPUs in one process). Run one process per GPU instead: `accelerate launch` or "
            "`torchrun --nproc_per_node=N`, which the Trainer wraps in DistributedDataParallel."
        )
    weight = self.weight
    if not weight.requires_grad:
        return self._fngd_original_class.forward(self, *args)
    bias = self.bias if layer.has_bias else None
    if _apply_natural_gradient is None or _transforms_active():
        return _NaturalGradientLinear.apply(args[0], weight, bias, layer)
    return _apply_natural_gradient(_unwrap_if_dead(args[0]), weight, bias, layer)


def _reduce_as_original(self, protocol):
    # Pickled or deep-copied, a captured layer is its original class, uncaptured: the capture
    # belongs to the optimizer, not to the model (a copy must not feed this optimizer).
    # copyreg's own reconstructor (what protocols 0 and 1 use): unpickling needs no fngd_hf.
    state = {key: value for key, value in self.__getstate__().items() if key != "_fngd_capture"}
    return copyreg._reconstructor, (self._fngd_original_class, object, None), state


_CAPTURING_CLASSES: dict[type, type] = {}


def _capturing_class(cls: type) -> type:
    """``cls`` with the capturing forward, made once per layer class; same name, so ``repr`` is unchanged."""
    captured = _CAPTURING_CLASSES.get(cls)
    if captured is None:
        captured = type(cls.__name__, (cls,), {
            "forward": _capturing_forward,
            "__reduce_ex__": _reduce_as_original,
            "_fngd_original_class": cls,
            "__qualname__": cls.__qualname__,
            "__module__": cls.__module__,
        })
        _CAPTURING_CLASSES[cls] = captured
    return captured


class CaptureHandle:
    """``remove()`` gives the layer back its original class (a no-op if another optimizer took it over)."""

    def __init__(self, layer: CapturedLayer):
        self.layer = layer

    def remove(self) -> None:
        module = self.layer.module
        if module.__dict__.get("_fngd_capture") is self.layer:
            del module.__dict__["_fngd_capture"]
            module.__class__ = self.layer.original_class


def attach(
    name: str,
    module: nn.Module,
    natural_gradient: NaturalGradientFn,
    is_enabled: Callable[[], bool],
) -> CapturedLayer:
    """Route ``module`` through the capture; the returned layer keeps the handle that undoes it.

    A layer already captured by another optimizer (e.g. an optimizer made again for the same model)
    is taken over, with a warning: from then on only the new optimizer gets its natural gradient.
    """
    previous = module.__dict__.get("_fngd_capture")
    if previous is not None:
        warnings.warn(
            f"{name} was managed by another optimizer; this one takes it over (the other no longer "
            f"gets a natural gradient for it)",
            RuntimeWarning,
            stacklevel=4,
        )
        previous.handle = None
    original_class = type(module) if previous is None else previous.original_class
    has_bias = module.bias is not None and module.bias.requires_grad
    layer = CapturedLayer(
        name=name,
        module=module,
        has_bias=has_bias,
        transposed=is_transposed(module),
        natural_gradient=natural_gradient,
        is_enabled=is_enabled,
        original_class=original_class,
    )
    layer.params = tuple(layer_parameters(module))
    module.__dict__["_fngd_capture"] = layer
    module.__class__ = _capturing_class(original_class)
    layer.handle = CaptureHandle(layer)
    return layer
