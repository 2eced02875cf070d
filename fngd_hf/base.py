"""What every layer-wise preconditioner here shares: one optimizer, two kinds of param groups.

Groups with ``fngd=True`` hold the weight and bias of managed ``Linear``/``Conv1D`` layers; their
``.grad`` receives a preconditioned direction from the capture (``capture.py``) during backward, and
``step()`` applies trust region, weight decay, momentum and the learning rate. Groups with
``fngd=False`` hold every other trainable parameter and follow ``torch.optim.AdamW`` exactly.
Subclasses (FNGD, CW-NGD, K-FAC, SNGD) only say how a layer's direction is computed.
"""

from __future__ import annotations

import warnings
import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_update

from .block_norms import layer_norms
from .capture import CapturedLayer, attach
from .directions import TaggedDirections, direction_tag
from .layers import split_parameters, weight_decay_groups
from .runtime import _in_accelerate_loop, closure_loss, warn_skipped
from .settings import LayerwiseSettings, positive_int
from .state import LayerwiseState


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps its step counters in this dtype; match it so AdamW groups are bitwise AdamW.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class LayerwiseOptimizer(TaggedDirections, LayerwiseState, torch.optim.Optimizer):
    """Base class: capture, AdamW groups, the step skeleton and its safeguards.

    The tagged directions (:mod:`fngd_hf.directions`) and the ``state_dict`` (:mod:`fngd_hf.state`) are
    its mixins."""

    name = "layerwise"
    # torch.amp.GradScaler then hands its scale to step() (as `grad_scale`) instead of unscaling
    # .grad itself, which lets step() refuse: the scaled output gradients already entered K.
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, settings: LayerwiseSettings, group_options: dict):
        """``settings``: what every layer-wise optimizer takes; ``group_options``: the method's own
        entries of the managed layers' param group (e.g. ``damping``)."""
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model (an nn.Module), got {type(model).__name__}: it finds the "
                f"layers to manage itself. With a Trainer pass optimizers=({type(self).__name__}(model, ...), None) "
                f"(optimizer_cls_and_kwargs hands an optimizer only the parameters) or use FNGDTrainer."
            )
        lr, adamw_lr, betas, eps = settings.lr, settings.adamw_lr, settings.adamw_betas, settings.adamw_eps
        modules, managed, others = split_parameters(model, settings.target_modules)
        groups = []
        if managed:
            groups.append(
                dict(
                    params=managed,
                    fngd=True,
                    lr=lr,
                    momentum=settings.momentum,
                    nesterov=settings.nesterov,
                    weight_decay=settings.weight_decay,
                    trust_ratio=settings.trust_ratio,
                    **group_options,
                )
            )
        for params, decay in weight_decay_groups(model, others, settings.adamw_weight_decay, settings.adamw_no_decay):
            # foreach: torch.optim.AdamW's (None: torch picks; True on GPUs). A param-group key, set as in torch.
            groups.append(dict(params=params, fngd=False, lr=adamw_lr, betas=betas, eps=eps, weight_decay=decay,
                               foreach=None))
        if not groups:
            raise ValueError("The model has no trainable parameters")
        super().__init__(groups, dict(lr=lr))

        self.gradient_accumulation_steps = settings.gradient_accumulation_steps
        self.clip_update_norm = settings.clip_update_norm
        self._adamw_defaults = dict(betas=betas, eps=eps, lr_ratio=adamw_lr / lr)
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
        self.accumulation_declared_by = "constructor" if settings.gradient_accumulation_steps != 1 else None
        self._init_directions()
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
        self._accumulation = positive_int("gradient_accumulation_steps", value)

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

    def _step_diagnostics(self, prefix: str) -> dict[str, float]:
        """What every method's ``diagnostics()`` ends with: its skipped steps and the trust region's share."""
        return {f"{prefix}/skipped_steps": float(self.skipped_steps), **self.trust_region_diagnostics(prefix)}

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

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
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
            warn_skipped(
                self.skipped_steps,
                f"{type(self).__name__} skipped step {self.global_step}: non-finite gradients or "
                f"coefficients. Parameters, momentum and statistics are unchanged "
                f"({self.skipped_steps} skipped so far).",
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

    def _trust_scale(self) -> float:
        """Factor on the group's trust ratio for this step (FNGD's ``"auto"`` follows the batch size)."""
        return 1.0

    def _managed_group_step(self, group: dict) -> None:
        """Trust region, weight decay, momentum, update clip and ``p -= lr·d``, as ``_foreach`` ops."""
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        ratio = group["trust_ratio"]
        if ratio is not None:
            ratio = ratio * self._trust_scale()
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
        directions = self._before_momentum(params, directions, owner)
        if ratio is not None:
            # Trust region: ‖d‖ <= ratio·‖[W|b]‖ per layer (weight and bias together), so a step moves a
            # layer by at most lr·ratio of its norm before momentum; lr and its schedule still apply.
            direction_norms = torch.stack(torch._foreach_norm(directions)).float()
            owner_index, layer_size = self._owner_index(owner, [p.numel() for p in params], direction_norms.device)
            param_norms = torch.stack(torch._foreach_norm(params)).float()
            layers = len(self._layers)
            layer_d = layer_norms(direction_norms, owner_index, layers)
            layer_p = layer_norms(param_norms, owner_index, layers)
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
            # Nesterov (torch.optim.SGD's form): d + momentum·buffer, a look-ahead along the buffer. Groups saved
            # before the key existed load without it: heavy ball, as they ran.
            directions = (torch._foreach_add(directions, buffers, alpha=momentum) if group.get("nesterov", False)
                          else buffers)
        directions = self._scale_step(params, directions, owner, group)
        if self.clip_update_norm is not None:
            # Clip the applied update lr·(momentum buffer) to a global norm; the buffer itself is kept.
            step_norm = lr * torch.linalg.vector_norm(torch.stack(torch._foreach_norm(directions)).float())
            factor = torch.clamp(self.clip_update_norm / step_norm.clamp(min=1e-30), max=1.0)
            directions = torch._foreach_mul(directions, factor.to(directions[0].dtype))
        torch._foreach_add_(params, directions, alpha=-lr)

    def _before_momentum(self, params: list, directions: list, owner: list[int]) -> list:
        """The step's directions before trust region and momentum, as a subclass decides (FNGD's
        ``normalize_directions``); as they are."""
        return directions

    def _scale_step(self, params: list, directions: list, owner: list[int], group: dict) -> list:
        """The step's directions after momentum, rescaled as a subclass decides (FNGD's grafting); as they are."""
        return directions

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
                    weight_decay=group["weight_decay"], foreach=adamw.get("foreach"))

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
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False, foreach=group.get("foreach"),
        )
