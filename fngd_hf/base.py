"""What every layer-wise preconditioner here shares: one optimizer, two kinds of param groups.

Groups with ``fngd=True`` hold the weight and bias of managed ``Linear``/``Conv1D`` layers; their
``.grad`` receives a preconditioned direction from the capture (``capture.py``) during backward, and
``step()`` applies trust region, weight decay, momentum and the learning rate. Groups with
``fngd=False`` hold every other trainable parameter and follow ``torch.optim.AdamW`` exactly.
Subclasses (FNGD, CW-NGD, K-FAC, SNGD) only say how a layer's direction is computed.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_update

from .capture import CapturedLayer, attach
from .layers import layer_parameters, select_modules


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps its step counters in this dtype; match it so AdamW groups are bitwise AdamW.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


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
        self._layers: list[CapturedLayer] = [
            attach(name, module, self._layer_gradient, lambda: self._capture_enabled)
            for name, module in modules.items()
        ]
        for index, layer in enumerate(self._layers):
            layer.index = index

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
        return [p for group in self.param_groups if not group["fngd"] for p in group["params"]]

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
                if group["fngd"]:
                    self._managed_group_step(group)
                else:
                    self._adamw_group_step(group)
            self._after_step()
        self._discard_staged()
        self._finite_checks, self._factor_infos = [], []
        for layer in self._layers:
            layer.micro_batches = 0
        self.global_step += 1
        return loss

    def _step_checks(self) -> tuple[bool, bool]:
        """``(finite, factored)`` in one host sync for every gradient and statistic since the last step.

        The norms come from one ``_foreach_norm`` (a handful of kernels, not a few per tensor); a
        norm that overflows float32 (entries around 1e19) also counts as non-finite. ``factored``:
        every solve whose check was deferred to here succeeded.
        """
        tensors = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        tensors += self._finite_checks
        flags = []
        if tensors:
            # stack promotes mixed dtypes (e.g. float64 statistics next to float32 gradients)
            flags.append(torch.stack(torch._foreach_norm(tensors)).isfinite().all())
        if self._factor_infos:
            flags.append(torch.cat([info.reshape(-1) for info in self._factor_infos]).eq(0).all())
        if not flags:
            return True, True
        values = torch.stack([f.to(flags[0].device) for f in flags]).tolist()  # the one sync
        if not self._factor_infos:
            return all(values), True
        return all(values[:-1]), bool(values[-1])

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
            for p in layer.params:
                if p.grad is not None:
                    params.append(p)
                    directions.append(p.grad if factor == 1.0 else p.grad * factor)
                    owner.append(index)
        if not params:
            return
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
            per_layer = torch.zeros(len(self._layers), device=device).index_add_(
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

    def _adamw_group_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__}'s AdamW part does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
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
