"""FNGD: layer-wise natural gradient for Linear layers, AdamW for everything else."""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_update

from . import functional as F
from .capture import CapturedLayer, attach
from .layers import layer_parameters, select_modules

_BANK_KEYS = ("coef_bank", "coef_size", "coef_trace")


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps its step counters in this dtype; match it so AdamW groups are bitwise AdamW.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class FNGD(torch.optim.Optimizer):
    """Inverse-free fast natural gradient descent (Ou et al., 2024) with AdamW for the rest.

    Usage::

        from fngd_hf import FNGD
        opt = FNGD(model, lr=1e-2, damping=1.0, steps_per_epoch=len(train_loader))
        for epoch in range(epochs):
            for batch in train_loader:
                loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad()

    Every managed layer (``nn.Linear`` / ``Conv1D`` except vocabulary heads, or
    ``target_modules``) forms one Fisher block ``[W|b]``. During backward its ``.grad``
    receives the damped natural gradient ``d = Jβ``, ``β = (K + λB I)⁻¹ 1`` (averaged over
    accumulated micro-batches); ``step()`` applies momentum, decoupled weight decay and the
    safeguards, then moves the layer by ``-lr * d``. All other trainable parameters
    (LayerNorm, embeddings, heads) follow ``torch.optim.AdamW`` exactly.

    With ``share_coefficients=True`` the first ``steps_per_epoch`` steps compute and store
    ``β`` per (layer, step, micro-batch); step ``s`` after that reuses the ``β`` of step
    ``s mod steps_per_epoch`` and computes no Gram matrix.

    Keyword-only extras: ``gradient_accumulation_steps`` (micro-batches per step, sets the
    per-sample gradient scale), ``damping_floor`` (relative mode: ``λ >= damping_floor``),
    ``max_update_ratio`` (per-layer trust region ``lr‖d‖ <= ratio·‖[W|b]‖``; ``"auto"`` = on
    for relative damping only), ``scale_mode`` (``"shared"``: reuse ``β`` as stored;
    ``"refreshed"``: rescale it by ``tr(K_stored)/tr(K_new)``), ``clip_update_norm``
    (global norm clip of the FNGD direction), ``stat_dtype`` (float32 or float64 for ``K`` and
    the solve), ``gram_path`` (``"auto"``, ``"token"``, ``"per_sample"``).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        damping: float = 1.0,
        damping_mode: str = "relative",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        share_coefficients: bool = True,
        steps_per_epoch: int | None = None,
        target_modules: Iterable[str] | None = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        *,
        gradient_accumulation_steps: int = 1,
        damping_floor: float = 0.0,
        max_update_ratio: float | str | None = "auto",
        scale_mode: str = "shared",
        clip_update_norm: float | None = None,
        stat_dtype: torch.dtype = torch.float32,
        gram_path: str = "auto",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"FNGD takes the model (an nn.Module), got {type(model).__name__}")
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not damping > 0.0:
            raise ValueError(f"Invalid damping: {damping} (must be > 0)")
        if damping_mode not in ("relative", "fixed"):
            raise ValueError(f"Invalid damping_mode: {damping_mode!r} (expected 'relative' or 'fixed')")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        adamw_lr = lr if adamw_lr is None else adamw_lr
        if not adamw_lr > 0.0:
            raise ValueError(f"Invalid adamw_lr: {adamw_lr}")
        if not (0.0 <= adamw_betas[0] < 1.0 and 0.0 <= adamw_betas[1] < 1.0):
            raise ValueError(f"Invalid adamw_betas: {adamw_betas}")
        if not adamw_eps >= 0.0:
            raise ValueError(f"Invalid adamw_eps: {adamw_eps}")
        if adamw_weight_decay < 0.0:
            raise ValueError(f"Invalid adamw_weight_decay: {adamw_weight_decay}")
        if damping_floor < 0.0:
            raise ValueError(f"Invalid damping_floor: {damping_floor}")
        if max_update_ratio == "auto":
            # Measured (benchmarks/stability_trial.py): without it relative damping diverges.
            max_update_ratio = 0.01 if damping_mode == "relative" else None
        if max_update_ratio is not None and not max_update_ratio > 0.0:
            raise ValueError(f"Invalid max_update_ratio: {max_update_ratio}")
        if scale_mode not in ("shared", "refreshed"):
            raise ValueError(f"Invalid scale_mode: {scale_mode!r} (expected 'shared' or 'refreshed')")
        if clip_update_norm is not None and not clip_update_norm > 0.0:
            raise ValueError(f"Invalid clip_update_norm: {clip_update_norm}")
        if stat_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid stat_dtype: {stat_dtype} (float32 or float64)")
        if gram_path not in ("auto", "token", "per_sample"):
            raise ValueError(f"Invalid gram_path: {gram_path!r}")

        modules = select_modules(model, target_modules)
        managed = [p for m in modules.values() for p in layer_parameters(m)]
        managed_ids = {id(p) for p in managed}
        seen: set[int] = set()
        others = []
        for p in model.parameters():  # model.parameters() already drops tied duplicates
            if p.requires_grad and id(p) not in managed_ids and id(p) not in seen:
                seen.add(id(p))
                others.append(p)

        groups = []
        if managed:
            groups.append(
                dict(
                    params=managed,
                    fngd=True,
                    lr=lr,
                    damping=damping,
                    damping_mode=damping_mode,
                    damping_floor=damping_floor,
                    momentum=momentum,
                    weight_decay=weight_decay,
                    max_update_ratio=max_update_ratio,
                )
            )
        if others:
            groups.append(
                dict(
                    params=others,
                    fngd=False,
                    lr=adamw_lr,
                    betas=tuple(adamw_betas),
                    eps=adamw_eps,
                    weight_decay=adamw_weight_decay,
                )
            )
        if not groups:
            raise ValueError("The model has no trainable parameters")
        super().__init__(groups, dict(lr=lr))

        self.share_coefficients = bool(share_coefficients)
        self.steps_per_epoch = steps_per_epoch
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.scale_mode = scale_mode
        self.clip_update_norm = clip_update_norm
        self.stat_dtype = stat_dtype
        self.gram_path = gram_path
        self.global_step = 0
        self.skipped_steps = 0
        self._capture_enabled = True
        self._pending: dict[int, tuple[int, int, torch.Tensor, torch.Tensor]] = {}
        self._finite: torch.Tensor | None = None  # all captured coefficients finite since the last step
        self._fixed_accumulation_warned = False
        self._diag = self._empty_diagnostics()
        self._layers: list[CapturedLayer] = [
            attach(name, module, self._natural_gradient, lambda: self._capture_enabled)
            for name, module in modules.items()
        ]

    # ----------------------------------------------------------------------------- settings
    @property
    def steps_per_epoch(self) -> int | None:
        return self._steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"Invalid steps_per_epoch: {value} (a positive integer or None)")
        self._steps_per_epoch = None if value is None else int(value)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self._accumulation

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, value: int) -> None:
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"Invalid gradient_accumulation_steps: {value} (a positive integer)")
        self._accumulation = int(value)

    @property
    def managed_modules(self) -> dict[str, nn.Module]:
        return {layer.name: layer.module for layer in self._layers}

    def train(self, mode: bool = True) -> "FNGD":
        """Capture on (HF Trainer and accelerate call this before training steps)."""
        self._capture_enabled = bool(mode)
        return self

    def eval(self) -> "FNGD":
        """Capture off: evaluation and ``generate()`` pay nothing."""
        return self.train(False)

    def remove_hooks(self) -> None:
        """Detach from the model; the optimizer then only runs its AdamW groups meaningfully."""
        for layer in self._layers:
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None

    # ---------------------------------------------------------------- backward-time maths
    def _group_of(self, layer: CapturedLayer) -> dict:
        return self.param_groups[0]

    def _sharing_slot(self) -> int | None:
        if not self.share_coefficients:
            return None
        if self._steps_per_epoch is None:
            raise ValueError(
                "share_coefficients=True needs the epoch length: pass FNGD(..., steps_per_epoch=N) "
                "with N = optimizer steps per epoch (batches / gradient_accumulation_steps), set "
                "opt.steps_per_epoch = N, use FNGDTrainer (which sets it), or share_coefficients=False."
            )
        return self.global_step % self._steps_per_epoch

    def _stored_coefficients(self, layer: CapturedLayer, slot: int, micro: int, batch: int):
        state = self.state.get(layer.weight, {})
        bank = state.get("coef_bank")
        if bank is None or slot >= bank.shape[0] or micro >= bank.shape[1]:
            return None
        if int(state["coef_size"][slot, micro]) != batch:
            return None  # never truncate or pad: a different batch size gets fresh coefficients
        return bank[slot, micro, :batch], state["coef_trace"][slot, micro]

    def _slot_filled(self, layer: CapturedLayer, slot: int, micro: int) -> bool:
        sizes = self.state.get(layer.weight, {}).get("coef_size")
        return sizes is not None and micro < sizes.shape[1] and int(sizes[slot, micro]) > 0

    def _natural_gradient(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor):
        """Called from the layer's backward: the micro-batch's natural gradient, already averaged."""
        group = self._group_of(layer)
        micro = layer.micro_batches
        layer.micro_batches += 1
        batch = x.shape[0]
        accumulation = self._accumulation
        scale = float(batch * accumulation)  # g_n = B_total · (sample n's contribution)
        slot = self._sharing_slot()

        stored, bank_slot = None, slot
        if slot is not None and self.global_step >= self._steps_per_epoch:
            stored = self._stored_coefficients(layer, slot, micro, batch)
            if stored is None and self._slot_filled(layer, slot, micro):
                bank_slot = None  # keep the first epoch's beta; this odd-sized batch is one-off
        if stored is not None:
            beta, stored_trace = stored
            if self.scale_mode == "refreshed":
                new_trace = F.gram_trace(
                    x.detach().to(self.stat_dtype), delta.detach().to(self.stat_dtype), layer.has_bias, scale
                )
                beta = beta.to(self.stat_dtype) * (stored_trace / new_trace).to(self.stat_dtype)
            self._diag["shared"] += 1
        else:
            gram = F.gram_matrix(
                x.detach().to(self.stat_dtype), delta.detach().to(self.stat_dtype), layer.has_bias, scale,
                self.gram_path,
            )
            damping_b = F.damping_times_batch(
                gram, group["damping"], group["damping_mode"], group["damping_floor"]
            )
            beta, damping_b = F.solve_coefficients(gram, damping_b)
            if bank_slot is not None:
                self._pending[id(layer)] = (bank_slot, micro, beta.detach().float(), gram.diagonal().sum().float())
            # Kept as tensors: no host sync here; step() and diagnostics() read them once.
            self._diag["damping"] = self._diag["damping"] + damping_b.detach().float() / batch
            self._diag["gram_norm"] = self._diag["gram_norm"] + torch.linalg.matrix_norm(gram).float()
            self._diag["fresh"] += 1
        finite = torch.isfinite(beta).all()
        self._finite = finite if self._finite is None else self._finite & finite
        d_weight, d_bias = F.weighted_gradient(
            x.detach(), delta.detach(), beta, scale, layer.has_bias, layer.transposed
        )
        # Each micro-batch's d is divided by the declared count so the sum is the average.
        d_weight = d_weight / accumulation if accumulation > 1 else d_weight
        if d_bias is not None and accumulation > 1:
            d_bias = d_bias / accumulation
        return d_weight, d_bias

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.share_coefficients and self._steps_per_epoch is None and self._layers:
            self._sharing_slot()  # raises the explanatory error before anything changes
        if not self._all_finite():
            self.skipped_steps += 1
            # Warn on the 1st, 2nd, 4th, 8th ... skip: visible without flooding the log.
            if self.skipped_steps & (self.skipped_steps - 1) == 0:
                warnings.warn(
                    f"FNGD skipped step {self.global_step}: non-finite gradients or coefficients. "
                    f"Parameters, momentum and coefficients are unchanged ({self.skipped_steps} skipped so far).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            for group in self.param_groups:
                if group["fngd"]:
                    self._fngd_group_step(group)
                else:
                    self._adamw_group_step(group)
            self._commit_coefficients()
        self._pending.clear()
        self._finite = None
        for layer in self._layers:
            layer.micro_batches = 0
        self.global_step += 1
        return loss

    def _all_finite(self) -> bool:
        """One host sync for every gradient and every coefficient computed since the last step."""
        flags = [torch.isfinite(p.grad).all() for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self._finite is not None:
            flags.append(self._finite)
        if not flags:
            return True
        device = flags[0].device
        return bool(torch.stack([f.to(device) for f in flags]).all())

    def _accumulation_correction(self, layer: CapturedLayer, damping_mode: str) -> float:
        """Factor fixing ``d`` when the micro-batch count differs from the declared one."""
        observed, declared = layer.micro_batches, self._accumulation
        if observed in (0, declared):
            return 1.0
        if damping_mode == "relative":
            # d_m scales like 1/(per-sample scale) and the average divides by the count.
            return (declared / observed) ** 2
        if not self._fixed_accumulation_warned:
            self._fixed_accumulation_warned = True
            warnings.warn(
                f"FNGD saw {observed} backward passes before step() but gradient_accumulation_steps="
                f"{declared}; with fixed damping the per-sample gradient scale was taken as {declared}. "
                f"Set FNGD(..., gradient_accumulation_steps={observed}) for the exact average.",
                RuntimeWarning,
                stacklevel=3,
            )
        return declared / observed

    def _fngd_group_step(self, group: dict) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        ratio = group["max_update_ratio"]
        updates = []
        for layer in self._layers:
            params = [p for p in (layer.weight, layer.bias) if p is not None and p.grad is not None]
            if not params:
                continue
            factor = self._accumulation_correction(layer, group["damping_mode"])
            directions = [p.grad * factor if factor != 1.0 else p.grad for p in params]
            if ratio is not None:
                update_norm = lr * torch.sqrt(sum(d.pow(2).sum() for d in directions))
                param_norm = torch.sqrt(sum(p.pow(2).sum() for p in params))
                # Trust region: a layer never moves by more than `ratio` of its own norm.
                shrink = torch.clamp(ratio * param_norm / update_norm.clamp(min=1e-30), max=1.0)
                shrink = torch.where(param_norm > 0, shrink, torch.ones_like(shrink))
                directions = [d * shrink for d in directions]
            updates.append((params, directions))
        if self.clip_update_norm is not None and updates:
            total = torch.sqrt(sum(d.pow(2).sum() for _, ds in updates for d in ds))
            clip = torch.clamp(self.clip_update_norm / total.clamp(min=1e-30), max=1.0)
            updates = [(ps, [d * clip for d in ds]) for ps, ds in updates]
        for params, directions in updates:
            for p, d in zip(params, directions):
                if weight_decay != 0.0:
                    p.mul_(1.0 - lr * weight_decay)
                if momentum != 0.0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)

    def _adamw_group_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("FNGD's AdamW part does not support sparse gradients")
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
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    # -------------------------------------------------------------------- coefficient bank
    def _commit_coefficients(self) -> None:
        if not self._pending:
            return
        period = self._steps_per_epoch
        for layer in self._layers:
            entry = self._pending.get(id(layer))
            if entry is None:
                continue
            slot, micro, beta, trace = entry
            state = self.state[layer.weight]
            bank = state.get("coef_bank")
            batch = beta.shape[0]
            if bank is None or bank.shape[0] != period:
                if bank is not None:
                    warnings.warn(
                        f"steps_per_epoch changed to {period}: the coefficient bank of {layer.name} restarts",
                        RuntimeWarning,
                    )
                bank = beta.new_zeros(period, micro + 1, batch)
                state["coef_bank"] = bank
                state["coef_size"] = torch.zeros(period, micro + 1, dtype=torch.int64, device=beta.device)
                state["coef_trace"] = beta.new_zeros(period, micro + 1)
            if micro >= bank.shape[1] or batch > bank.shape[2]:
                grown = beta.new_zeros(period, max(micro + 1, bank.shape[1]), max(batch, bank.shape[2]))
                grown[:, : bank.shape[1], : bank.shape[2]] = bank
                sizes = state["coef_size"].new_zeros(grown.shape[:2])
                sizes[:, : bank.shape[1]] = state["coef_size"]
                traces = grown.new_zeros(grown.shape[:2])
                traces[:, : bank.shape[1]] = state["coef_trace"]
                state["coef_bank"], state["coef_size"], state["coef_trace"] = grown, sizes, traces
                bank = grown
            bank[slot, micro].zero_()
            bank[slot, micro, :batch] = beta
            state["coef_size"][slot, micro] = batch
            state["coef_trace"][slot, micro] = trace

    # ------------------------------------------------------------------------ diagnostics
    @staticmethod
    def _empty_diagnostics() -> dict[str, float]:
        return {"damping": 0.0, "gram_norm": 0.0, "fresh": 0, "shared": 0}

    def diagnostics(self) -> dict[str, float]:
        """Means over the layer-micro-batches since the last call, then reset."""
        diag, self._diag = self._diag, self._empty_diagnostics()
        fresh, total = diag["fresh"], diag["fresh"] + diag["shared"]
        return {
            "fngd/damping": float(diag["damping"]) / fresh if fresh else math.nan,
            "fngd/gram_norm": float(diag["gram_norm"]) / fresh if fresh else math.nan,
            "fngd/fresh_fraction": fresh / total if total else math.nan,
            "fngd/skipped_steps": float(self.skipped_steps),
        }

    # -------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["fngd"] = {
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "steps_per_epoch": self._steps_per_epoch,
            "gradient_accumulation_steps": self._accumulation,
            "share_coefficients": self.share_coefficients,
            "scale_mode": self.scale_mode,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("fngd", None)
        # torch.optim casts floating state to the parameter dtype; the bank stays float32.
        banks = {
            index: {key: value.pop(key) for key in _BANK_KEYS if key in value}
            for index, value in (
                (i, dict(v)) for i, v in state_dict["state"].items()
            )
        }
        state_dict["state"] = {
            index: {k: v for k, v in value.items() if k not in _BANK_KEYS}
            for index, value in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in banks.items():
            if saved:
                param = params[int(index)]
                for key, value in saved.items():
                    self.state[param][key] = value.to(param.device)
        if extra is not None:
            self.global_step = int(extra["global_step"])
            self.skipped_steps = int(extra["skipped_steps"])
            if extra.get("steps_per_epoch") is not None:
                self.steps_per_epoch = extra["steps_per_epoch"]
            self.gradient_accumulation_steps = extra.get("gradient_accumulation_steps", 1)
