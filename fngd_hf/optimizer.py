"""FNGD: layer-wise natural gradient for Linear layers, AdamW for everything else."""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
from torch import nn

from . import functional as F
from .base import LayerwiseOptimizer
from .capture import CapturedLayer

class FNGD(LayerwiseOptimizer):
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
        if not damping > 0.0:
            raise ValueError(f"Invalid damping: {damping} (must be > 0)")
        if damping_mode not in ("relative", "fixed"):
            raise ValueError(f"Invalid damping_mode: {damping_mode!r} (expected 'relative' or 'fixed')")
        if damping_floor < 0.0:
            raise ValueError(f"Invalid damping_floor: {damping_floor}")
        if max_update_ratio == "auto":
            # Measured (benchmarks/stability_trial.py): without it relative damping diverges.
            max_update_ratio = 0.01 if damping_mode == "relative" else None
        if scale_mode not in ("shared", "refreshed"):
            raise ValueError(f"Invalid scale_mode: {scale_mode!r} (expected 'shared' or 'refreshed')")
        if stat_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid stat_dtype: {stat_dtype} (float32 or float64)")
        if gram_path not in ("auto", "token", "per_sample"):
            raise ValueError(f"Invalid gram_path: {gram_path!r}")
        self.steps_per_epoch = steps_per_epoch  # validates before any hook is attached
        super().__init__(
            model,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            target_modules=target_modules,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            gradient_accumulation_steps=gradient_accumulation_steps,
            max_update_ratio=max_update_ratio,
            clip_update_norm=clip_update_norm,
            group_options=dict(damping=damping, damping_mode=damping_mode, damping_floor=damping_floor),
        )
        self.share_coefficients = bool(share_coefficients)
        self.scale_mode = scale_mode
        self.stat_dtype = stat_dtype
        self.gram_path = gram_path
        self._host_sizes: dict[int, list[list[int]]] = {}  # host copies of coef_size, per layer
        self._pending: dict[int, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}  # per layer, per micro-batch
        self._fixed_accumulation_warned = False
        self._diag = self._empty_diagnostics()

    # ----------------------------------------------------------------------------- settings
    @property
    def steps_per_epoch(self) -> int | None:
        return self._steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"Invalid steps_per_epoch: {value} (a positive integer or None)")
        self._steps_per_epoch = None if value is None else int(value)

    # ---------------------------------------------------------------- backward-time maths
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

    def _stored_size(self, layer: CapturedLayer, slot: int, micro: int) -> int:
        """Batch size of a bank slot (0 = empty), from a host copy: no device sync per layer."""
        sizes = self._host_sizes.get(id(layer))
        if sizes is None:
            tensor = self.state.get(layer.weight, {}).get("coef_size")
            sizes = self._host_sizes[id(layer)] = tensor.tolist() if tensor is not None else []
        return sizes[slot][micro] if slot < len(sizes) and micro < len(sizes[slot]) else 0

    def _stored_coefficients(self, layer: CapturedLayer, slot: int, micro: int, batch: int):
        if self._stored_size(layer, slot, micro) != batch:
            return None  # never truncate or pad: a different batch size gets fresh coefficients
        state = self.state[layer.weight]
        return state["coef_bank"][slot, micro, :batch], state["coef_trace"][slot, micro]

    def _slot_filled(self, layer: CapturedLayer, slot: int, micro: int) -> bool:
        return self._stored_size(layer, slot, micro) > 0

    def _layer_gradient(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor):
        """Called from the layer's backward: the micro-batch's natural gradient, already averaged."""
        group = self.param_groups[0]
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
        tokens = None
        if stored is not None:
            beta, stored_trace = stored
            if self.scale_mode == "refreshed":
                new_trace = self._trace(layer, self._stats(x), self._stats(delta), scale)
                # A layer with no gradient now has trace 0: keep beta finite, d = J·beta is 0 anyway.
                beta = beta.to(self.stat_dtype) * (stored_trace.to(self.stat_dtype) / new_trace.clamp(min=1e-30))
            self._diag["shared"] += 1
        else:
            # On CPUs the Gram (N² in the tokens) and d skip the tokens with zero output gradient
            # (padding): same numbers, 1.99x -> 1.52x AdamW's step (benchmarks/step_time.py). On GPUs
            # the extra host sync per layer would cost more than it saves there (host-bound steps).
            if x.device.type == "cpu" and x.shape[1] > 1:
                tokens = F.kept_tokens(x.detach(), delta.detach())
            beta, trace, damping_b, gram_norm = self._fresh_coefficients(
                layer, self._stats(x), self._stats(delta), scale, group, tokens
            )
            if bank_slot is not None:
                self._pending.setdefault(id(layer), []).append(
                    (bank_slot, micro, beta.detach().float(), trace.detach().float())
                )
            # Kept as tensors: no host sync here; step() and diagnostics() read them once.
            self._diag["damping"] = self._diag["damping"] + damping_b.detach().float().mean() / batch
            self._diag["gram_norm"] = self._diag["gram_norm"] + gram_norm.detach().float().mean()
            self._diag["fresh"] += 1
            self._note_finite(beta)  # stored coefficients were checked before they were banked
        d_weight, d_bias = F.weighted_gradient(
            x.detach(), delta.detach(), beta, scale, layer.has_bias, layer.transposed, tokens
        )
        # Each micro-batch's d is divided by the declared count so the sum is the average.
        if accumulation > 1:
            d_weight = d_weight / accumulation
            d_bias = None if d_bias is None else d_bias / accumulation
        return d_weight, d_bias

    def _stats(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(self.stat_dtype)

    def _fresh_coefficients(
        self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor, scale: float, group: dict, tokens=None
    ):
        """``(β, trace(K), λB, ‖K‖_F)`` of one layer and micro-batch; ``tokens`` from ``F.kept_tokens``."""
        gram = F.gram_matrix(x, delta, layer.has_bias, scale, self._gram_path(x), tokens)
        norm = torch.linalg.matrix_norm(gram)
        damping_b = F.damping_times_batch(gram, group["damping"], group["damping_mode"], group["damping_floor"], norm)
        beta, damping_b = F.solve_coefficients(gram, damping_b)
        return beta, gram.diagonal().sum(), damping_b, norm

    def _gram_path(self, x: torch.Tensor) -> str:
        # Measured (benchmarks/step_time.py --micro): on GPUs the token Gram is as fast or faster for
        # Transformer layer shapes and needs less memory; on CPUs the multiply-add count decides.
        if self.gram_path == "auto" and x.is_cuda:
            return "token"
        return self.gram_path

    def _trace(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
        return F.gram_trace(x, delta, layer.has_bias, scale)

    def _check_ready(self) -> None:
        if self.share_coefficients and self._layers:
            self._sharing_slot()  # raises the explanatory error before anything changes

    def _accumulation_correction(self, layer: CapturedLayer, group: dict) -> float:
        """Factor fixing ``d`` when the micro-batch count differs from the declared one."""
        observed, declared = layer.micro_batches, self._accumulation
        if observed in (0, declared):
            return 1.0
        if group["damping_mode"] == "relative":
            # d_m scales like 1/(per-sample scale) and the average divides by the count.
            return (declared / observed) ** 2
        if not self._fixed_accumulation_warned:
            self._fixed_accumulation_warned = True
            warnings.warn(
                f"{type(self).__name__} saw {observed} backward passes before step() but "
                f"gradient_accumulation_steps={declared}; with fixed damping the per-sample gradient "
                f"scale was taken as {declared}. Set gradient_accumulation_steps={observed} for the exact average.",
                RuntimeWarning,
                stacklevel=4,
            )
        return declared / observed

    # -------------------------------------------------------------------- coefficient bank
    _float32_state_keys = ("coef_bank", "coef_size", "coef_trace")

    def _discard_staged(self) -> None:
        self._pending.clear()

    def _after_step(self) -> None:
        """Store the coefficients staged by this step's backward (never those of a skipped step)."""
        period = self._steps_per_epoch
        for layer in self._layers:
            for slot, micro, beta, trace in self._pending.get(id(layer), ()):
                self._store(layer, period, slot, micro, beta, trace)

    def _store(self, layer: CapturedLayer, period: int, slot: int, micro: int, beta: torch.Tensor, trace: torch.Tensor):
        """Write one micro-batch's coefficients into the layer's bank, growing it as needed."""
        state = self.state[layer.weight]
        bank = state.get("coef_bank")
        batch, unit_shape = beta.shape[0], tuple(beta.shape[1:])  # CW-NGD: one beta per unit
        if bank is None or bank.shape[0] != period or tuple(bank.shape[3:]) != unit_shape:
            if bank is not None:
                warnings.warn(
                    f"steps_per_epoch changed to {period}: the coefficient bank of {layer.name} restarts",
                    RuntimeWarning,
                )
            state["coef_bank"] = beta.new_zeros(period, micro + 1, batch, *unit_shape)
            state["coef_size"] = torch.zeros(period, micro + 1, dtype=torch.int64, device=beta.device)
            state["coef_trace"] = beta.new_zeros(period, micro + 1, *unit_shape)
        bank = state["coef_bank"]
        if micro >= bank.shape[1] or batch > bank.shape[2]:
            micro_cap, batch_cap = max(micro + 1, bank.shape[1]), max(batch, bank.shape[2])
            grown = beta.new_zeros(period, micro_cap, batch_cap, *unit_shape)
            grown[:, : bank.shape[1], : bank.shape[2]] = bank
            sizes = state["coef_size"].new_zeros(period, micro_cap)
            sizes[:, : bank.shape[1]] = state["coef_size"]
            traces = beta.new_zeros(period, micro_cap, *unit_shape)
            traces[:, : bank.shape[1]] = state["coef_trace"]
            state["coef_bank"], state["coef_size"], state["coef_trace"] = grown, sizes, traces
            bank = grown
        bank[slot, micro].zero_()
        bank[slot, micro, :batch] = beta
        state["coef_size"][slot, micro] = batch
        self._host_sizes.pop(id(layer), None)  # re-read once on next use
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
    def _extra_state(self) -> dict:
        return {
            "steps_per_epoch": self._steps_per_epoch,
            "share_coefficients": self.share_coefficients,
            "scale_mode": self.scale_mode,
        }

    def _load_extra_state(self, extra: dict) -> None:
        self._host_sizes.clear()
        if extra.get("steps_per_epoch") is not None:
            self.steps_per_epoch = extra["steps_per_epoch"]
