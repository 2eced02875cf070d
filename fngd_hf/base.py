"""What every layer-wise preconditioner here shares: one optimizer, two kinds of param groups.

Groups with ``fngd=True`` hold the weight and bias of managed ``Linear``/``Conv1D`` layers; their
``.grad`` receives a preconditioned direction from the capture (``capture.py``) during backward, and
``step()`` applies trust region, weight decay, momentum and the learning rate. Groups with
``fngd=False`` hold every other trainable parameter and follow ``torch.optim.AdamW`` exactly.
Subclasses (FNGD, CW-NGD, K-FAC, SNGD) only say how a layer's direction is computed.
"""

from __future__ import annotations

import logging
import warnings
from typing import Iterable

import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_update

from .capture import CapturedLayer, attach
from .layers import layer_parameters, select_modules


logger = logging.getLogger(__name__)


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps its step counters in this dtype; match it so AdamW groups are bitwise AdamW.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


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


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _in_accelerate_loop() -> bool:
    """Whether batches come from an ``accelerate``-prepared dataloader now (the HF Trainer's, or an
    accelerate loop): there the loss of each micro-batch is scaled by code FNGD does not see."""
    try:
        from accelerate.state import GradientState
    except ImportError:  # accelerate is a dependency, but the optimizer itself does not need it
        return False
    if not GradientState._shared_state:  # no Accelerator made in this process
        return False
    return GradientState().active_dataloader is not None


def _process_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"Invalid {name}: {value} (a positive integer)")
    return int(value)


