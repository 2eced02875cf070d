"""Tagged directions: how a layer-wise optimizer hands a natural-gradient direction through ``.grad``.

The backward of a managed layer writes its preconditioned direction (FNGD, CW-NGD, SNGD) into
``.grad``, where a Trainer's or accelerate's global-norm clip and its ``grad_norm`` log would mistake it
for a gradient. So the direction is *tagged* (multiplied by :data:`DIRECTION_TAG`, see there), and a
*probe* of what backward wrote lets ``step()`` notice and undo a uniform rescale of ``.grad`` since
(:meth:`TaggedDirections._external_rescale`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .capture import CapturedLayer
from .runtime import _distributed


logger = logging.getLogger(__name__)


# The .grad of a layer whose backward wrote a direction (FNGD, CW-NGD, SNGD) holds it times this power
# of two, exact in bf16/fp32/fp64. A natural-gradient direction often has norm 1e5-1e7: untagged, a
# stock Trainer's or accelerate's global-norm clip (max_grad_norm=1.0 by default) would shrink every
# parameter by 1e-7 and log that norm as grad_norm. Tagged, the clip and the log see the ordinary
# gradients of the AdamW part only; step() multiplies the tag back out and undoes any clip that
# scaled the directions (see _external_rescale).
DIRECTION_TAG = 2.0 ** -64
# Relative change of the directions between backward and step() below which nothing rescaled them:
# accumulating .grad rounds it (float32: ~1e-7 relative, bf16: ~4e-3) where the probes' own sums do not.
_RESCALE_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2}
_RESCALE_TOLERANCE_DEFAULT = 1e-3


def direction_tag(dtype: torch.dtype) -> float:
    """The tag for ``.grad`` of this dtype: fp16 has too few exponent bits to carry it (1.0: untagged)."""
    return 1.0 if dtype == torch.float16 else DIRECTION_TAG


class TaggedDirections:
    """Mixin of :class:`~fngd_hf.base.LayerwiseOptimizer`: tag, probe and un-rescale the directions.

    Its state (made by :meth:`_init_directions`): ``_probe_written`` (per layer, the probe of the
    directions written since the last ``step()``), ``_probe_vectors`` (the fixed random probe vectors per
    layer and device), ``_rescale`` (this step's undo factor, a device tensor) and ``_rescale_warned``.
    What it uses of the optimizer: ``_writes_directions``, ``_layers`` and the subclass's ``_layer_gradient``.
    """

    # Whether the backward writes a preconditioned direction into .grad (tagged, see DIRECTION_TAG).
    # K-FAC writes the plain gradient and preconditions it in step().
    _writes_directions = True

    def _init_directions(self) -> None:
        self._probe_written: dict[int, torch.Tensor] = {}  # per layer: probe of the directions written since step()
        self._probe_vectors: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._rescale: torch.Tensor | None = None  # this step's undo factor for an external rescale
        self._rescale_warned = False

    def direction(self, param: nn.Parameter) -> torch.Tensor | None:
        """What ``param.grad`` holds, as the optimizer will use it: for a managed layer whose backward ran
        since the last ``step()``, its direction without the tag (see ``DIRECTION_TAG``); else ``.grad``."""
        if param.grad is None or not self._writes_directions:
            return param.grad
        for layer in self._layers:
            if layer.micro_batches and any(param is p for p in layer.params):
                return param.grad / direction_tag(param.dtype)
        return param.grad

    def _capture_gradient(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor):
        """What the capture calls: the subclass's direction, tagged and probed (see :data:`DIRECTION_TAG`)."""
        d_weight, d_bias = self._layer_gradient(layer, x, delta)
        if d_weight is not None and self._writes_directions:
            # In .grad's dtype first, so the probe sees what .grad will hold (bf16 rounds by ~1e-3).
            if d_weight.dtype != layer.weight.dtype:
                d_weight = d_weight.to(layer.weight.dtype)
            if d_bias is not None and d_bias.dtype != layer.bias.dtype:
                d_bias = d_bias.to(layer.bias.dtype)
            self._note_directions(layer, d_weight, d_bias)
        return d_weight, d_bias

    def _note_directions(self, layer: CapturedLayer, d_weight: torch.Tensor, d_bias: torch.Tensor | None) -> None:
        """Record a probe of a direction about to reach ``.grad`` and tag it there (in place: it is ours)."""
        self._record_probe(layer, d_weight, d_bias)
        tag = direction_tag(layer.weight.dtype)
        if tag != 1.0:
            d_weight.mul_(tag)
            if d_bias is not None:
                d_bias.mul_(tag)

    def _record_probe(self, layer: CapturedLayer, d_weight: torch.Tensor, d_bias: torch.Tensor | None) -> None:
        probe = self._probe(layer, d_weight, d_bias)
        written = self._probe_written.get(layer.index)
        self._probe_written[layer.index] = probe if written is None else written + probe

    def _probe(self, layer: CapturedLayer, d_weight: torch.Tensor, d_bias: torch.Tensor | None) -> torch.Tensor:
        """``vᵀ [dW | db] u`` for fixed random ``u``, ``v`` (the same on every rank): linear, so it follows
        accumulation and DDP's averaging of ``.grad``, and a uniform rescale of ``.grad`` scales it too. A
        random probe, not a sum: LayerNorm-ed inputs make the plain sum of a weight gradient nearly 0."""
        key = (layer.index, d_weight.device)
        vectors = self._probe_vectors.get(key)
        if vectors is None:
            out_features, in_features = d_weight.shape[::-1] if layer.transposed else d_weight.shape
            generator = torch.Generator().manual_seed(7919 + layer.index)
            u = torch.randn(in_features + 1, generator=generator, dtype=torch.float64)
            v = torch.randn(out_features, generator=generator, dtype=torch.float64)
            vectors = self._probe_vectors[key] = (u.to(d_weight.device), v.to(d_weight.device))
        u, v = vectors
        weight = d_weight.T if layer.transposed else d_weight
        probe = v @ (weight.to(torch.float64) @ u[:-1])
        if d_bias is not None:
            probe = probe + u[-1] * (v @ d_bias.to(torch.float64))
        return probe

    def _external_rescale(self) -> torch.Tensor | None:
        """``1/c`` if something scaled every direction by ``c`` between backward and ``step()`` (a global
        gradient clip: the stock Trainer's ``max_grad_norm``, ``accelerator.clip_grad_norm_``), else 1;
        ``None`` when no direction was written. A device tensor: no host sync here.

        ``c`` is the least-squares ratio of the probes of ``.grad`` now to those of what backward wrote,
        over all layers (robust to a layer whose probe happens to be near zero)."""
        indices = [i for i in self._probe_written if self._layers[i].weight.grad is not None]
        if not indices:
            return None
        written = torch.stack([self._probe_written[i] for i in indices])
        if _distributed():  # DDP averaged .grad over ranks: average the probes the same way
            torch.distributed.all_reduce(written)
            written = written / torch.distributed.get_world_size()
        now = []
        for i in indices:
            layer = self._layers[i]
            bias = layer.bias.grad if layer.has_bias else None
            now.append(self._probe(layer, layer.weight.grad, bias) / direction_tag(layer.weight.dtype))
        now = torch.stack(now).to(written.device)
        scale = (now * written).sum() / (written * written).sum().clamp(min=1e-300)
        tolerance = max(_RESCALE_TOLERANCE.get(self._layers[i].weight.dtype, _RESCALE_TOLERANCE_DEFAULT) for i in indices)
        rescaled = (scale > 0) & ((scale - 1).abs() > tolerance)
        return torch.where(rescaled, 1.0 / scale.clamp(min=1e-300), torch.ones_like(scale))

    def _warn_rescale(self, undo: float) -> None:
        """Said once (logged, not warned: with the stock Trainer's max_grad_norm this is the expected case)."""
        if undo == 1.0:
            return
        self._rescale_warned = True
        logger.info(
            "%s: the .grad of its layers was scaled by %.4g between backward and step(), e.g. by the Trainer's "
            "max_grad_norm or accelerator.clip_grad_norm_. It holds their natural-gradient direction, not a "
            "gradient, so %s undoes that scale for them (their step is bounded by its per-layer trust region; "
            "clip_update_norm clips it further). The clip still applies to the other parameters, and the logged "
            "grad_norm is theirs.", type(self).__name__, 1.0 / undo, type(self).__name__,
        )