def weight_decay_groups(
    model: nn.Module, params: list[nn.Parameter], weight_decay: float, no_decay: Iterable[str] | None
) -> list[tuple[list[nn.Parameter], float]]:
    """``[(params, weight_decay), (exempt params, 0.0)]``, or one pair (in model order, the checkpoint
    layout) when nothing is exempt or the decay is 0; empty lists are left out.

    ``no_decay`` holds names from ``model.named_parameters()``. Names of parameters outside ``params``
    (e.g. the managed layers' biases, which the natural-gradient part handles with its own
    ``weight_decay``) are accepted and ignored; unknown names are an error.
    """
    exempt_ids: set[int] = set()
    if no_decay is not None:
        if isinstance(no_decay, str):
            raise ValueError(f"adamw_no_decay takes a list of parameter names, got the string {no_decay!r}")
        known = dict(model.named_parameters())
        names = list(no_decay)
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(
                f"adamw_no_decay names {len(unknown)} parameter(s) the model does not have: {unknown[:5]}; "
                f"names look like {list(known)[:3]}"
            )
        exempt_ids = {id(known[name]) for name in names}
    exempt = [p for p in params if id(p) in exempt_ids]
    if weight_decay == 0.0 or not exempt:
        return [(list(params), weight_decay)] if params else []
    decayed = [p for p in params if id(p) not in exempt_ids]
    return [(group, decay) for group, decay in ((decayed, weight_decay), (exempt, 0.0)) if group]


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base class: capture, AdamW groups, the step skeleton and its safeguards, extra state."""

    name = "layerwise"
    # Whether the backward writes a preconditioned direction into .grad (tagged, see DIRECTION_TAG).
    # K-FAC writes the plain gradient and preconditions it in step().
    _writes_directions = True
    # torch.amp.GradScaler then hands its scale to step() (as `grad_scale`) instead of unscaling
    # .grad itself, which lets step() refuse: the scaled output gradients already entered K.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        target_modules: Iterable[str] | None,
        adamw_lr: float | None,
        adamw_betas: tuple[float, float],
        adamw_eps: float,
        adamw_weight_decay: float,
        adamw_no_decay: Iterable[str] | None = None,
        gradient_accumulation_steps: int,
        trust_ratio: float | None,
        clip_update_norm: float | None,
        group_options: dict,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model (an nn.Module), got {type(model).__name__}: it finds the "
                f"layers to manage itself. With a Trainer pass optimizers=({type(self).__name__}(model, ...), None) "
                f"(optimizer_cls_and_kwargs hands an optimizer only the parameters) or use FNGDTrainer."
            )
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        adamw_lr = lr if adamw_lr is None else adamw_lr
        if not adamw_lr > 0.0:
            raise ValueError(f"Invalid adamw_lr: {adamw_lr}")
        if len(adamw_betas) != 2 or not all(0.0 <= b < 1.0 for b in adamw_betas):
            raise ValueError(f"Invalid adamw_betas: {adamw_betas}")
        if not adamw_eps >= 0.0:
            raise ValueError(f"Invalid adamw_eps: {adamw_eps}")
        if adamw_weight_decay < 0.0:
            raise ValueError(f"Invalid adamw_weight_decay: {adamw_weight_decay}")
        if trust_ratio is not None and not trust_ratio > 0.0:
            raise ValueError(f"Invalid trust_ratio: {trust_ratio}")
        if clip_update_norm is not None and not clip_update_norm > 0.0:
            raise ValueError(f"Invalid clip_update_norm: {clip_update_norm}")

        modules = select_modules(model, target_modules)
        managed = [p for m in modules.values() for p in layer_parameters(m)]
        managed_ids = {id(p) for p in managed}
        # model.parameters() already yields a tied parameter once.
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in managed_ids]

        groups = []
        if managed:
            groups.append(
                dict(
                    params=managed,
                    fngd=True,
                    lr=lr,
                    momentum=momentum,
                    weight_decay=weight_decay,
                    trust_ratio=trust_ratio,
                    **group_options,
                )
            )
        for params, decay in weight_decay_groups(model, others, adamw_weight_decay, adamw_no_decay):
            groups.append(
                dict(params=params, fngd=False, lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps, weight_decay=decay)
            )
        if not groups:
            raise ValueError("The model has no trainable parameters")
        super().__init__(groups, dict(lr=lr))

        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.clip_update_norm = clip_update_norm
        self._adamw_defaults = dict(betas=tuple(adamw_betas), eps=adamw_eps, lr_ratio=adamw_lr / lr)
        self.global_step = 0
        self.skipped_steps = 0
        self._capture_enabled = True
        # Checked once in step(), in the host sync it makes anyway: statistics that must be finite,
        # and the Cholesky `info` of solves whose check was deferred (0 = factored).
        self._finite_checks: list[torch.Tensor] = []
        self._factor_infos: list[torch.Tensor] = []
        self._bypassed_warned: set[str] = set()
        self._trust_clipped: torch.Tensor | float = 0.0  # sum over steps of the share of layers the trust region shrank
        self._trust_steps = 0
        self._owner_index_cache: tuple | None = None  # (key, (owner index, elements per layer)) on the device
        self._restore_after_load: dict | None = None  # this rank's own statistics for the next load_state_dict
        # Who declared how each micro-batch loss was scaled under accumulation: "constructor" (the caller
        # passed gradient_accumulation_steps), or an integration (FNGDTrainer, attach_accelerator).
        self.accumulation_declared_by = "constructor" if gradient_accumulation_steps != 1 else None
        self._probe_written: dict[int, torch.Tensor] = {}  # per layer: probe of the directions written since step()
        self._probe_vectors: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._rescale: torch.Tensor | None = None  # this step's undo factor for an external rescale
        self._rescale_warned = False
        self._layers: list[CapturedLayer] = [
            attach(name, module, self._capture_gradient, self._capturing)
            for name, module in modules.items()
        ]
        for index, layer in enumerate(self._layers):
            layer.index = index

    @classmethod
    def factory(cls):
        """For transformers' ``Trainer(optimizer_cls_and_kwargs=(FNGD.factory, {"lr": 1e-2, ...}))``: the
        Trainer calls ``factory()(model, **kwargs)`` for anything that is not an optimizer class (its
        Muon/Dion path), which hands the optimizer the model instead of its parameters."""
        return cls

    # ----------------------------------------------------------------------------- settings
    @property
    def gradient_accumulation_steps(self) -> int:
        return self._accumulation

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, value: int) -> None:
        self._accumulation = _positive_int("gradient_accumulation_steps", value)

    @property
    def managed_modules(self) -> dict[str, nn.Module]:
        return {layer.name: layer.module for layer in self._layers}

    def adamw_parameters(self) -> list[nn.Parameter]:
        """The parameters AdamW updates: the ones whose ``.grad`` is an ordinary gradient (e.g. for
        ``accelerator.clip_grad_norm_``; the managed layers' ``.grad`` is the natural-gradient direction)."""
        return [p for group in self.param_groups if not group["fngd"] or self._managed_by_adamw() for p in group["params"]]

    def _managed_by_adamw(self) -> bool:
        """Whether the managed layers are trained by AdamW on their plain gradient now (FNGD's
        ``shared_phase="adamw"`` after the first epoch)."""
        return False

    def _capturing(self) -> bool:
        """Whether the managed layers' backward computes directions now (train mode, not handed to AdamW)."""
        return self._capture_enabled and not self._managed_by_adamw()

    def direction(self, param: nn.Parameter) -> torch.Tensor | None:
        """What ``param.grad`` holds, as the optimizer will use it: for a managed layer whose backward ran
        since the last ``step()``, its direction without the tag (see ``DIRECTION_TAG``); else ``.grad``."""
        if param.grad is None or not self._writes_directions:
            return param.grad
        for layer in self._layers:
            if layer.micro_batches and any(param is p for p in layer.params):
                return param.grad / direction_tag(param.dtype)
        return param.grad

    def train(self, mode: bool = True) -> "LayerwiseOptimizer":
        """Capture on (HF Trainer and accelerate call this before training steps)."""
        self._capture_enabled = bool(mode)
        return self

    def eval(self) -> "LayerwiseOptimizer":
        """Capture off: evaluation and ``generate()`` pay nothing."""
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also forget what the backward passes since the last ``step()`` staged (counts, statistics).

        ``backward(); zero_grad(); backward(); step()`` must give the step of the last backward only.
        """
        super().zero_grad(set_to_none=set_to_none)
        self._discard_staged()
        self._finite_checks, self._factor_infos = [], []
        self._probe_written.clear()
        for layer in self._layers:
            layer.micro_batches = 0

    def remove_hooks(self) -> None:
        """Detach from the model (the layers get their original class back): managed layers then get
        their plain gradient, and ``step()`` applies it with this optimizer's momentum, trust region
        and learning rate (it is no longer a natural gradient)."""
        for layer in self._layers:
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None

    # ------------------------------------------------------------------ subclass interface
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

    def _layer_gradient(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor):
        """Backward-time direction ``(d_weight, d_bias)`` of one micro-batch; ``x``: (B, T, i), ``delta``: (B, T, o)."""
        raise NotImplementedError

    def _check_ready(self) -> None:
        """Raise before anything changes if the optimizer cannot step (e.g. missing settings)."""

    def _accumulation_correction(self, layer: CapturedLayer, group: dict) -> float:
        """Factor applied to ``.grad`` when the observed micro-batch count differs from the declared one."""
        observed = layer.micro_batches
        return 1.0 if observed in (0, self._accumulation) else self._accumulation / observed

    def _after_step(self) -> None:
        """Commit what the backward staged (called only for steps that were applied)."""

    def _discard_staged(self) -> None:
        """Forget what the backward staged (called after every step, applied or skipped)."""

    def trust_region_diagnostics(self, prefix: str = "fngd") -> dict[str, float]:
        """Share of (layer, step) pairs whose update the trust region shrank since the last call; then reset."""
        if not self._trust_steps:
            return {}
        clipped = float(self._trust_clipped) / self._trust_steps
        self._trust_clipped, self._trust_steps = 0.0, 0
        return {f"{prefix}/trust_clipped": clipped}

    def _note_finite(self, tensor: torch.Tensor) -> None:
        """``step()`` skips unless ``tensor`` is finite (checked there, with the gradients: no kernel here)."""
        self._finite_checks.append(tensor)

    def _note_factored(self, info: torch.Tensor) -> None:
        """Cholesky ``info`` of a solve whose success ``step()`` checks (no host sync in backward)."""
        self._factor_infos.append(info)

    def _solve_failed(self) -> None:
        """A deferred-check solve failed: the step is skipped; subclasses switch to checked solves."""

    def _extra_state(self) -> dict:
        return {}

    def _forget_cached_state(self) -> None:
        """Drop host-side copies of optimizer state (the state was just replaced)."""

    def _load_extra_state(self, extra: dict) -> None:
        pass

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self, "grad_scale", None) is not None:
            raise ValueError(
                f"{type(self).__name__} does not support fp16 with a GradScaler: the loss scale multiplies the output "
                "gradients its statistics are built from, and skipped steps would leave them half-accumulated. "
                "Use bf16 autocast (statistics stay float32) or float32."
            )
        self._check_ready()
        self._check_accumulation()
        self._rescale = self._external_rescale() if self._writes_directions else None
        finite, factored = self._step_checks()
        if finite and not factored:
            self.skipped_steps += 1
            self._solve_failed()
        elif not finite:
            self.skipped_steps += 1
            # Warn on the 1st, 2nd, 4th, 8th ... skip: visible without flooding the log.
            if self.skipped_steps & (self.skipped_steps - 1) == 0:
                warnings.warn(
                    f"{type(self).__name__} skipped step {self.global_step}: non-finite gradients or "
                    f"coefficients. Parameters, momentum and statistics are unchanged "
                    f"({self.skipped_steps} skipped so far).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            for group in self.param_groups:
                if group["fngd"] and self._managed_by_adamw():
                    self._adamw_group_step(self._adamw_settings_for(group))
                elif group["fngd"]:
                    self._managed_group_step(group)
                else:
                    self._adamw_group_step(group)
            self._after_step()
        self._discard_staged()
        self._finite_checks, self._factor_infos = [], []
        self._probe_written.clear()
        self._rescale = None
        for layer in self._layers:
            layer.micro_batches = 0
        self.global_step += 1
        return loss

    def _check_accumulation(self) -> None:
        """Refuse, before anything changes, an accumulated step whose loss scale nobody declared.

        A stock Trainer divides each micro-batch loss by the accumulation count for some models and not
        for others (transformers 5: not for BART, Marian or T5, which ignore ``num_items_in_batch``), and
        with relative damping the step scales like 1/(loss scale): a silently wrong step, so an error."""
        counts = [layer.micro_batches for layer in self._layers if layer.micro_batches]
        if not counts or min(counts) < 2 or self.accumulation_declared_by not in (None, "constructor"):
            return
        if _in_accelerate_loop():
            raise ValueError(
                f"{type(self).__name__} got {min(counts)} backward passes before step(): gradient accumulation "
                f"under a Trainer or an accelerate loop. Its step depends on how each micro-batch loss was "
                f"scaled, which that loop decides per model (transformers 5 does not divide the loss of BART, "
                f"Marian or T5 by gradient_accumulation_steps). Use fngd_hf.FNGDTrainer, which scales the loss "
                f"itself; in an accelerate loop call fngd_hf.attach_accelerator(accelerator, optimizer); or set "
                f"gradient_accumulation_steps=1 with a larger per_device_train_batch_size."
            )

    def _step_checks(self) -> tuple[bool, bool]:
        """``(finite, factored)`` in one host sync for every gradient and statistic since the last step.

        The norms come from one ``_foreach_norm`` (a handful of kernels, not a few per tensor); a
        norm that overflows float32 (entries around 1e19) also counts as non-finite. ``factored``:
        every solve whose check was deferred to here succeeded. The same sync reads whether the
        directions were rescaled since backward (warned once).
        """
        tensors = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        tensors += self._finite_checks
        flags = []
        if tensors:
            # stack promotes mixed dtypes (e.g. float64 statistics next to float32 gradients)
            flags.append(torch.stack(torch._foreach_norm(tensors)).isfinite().all())
        if self._factor_infos:
            flags.append(torch.cat([info.reshape(-1) for info in self._factor_infos]).eq(0).all())
        watch_rescale = self._rescale is not None and not self._rescale_warned
        if watch_rescale:
            flags.append(self._rescale)
        if not flags:
            return True, True
        values = torch.stack([f.to(flags[0].device, torch.float64) for f in flags]).tolist()  # the one sync
        if watch_rescale:
            self._warn_rescale(values.pop())
        if not self._factor_infos:
            return all(values), True
        return all(values[:-1]), bool(values[-1])

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

    def _managed_group_step(self, group: dict) -> None:
        """Trust region, weight decay, momentum, update clip and ``p -= lr·d``, as ``_foreach`` ops."""
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        ratio = group["trust_ratio"]
        params, directions, owner = [], [], []
        self._check_backward_counts()
        for index, layer in enumerate(self._layers):
            if layer.micro_batches == 0 and layer.name not in self._bypassed_warned and any(
                p.grad is not None for p in layer.params
            ):
                # e.g. nn.MultiheadAttention calls F.linear on out_proj's weight: its forward never runs.
                self._bypassed_warned.add(layer.name)
                warnings.warn(
                    f"{layer.name} got a gradient without running its forward (its weight is used directly), "
                    f"so it is updated with its plain gradient; leave it out with target_modules.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            factor = self._accumulation_correction(layer, group)
            if layer.micro_batches and self._writes_directions:
                factor /= direction_tag(layer.weight.dtype)
            for p in layer.params:
                if p.grad is not None:
                    params.append(p)
                    directions.append(p.grad if factor == 1.0 else p.grad * factor)
                    owner.append(index)
        if not params:
            return
        if self._rescale is not None:
            directions = torch._foreach_mul(directions, self._rescale.to(directions[0].dtype))
        if ratio is not None:
            # Trust region: ‖d‖ <= ratio·‖[W|b]‖ per layer (weight and bias together), so a step moves a
            # layer by at most lr·ratio of its norm before momentum; lr and its schedule still apply.
            direction_norms = torch.stack(torch._foreach_norm(directions)).float()
            owner_index, layer_size = self._owner_index(owner, [p.numel() for p in params], direction_norms.device)
            param_norms = torch.stack(torch._foreach_norm(params)).float()
            layers = len(self._layers)
            layer_d = direction_norms.new_zeros(layers).index_add_(0, owner_index, direction_norms.square()).sqrt_()
            layer_p = direction_norms.new_zeros(layers).index_add_(0, owner_index, param_norms.square()).sqrt_()
            # A layer whose weights are all zero (zero-initialised) has no norm to keep: it borrows the
            # RMS weight of the other layers, times the square root of its own size.
            live = layer_p > 0
            rms = (layer_p.square().sum() / (layer_size * live).sum().clamp(min=1.0)).sqrt()
            reference = torch.where(live, layer_p, rms * layer_size.sqrt())
            shrink = torch.clamp(ratio * reference / layer_d.clamp(min=1e-30), max=1.0)
            shrink = torch.where(reference > 0, shrink, torch.ones_like(shrink))  # every layer zero: no scale
            scales = shrink[owner_index]
            factors = scales.unbind(0)
            if any(d.dtype != scales.dtype for d in directions):
                factors = [s.to(d.dtype) for s, d in zip(factors, directions)]
            directions = torch._foreach_mul(directions, list(factors))
            # Kept as a tensor (no host sync); trust_region_diagnostics() reads it.
            self._trust_clipped = self._trust_clipped + (shrink < 1.0).float().mean()
            self._trust_steps += 1
        if weight_decay != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        if momentum != 0.0:
            buffers, old_buffers, old_directions = [], [], []
            for p, d in zip(params, directions):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.detach().clone()
                else:
                    old_buffers.append(state["momentum_buffer"])
                    old_directions.append(d)
                buffers.append(state["momentum_buffer"])
            if old_buffers:
                torch._foreach_mul_(old_buffers, momentum)
                torch._foreach_add_(old_buffers, old_directions)
            directions = buffers
        if self.clip_update_norm is not None:
            # Clip the applied update lr·(momentum buffer) to a global norm; the buffer itself is kept.
            step_norm = lr * torch.linalg.vector_norm(torch.stack(torch._foreach_norm(directions)).float())
            factor = torch.clamp(self.clip_update_norm / step_norm.clamp(min=1e-30), max=1.0)
            directions = torch._foreach_mul(directions, factor.to(directions[0].dtype))
        torch._foreach_add_(params, directions, alpha=-lr)

    def _owner_index(self, owner: list[int], sizes: list[int], device: torch.device):
        """``(owner as a device tensor, elements per layer)``, copied to the device once, not at every step."""
        key = (tuple(owner), tuple(sizes), device)
        cached = self._owner_index_cache
        if cached is None or cached[0] != key:
            index = torch.tensor(owner, device=device)
            # float32 whatever the default dtype (a float64 default must not meet float32 sizes here)
            per_layer = torch.zeros(len(self._layers), dtype=torch.float32, device=device).index_add_(
                0, index, torch.tensor(sizes, dtype=torch.float32, device=device)
            )
            self._owner_index_cache = cached = (key, (index, per_layer))
        return cached[1]

    def _check_backward_counts(self) -> None:
        """A layer called twice per forward (a shared layer) gets two backward passes per micro-batch."""
        counts = {layer.name: layer.micro_batches for layer in self._layers if layer.micro_batches}
        if len(set(counts.values())) <= 1:
            return
        most = max(counts.values())
        odd = sorted(name for name, count in counts.items() if count == most and name not in self._bypassed_warned)
        if odd:
            self._bypassed_warned.update(odd)
            warnings.warn(
                f"{', '.join(odd)} got {most} backward passes in this step, other managed layers "
                f"{min(counts.values())}: a layer called more than once per forward (shared weights) is "
                f"treated as that many micro-batches, which is not its natural gradient; leave it out with "
                f"target_modules.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _adamw_settings_for(self, group: dict) -> dict:
        """The managed layers' group as AdamW runs it: the AdamW part's (scheduled) rate and constants,
        the layers' own weight decay."""
        adamw = next((g for g in self.param_groups if not g["fngd"]), None)
        if adamw is None:  # a model of managed layers only: the AdamW rate relative to lr, as set at construction
            return dict(group, betas=self._adamw_defaults["betas"], eps=self._adamw_defaults["eps"],
                        lr=group["lr"] * self._adamw_defaults["lr_ratio"])
        return dict(params=group["params"], lr=adamw["lr"], betas=adamw["betas"], eps=adamw["eps"],
                    weight_decay=group["weight_decay"])

    def _adamw_group_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__}'s AdamW part does not support sparse gradients")
            state = self.state[p]
            if "exp_avg" not in state:  # new, or a managed layer handed to AdamW (its state holds other keys)
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw_update(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )

    # -------------------------------------------------------------------------- state dict
    # Per-layer statistics whose dtype must survive torch.optim's cast to the parameter dtype.
    _float32_state_keys: tuple[str, ...] = ()

    def _holds_rank_local_state(self) -> bool:
        """Whether this rank holds statistics of its own (from its own micro-batches) that other ranks lack."""
        keys = self._float32_state_keys
        return any(key in state for state in self.state.values() for key in keys)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["layerwise"] = {
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "gradient_accumulation_steps": self._accumulation,
            "process_rank": _process_rank(),  # whose rank-local statistics these are
            **self._extra_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("layerwise", None)
        keep = self._float32_state_keys
        # torch.optim casts floating state to the parameter dtype; statistics keep their own.
        kept = {i: {k: v[k] for k in keep if k in v} for i, v in state_dict["state"].items()}
        state_dict["state"] = {i: {k: x for k, x in v.items() if k not in keep} for i, v in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        self._put_statistics(kept)
        if extra is not None:
            self.global_step = int(extra["global_step"])
            self.skipped_steps = int(extra["skipped_steps"])
            self.gradient_accumulation_steps = extra.get("gradient_accumulation_steps", 1)
            self._load_extra_state(extra)
        # This rank's own statistics, read from its rank file before the main rank's optimizer state was
        # loaded (FNGDTrainer, fngd_hf.attach_accelerator): they replace the main rank's now.
        own, self._restore_after_load = self._restore_after_load, None
        if own is not None:
            self._put_statistics(own)
        elif extra is not None and extra.get("process_rank", 0) != _process_rank() and self._holds_rank_local_state():
            warnings.warn(
                f"rank {_process_rank()} loaded the optimizer state saved by rank {extra.get('process_rank', 0)}, so it "
                f"continues with that rank's {type(self).__name__} statistics and the run differs from the saved "
                f"one. FNGDTrainer keeps each rank's own (fngd_coefficients_rank{{r}}.pt); in an accelerate loop call "
                f"fngd_hf.attach_accelerator(accelerator, optimizer) before save_state()/load_state().",
                RuntimeWarning,
                stacklevel=2,
            )
        self._forget_cached_state()

    def _put_statistics(self, saved: dict[int, dict[str, torch.Tensor]]) -> None:
        """Write ``{parameter index: {key: tensor}}`` statistics into the state, each on its parameter's device."""
        params = [p for group in self.param_groups for p in group["params"]]
        if any(int(index) >= len(params) for index in saved):
            raise ValueError(
                f"the saved statistics name parameter {max(int(i) for i in saved)}, but this optimizer has "
                f"{len(params)} parameters: they were saved for another model or another target_modules"
            )
        for index, tensors in saved.items():
            param = params[int(index)]
            for key, value in tensors.items():
                self.state[param][key] = value.to(param.device)
