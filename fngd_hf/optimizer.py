"""FNGD: layer-wise natural gradient for Linear layers, AdamW for everything else."""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from . import functional as F
from .base import LayerwiseOptimizer, _distributed, _in_accelerate_loop, direction_tag
from .capture import CapturedLayer
from .sample_sharing import SampleIndex


# Layers batched into one set of kernels at the end of backward: at most this many elements of
# token Gram (L·N², twice) and stacked inputs and output gradients (L·N·(i + o)) at once.
_BATCHED_MAX_ELEMENTS = 1 << 27
# Inputs and output gradients a backward holds for the batched maths before it does the layers held
# so far (a large model then batches in rounds instead of keeping every layer's tensors).
_DEFERRED_MAX_BYTES = 1 << 30
# How each micro-batch loss of an accumulated step was divided: by the micro-batches the step really had
# (so they sum to the whole step's loss: FNGDTrainer, `loss / len(window)`), or always by
# gradient_accumulation_steps (accelerate's `accelerator.backward`, also in an epoch's shorter last window).
_LOSS_DIVISORS = ("micro_batches", "gradient_accumulation_steps")
# What the managed layers do after the first epoch: reuse its coefficients (the paper), or train with
# AdamW on their plain gradient (the first epoch's natural gradient as a warm start; README, Convergence).
_SHARED_PHASES = ("coefficients", "adamw")
# The batched path asks the autograd engine which backward is running and whether it writes .grad
# (private torch API, as DDP and FSDP use it); a torch without it keeps the per-layer path.
_ENGINE_QUERIES = all(hasattr(torch._C, name) for name in ("_current_graph_task_id", "_will_engine_execute_node")) \
    and hasattr(torch.autograd.graph, "get_gradient_edge")


logger = logging.getLogger(__name__)


def _end_of_dataloader() -> bool:
    """Whether the accelerate dataloader being iterated has just yielded its last batch."""
    from accelerate.state import GradientState

    return bool(GradientState._shared_state) and GradientState().end_of_dataloader


def _nonzero(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of ``mask``'s ``count`` true entries, without a host sync where torch can (``count`` is known)."""
    try:
        return torch.nonzero_static(mask, size=count).squeeze(1)
    except (AttributeError, NotImplementedError, RuntimeError):  # an older torch, or no kernel for this device
        return mask.nonzero().squeeze(1)


@dataclass(eq=False)
class _DeferredLayer:
    """A layer's fresh-coefficient work, staged in its backward and done with its equals at the end."""

    layer: CapturedLayer
    x: torch.Tensor | None  # (B, T, i); None once stacked with its equals
    delta: torch.Tensor | None  # (B, T, o)
    scale: float
    micro: int
    bank_slot: int | None
    by_sample: bool


class FNGD(LayerwiseOptimizer):
    """Inverse-free fast natural gradient descent (Ou et al., 2024) with AdamW for the rest.

    Usage::

        from fngd_hf import FNGD
        opt = FNGD(model, lr=1e-2, damping=0.1, steps_per_epoch=len(train_loader))
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
    ``s mod steps_per_epoch`` and computes no Gram matrix (``share_by="position"``, the
    paper's scheme). ``share_by="sample"`` instead stores ``β_n`` per training sample and gives
    every sample the coefficient it got the first time it was seen; it needs the ids of each
    micro-batch's samples (``opt.set_sample_ids(ids)`` before its backward; ``FNGDTrainer``
    passes content hashes) and no epoch length.

    Keyword-only extras: ``adamw_no_decay`` (names, as in ``model.named_parameters()``, of
    parameters the AdamW part does not weight-decay; ``FNGDTrainer`` passes the stock Trainer's
    choice: biases and LayerNorm), ``gradient_accumulation_steps`` (micro-batches per step, sets the
    per-sample gradient scale), ``damping_floor`` (relative mode: ``λ >= damping_floor``),
    ``trust_ratio`` (per-layer trust region ``‖d‖ <= trust_ratio·‖[W|b]‖`` before momentum, so a
    step moves a layer by at most ``lr·trust_ratio`` of its norm; ``"auto"`` = 1.0 for relative
    damping, off for fixed), ``scale_mode`` (``"shared"``: reuse ``β`` as stored;
    ``"refreshed"``: rescale it by ``tr(K_stored)/tr(K_new)``), ``clip_update_norm`` (global
    norm clip of the applied update ``lr·(momentum buffer)``), ``stat_dtype`` (float32 or
    float64 for ``K`` and the solve; ``None``: float64 for a float64 model, float32 otherwise, also
    under bf16 autocast), ``gram_path`` (``"auto"``, ``"token"``, ``"per_sample"``),
    ``share_by`` (``"position"`` or ``"sample"``), ``solve_check`` (``"per_layer"``: each Cholesky
    is checked as it happens, a host sync per layer, and retried with more damping if it fails;
    ``"per_step"``: checked once in ``step()``, and a failure skips that step and switches to
    ``"per_layer"``; ``"auto"`` = per step on GPUs, per layer on CPUs), ``batch_layers`` (``True``:
    layers computing fresh coefficients keep their input and output gradient until the end of the
    backward, where those of equal shape form their Gram matrices, solves and natural gradients
    together, a few batched kernels instead of about 16 per layer; costs the memory of those
    tensors until then. Only under ``loss.backward()`` without a process group: ``torch.autograd.grad``,
    ``create_graph``, ``torch.distributed`` (DDP needs each gradient as it is made), parameters with
    gradient hooks, ``gram_path="per_sample"`` and CW-NGD keep the per-layer path; a backward that
    raises leaves its staged layers unapplied. The batched maths leave out each shape's padding tokens
    (zero output gradient in all its layers), with one host read per backward (per round, when a
    reentrant checkpoint or the memory budget splits it into rounds). ``"auto"`` = on GPUs,
    where a step is bound by kernel launches; off on CPUs, where the arithmetic bounds it and the
    per-layer path picks the cheaper Gram for each layer), ``loss_divided_by`` (how each micro-batch
    loss of an accumulated step was divided: ``"micro_batches"``, by the number the step really had,
    so they sum to the step's loss, as ``FNGDTrainer`` does; ``"gradient_accumulation_steps"``, always
    by that number, as ``accelerator.backward`` does even in an epoch's shorter last window;
    :func:`fngd_hf.attach_accelerator` sets it).
    """

    # The batched path drops tokens whose output gradient is zero in every layer of a group (one host
    # read per backward); benchmarks/step_time.py's fngd_first_padded turns it off to compare.
    _drop_zero_tokens = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        damping: float = 0.1,
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
        adamw_no_decay: Iterable[str] | None = None,
        gradient_accumulation_steps: int = 1,
        damping_floor: float = 0.0,
        trust_ratio: float | str | None = "auto",
        scale_mode: str = "shared",
        clip_update_norm: float | None = None,
        stat_dtype: torch.dtype | None = None,
        gram_path: str = "auto",
        share_by: str = "position",
        solve_check: str = "auto",
        batch_layers: bool | str = "auto",
        loss_divided_by: str = "micro_batches",
        shared_phase: str = "coefficients",
    ):
        if not damping > 0.0:
            raise ValueError(f"Invalid damping: {damping} (must be > 0)")
        if damping_mode not in ("relative", "fixed"):
            raise ValueError(f"Invalid damping_mode: {damping_mode!r} (expected 'relative' or 'fixed')")
        if damping_floor < 0.0:
            raise ValueError(f"Invalid damping_floor: {damping_floor}")
        if trust_ratio == "auto":
            # Measured (benchmarks/stability_trial.py): without it relative damping diverges. At the
            # default lr 1e-2 this bounds a step to 1% of the layer's norm.
            trust_ratio = 1.0 if damping_mode == "relative" else None
        if scale_mode not in ("shared", "refreshed"):
            raise ValueError(f"Invalid scale_mode: {scale_mode!r} (expected 'shared' or 'refreshed')")
        if stat_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"Invalid stat_dtype: {stat_dtype} (torch.float32, torch.float64 or None)")
        if gram_path not in ("auto", "token", "per_sample"):
            raise ValueError(f"Invalid gram_path: {gram_path!r}")
        if share_by not in ("position", "sample"):
            raise ValueError(f"Invalid share_by: {share_by!r} (expected 'position' or 'sample')")
        if solve_check not in ("auto", "per_layer", "per_step"):
            raise ValueError(f"Invalid solve_check: {solve_check!r} (expected 'auto', 'per_layer' or 'per_step')")
        if batch_layers not in ("auto", True, False):
            raise ValueError(f"Invalid batch_layers: {batch_layers!r} (expected 'auto', True or False)")
        if shared_phase not in _SHARED_PHASES:
            raise ValueError(f"Invalid shared_phase: {shared_phase!r} (expected one of {_SHARED_PHASES})")
        if shared_phase == "adamw" and share_by == "sample":
            raise ValueError("shared_phase='adamw' switches after the first epoch: it needs share_by='position'")
        if loss_divided_by not in _LOSS_DIVISORS:
            raise ValueError(f"Invalid loss_divided_by: {loss_divided_by!r} (expected one of {_LOSS_DIVISORS})")
        self.steps_per_epoch = steps_per_epoch  # validates before any layer is captured
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
            adamw_no_decay=adamw_no_decay,
            gradient_accumulation_steps=gradient_accumulation_steps,
            trust_ratio=trust_ratio,
            clip_update_norm=clip_update_norm,
            group_options=dict(damping=damping, damping_mode=damping_mode, damping_floor=damping_floor),
        )
        self.share_coefficients = bool(share_coefficients)
        self.scale_mode = scale_mode
        self.stat_dtype = stat_dtype
        self.gram_path = gram_path
        self.share_by = share_by
        self.solve_check = solve_check
        self.batch_layers = batch_layers
        self.loss_divided_by = loss_divided_by
        self.shared_phase = shared_phase
        # Layers waiting for the batched maths, per autograd graph task (a backward; a reentrant
        # checkpoint's backward runs inside another): each task's end runs its own.
        self._deferred: dict[int, list[_DeferredLayer]] = {}
        self._deferred_bytes: dict[int, int] = {}  # what each task's list holds
        self._grad_accumulators: dict[int, tuple] = {}  # per layer: (its params, their AccumulateGrad nodes)
        self._solve_check_fell_back = False  # a per-step check failed once: per-layer checks from then on
        self._sample_index = SampleIndex()
        self._next_sample_ids: list[int] | None = None  # from set_sample_ids, for the next micro-batch
        self._sample_ids: dict[int, list[int]] = {}  # micro-batch index of this step -> its sample ids
        self._sample_rows: dict[int, torch.Tensor | None] = {}  # per micro-batch: bank rows, None = unseen samples
        self._incomplete_layers: set[str] = set()  # missed a store: always fresh coefficients (share_by="sample")
        self._host_sizes: dict[int, dict[tuple[int, int], int]] = {}  # host copies of coef_size, per layer
        self._pending: dict[int, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}  # per layer, per micro-batch
        self._fixed_accumulation_warned = False
        self._learning_epoch_length = False  # steps_per_epoch unknown: the first epoch's end will tell it
        self._unknown_epoch_warned = False
        self._diag = self._empty_diagnostics()
        self._diag_staged: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (λB, ‖K‖_F, B) since the last step
        # (self.state, per-layer state dicts, their coef_bank views, the stacked tensors): see _stacked_banks
        self._bank_stack: tuple | None = None
        self._shared_weights: dict[tuple, tuple[torch.Tensor, ...] | None] = {}  # this step's, per micro-batch

    # ----------------------------------------------------------------------------- settings
    @property
    def steps_per_epoch(self) -> int | None:
        return self._steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"Invalid steps_per_epoch: {value} (a positive integer or None)")
        self._steps_per_epoch = None if value is None else int(value)

    def set_sample_ids(self, ids) -> None:
        """Ids of the samples of the next micro-batch, in batch order (``share_by="sample"``).

        Call once per micro-batch, before its forward and backward: dataset indices, or
        :func:`fngd_hf.sample_sharing.sample_keys` of its token ids. Each call serves exactly
        one backward (a forgotten call is an error, not a silent reuse). Ignored otherwise.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.is_floating_point():
                raise ValueError(f"sample ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        self._next_sample_ids = [int(i) for i in ids]

    # ---------------------------------------------------------------- backward-time maths
    def _sharing_slot(self) -> int | None:
        """The bank slot of this step: its position in the epoch; while the epoch length is being learnt
        (an accelerate dataloader says where the first epoch ends), the step itself; ``None``: not stored
        (no sharing, or ``shared_phase="adamw"``, which needs only the epoch length)."""
        if not self.share_coefficients or self.share_by == "sample":
            return None
        stores = self.shared_phase == "coefficients"
        if self._steps_per_epoch is not None:
            return self.global_step % self._steps_per_epoch if stores else None
        if self.global_step == 0 and _in_accelerate_loop():
            self._learning_epoch_length = True
        if self._learning_epoch_length:
            return self.global_step if stores else None
        if not self._unknown_epoch_warned:
            self._unknown_epoch_warned = True
            warnings.warn(
                f"{type(self).__name__} does not know the epoch length, so it cannot share coefficients: every step "
                "computes fresh ones (NGD, slower). Pass steps_per_epoch=N (optimizer steps per epoch), set "
                "opt.steps_per_epoch = N, or train from an accelerate-prepared dataloader (the HF Trainer's), "
                "where FNGD learns the length in the first epoch.",
                RuntimeWarning,
                stacklevel=5,
            )
        return None

    def _managed_by_adamw(self) -> bool:
        period = self._steps_per_epoch
        return (self.shared_phase == "adamw" and self.share_coefficients and period is not None
                and self.global_step >= period)

    def step(self, closure=None):
        loss = super().step(closure)
        if self._learning_epoch_length and _end_of_dataloader():
            self._learn_epoch_length(self.global_step)
        return loss

    def _learn_epoch_length(self, steps: int) -> None:
        """The first epoch ended after ``steps`` steps: keep that many bank rows and share from now on."""
        self._learning_epoch_length = False
        for layer in self._layers:
            state = self.state.get(layer.weight, {})
            for key in self._stacked_keys:
                if key in state:  # exactly `steps` rows (fewer were stored if the last steps were skipped)
                    old, kept = state[key], min(steps, state[key].shape[0])
                    state[key] = old.new_zeros(steps, *old.shape[1:])
                    state[key][:kept] = old[:kept]
        self._forget_cached_state()
        self._steps_per_epoch = steps
        logger.info("%s: learnt the epoch length, %d optimizer steps; coefficients are shared from now on",
                    type(self).__name__, steps)

    def _host_size_table(self, layer: CapturedLayer) -> dict[tuple[int, int], int]:
        """``{(slot, micro): batch}`` of the filled bank slots: a host copy of ``coef_size``, read from
        the device only after a checkpoint load (kept sparse: an epoch can be a million steps)."""
        sizes = self._host_sizes.get(id(layer))
        if sizes is None:
            tensor = self.state.get(layer.weight, {}).get("coef_size")
            sizes = {}
            if tensor is not None:
                filled = tensor.nonzero()
                sizes = dict(zip(map(tuple, filled.tolist()), tensor[tuple(filled.T)].tolist()))
            self._host_sizes[id(layer)] = sizes
        return sizes

    def _stored_size(self, layer: CapturedLayer, slot: int, micro: int) -> int:
        """Batch size of a bank slot (0 = empty), from a host copy: no device sync per layer."""
        return self._host_size_table(layer).get((slot, micro), 0)

    def _stored_coefficients(self, layer: CapturedLayer, slot: int, micro: int, batch: int):
        if self._stored_size(layer, slot, micro) != batch:
            return None  # never truncate or pad: a different batch size gets fresh coefficients
        state = self.state[layer.weight]
        # The stored trace only serves scale_mode="refreshed" (views cost host time on GPUs).
        trace = state["coef_trace"][slot, micro] if self.scale_mode == "refreshed" else None
        return state["coef_bank"][slot, micro, :batch], trace

    def _slot_filled(self, layer: CapturedLayer, slot: int, micro: int) -> bool:
        return self._stored_size(layer, slot, micro) > 0

    def _layer_gradient(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor):
        """Called from the layer's backward: the micro-batch's natural gradient, already averaged.

        ``x`` and ``delta`` are outside any graph (the capture detaches them under ``create_graph``)."""
        micro = layer.micro_batches
        batch = x.shape[0]
        # The shared phase's fast path: the micro-batch's first layer scales every layer's stored beta at
        # once, and each layer is then a lookup and the weighted sum (host time bounds a GPU step).
        key = (micro, batch, delta.dtype)
        if key not in self._shared_weights:
            self._shared_weights[key] = self._all_shared_sample_weights(micro, batch, delta.dtype)
        weights = self._shared_weights[key]
        if weights is not None and weights[layer.index] is not None:
            layer.micro_batches += 1
            self._diag["shared"] += 1
            return F.apply_sample_weights(x, delta, weights[layer.index], layer.has_bias, layer.transposed)

        group = self.param_groups[0]
        # Raises before any state changes (missing sample ids).
        slot = self._sharing_slot()
        by_sample = self.share_coefficients and self.share_by == "sample"
        if by_sample:
            self._micro_batch_ids(micro, batch)
        layer.micro_batches += 1
        scale = float(batch * self._accumulation)  # g_n = B_total · (sample n's contribution)

        stored, bank_slot = None, slot
        if slot is not None and self._steps_per_epoch is not None and self.global_step >= self._steps_per_epoch:
            stored = self._stored_coefficients(layer, slot, micro, batch)
            if stored is None and self._slot_filled(layer, slot, micro):
                bank_slot = None  # keep the first epoch's beta; this odd-sized batch is one-off
        if by_sample:
            stored = self._stored_sample_coefficients(layer, micro, batch, x.device)
        tokens = None
        if stored is not None:
            beta, stored_trace = stored
            if self.scale_mode == "refreshed":
                new_trace = self._trace(layer, self._stats(x), self._stats(delta), scale)
                # A layer with no gradient now has trace 0: keep beta finite, d = J·beta is 0 anyway.
                beta = beta.to(new_trace.dtype) * (stored_trace.to(new_trace.dtype) / new_trace.clamp(min=1e-30))
            self._diag["shared"] += 1
        elif self._can_defer(layer, x):
            self._defer(_DeferredLayer(layer, x, delta, scale, micro, bank_slot, by_sample))
            return None, None  # its .grad is written at the end of this backward
        else:
            # On CPUs the Gram (N² in the tokens) and d skip the tokens with zero output gradient
            # (padding): same numbers, 1.99x -> 1.52x AdamW's step (benchmarks/step_time.py). On GPUs
            # the extra host sync per layer would cost more than it saves there (host-bound steps).
            if x.device.type == "cpu" and x.shape[1] > 1:
                tokens = F.kept_tokens(x, delta)
            beta, diagonal, damping_b, gram_norm = self._fresh_coefficients(
                layer, self._stats(x), self._stats(delta), scale, group, tokens
            )
            self._stage_coefficients(layer, micro, bank_slot, by_sample, beta, diagonal)
            # Summed once per step (not per layer: kernels cost host time on GPUs), read by diagnostics().
            self._diag_staged.append((damping_b, gram_norm, batch))
            self._diag["fresh"] += 1
            self._note_finite(beta)  # stored coefficients were checked before they were banked
        # Each micro-batch's d is divided by the declared count so the sum is the average: the weights
        # then carry scale / accumulation = B.
        return F.weighted_gradient(x, delta, beta, float(batch), layer.has_bias, layer.transposed, tokens)

    def _all_shared_sample_weights(self, micro: int, batch: int, dtype: torch.dtype):
        """``B·β`` of every layer's stored slot for this micro-batch, shaped as :func:`F.sample_weights`
        shapes it (``None`` for a layer whose slot holds another batch size), from one stacked bank: a
        few kernels per micro-batch instead of an index and a multiply per layer. ``None`` outside the
        shared phase by position with ``scale_mode="shared"`` and FNGD's ``(B,)`` coefficients: those
        take the general path."""
        period = self._steps_per_epoch
        if (not self.share_coefficients or self.share_by != "position" or self.scale_mode != "shared"
                or period is None or self.global_step < period):
            return None
        stacked = self._stacked_banks()
        if stacked is None or stacked[0].shape[1] != period or micro >= stacked[0].shape[2]:
            return None  # none, or not for this epoch length or this many micro-batches
        slot = self.global_step % period
        weights = stacked[0][:, slot, micro, :batch].mul(batch).to(dtype)[:, :, None, None].unbind(0)
        return tuple(w if self._stored_size(layer, slot, micro) == batch else None for layer, w in zip(self._layers, weights))

    _stacked_keys = ("coef_bank", "coef_size", "coef_trace")

    def _stacked_banks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every layer's ``coef_bank``, ``coef_size`` and ``coef_trace``, each stacked into one tensor
        (layers first), or ``None`` if a layer has none or their shapes, dtypes or devices differ (CW-NGD's
        per-unit banks always do). Each layer's state then holds views of them (no second copy). A bank
        replaced since (grown, or a loaded state: ``_reserve_bank`` replaces the three together) is
        noticed by identity and stacked again."""
        cached = self._bank_stack
        if cached is not None:
            state, layer_states, banks, stacked = cached
            if state is self.state and all(s.get("coef_bank") is b for s, b in zip(layer_states, banks)):
                return stacked
        self._bank_stack = None
        layer_states = [self.state[layer.weight] for layer in self._layers]
        columns = [[s.get(key) for s in layer_states] for key in self._stacked_keys]
        for tensors in columns:
            first = tensors[0]
            if first is None or any(
                t is None or t.shape != first.shape or t.dtype != first.dtype or t.device != first.device
                for t in tensors
            ):
                return None
        if columns[0][0].dim() != 3:  # FNGD's (P, micro-batches, B); CW-NGD's has a unit dimension
            return None
        stacked = tuple(torch.stack(tensors) for tensors in columns)
        for index, layer_state in enumerate(layer_states):
            for key, column in zip(self._stacked_keys, stacked):
                layer_state[key] = column[index]
        self._bank_stack = (self.state, layer_states, [s["coef_bank"] for s in layer_states], stacked)
        return stacked

    # ------------------------------------------------ first epoch: layers batched at the end of backward
    _batchable = True  # FNGD's (B,) coefficients from the token Gram (CW-NGD's per-unit systems are not)

    def _can_defer(self, layer: CapturedLayer, x: torch.Tensor) -> bool:
        mode = self.batch_layers
        if mode is False or (mode == "auto" and not self._launch_bound(x)) or not _ENGINE_QUERIES:
            return False
        # Any process group, even of one process: DDP's reducer writes .grad from its buckets at the end.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return False
        if not self._batchable or self.gram_path == "per_sample" or torch.is_grad_enabled():
            return False
        for param in layer.params:
            # A frozen parameter, or hooks that expect their gradient as autograd makes it.
            if not param.requires_grad or param._backward_hooks or getattr(param, "_post_accumulate_grad_hooks", None):
                return False
        # Only a backward that accumulates into .grad: torch.autograd.grad(loss, params) must get d returned.
        nodes = self._grad_accumulators.get(layer.index)
        if nodes is None or nodes[0] is not layer.params:
            nodes = (layer.params, tuple(torch.autograd.graph.get_gradient_edge(p).node for p in layer.params))
            self._grad_accumulators[layer.index] = nodes  # held: the node stays the one graphs use
        try:
            return all(torch._C._will_engine_execute_node(node) for node in nodes[1])
        except RuntimeError:  # torch refuses the question inside autograd.grad, which never writes .grad
            return False

    def _defer(self, entry: _DeferredLayer) -> None:
        task = torch._C._current_graph_task_id()
        entries = self._deferred.get(task)
        if entries is None:
            # A backward that raises never runs its callback: its layers stay here, unapplied (as if
            # that backward had not happened), until step() or zero_grad() forgets them.
            entries = self._deferred[task] = []
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self._flush_deferred, task))
        entries.append(entry)
        held = self._deferred_bytes.get(task, 0) + sum(t.numel() * t.element_size() for t in (entry.x, entry.delta))
        if held > _DEFERRED_MAX_BYTES:
            self._flush_deferred(task)  # the next layer of this backward starts a new list (and callback)
        else:
            self._deferred_bytes[task] = held

    def _flush_deferred(self, task: int) -> None:
        """The staged layers' coefficients and ``.grad``, equally shaped layers together (a queued autograd
        callback: runs when the backward's graph is done, before ``backward()`` returns)."""
        entries = self._deferred.pop(task, None)
        self._deferred_bytes.pop(task, None)
        if not entries:
            return
        with torch.no_grad(), torch.autocast(entries[0].x.device.type, enabled=False):
            stacks = self._stack_equal_layers(entries)
            kept = self._kept_tokens(stacks) if self._drop_zero_tokens else {}
            memberships: dict[tuple, torch.Tensor] = {}  # one per shape and statistics dtype
            stacks.reverse()
            while stacks:
                members, x, delta = stacks.pop()  # each group's stacks go once it is done
                batch = x.shape[1]
                x, delta, sample, membership = self._select_kept_tokens(x, delta, kept, memberships)
                rows = x.shape[1] * (x.shape[2] if sample is None else 1)
                per_layer = 2 * rows * rows + rows * (x.shape[-1] + delta.shape[-1])
                size = max(1, _BATCHED_MAX_ELEMENTS // max(1, per_layer))
                for start in range(0, len(members), size):
                    chunk = slice(start, start + size)
                    self._batched_layer_gradients(members[chunk], x[chunk], delta[chunk], batch, sample, membership)
                del members, x, delta

    def _select_kept_tokens(self, x: torch.Tensor, delta: torch.Tensor, kept: dict, memberships: dict):
        """``(x, delta, sample, membership)``: the stacks (L, B, T, ·) as they are with ``None, None`` where
        their shape keeps every token, else their kept tokens (L, N, ·), each token's sample index and the
        one-hot ``membership`` (N, B) that sums token Gram entries by sample."""
        _, batch, length, _ = x.shape
        if (batch, length, x.device) not in kept:
            return x, delta, None, None
        tokens, sample = kept[(batch, length, x.device)]
        key = (batch, length, x.device, self._stat_dtype_for(delta.dtype))
        if key not in memberships:
            memberships[key] = F.sample_membership(sample, batch, key[-1])
        x, delta = (t.flatten(1, 2).index_select(1, tokens) for t in (x, delta))
        return x, delta, sample, memberships[key]

    @staticmethod
    def _stack_equal_layers(entries: list[_DeferredLayer]) -> list[tuple[list[_DeferredLayer], torch.Tensor, torch.Tensor]]:
        """``(members, x (L, B, T, i), delta (L, B, T, o))`` per group of layers that can share kernels."""
        groups: dict[tuple, list[_DeferredLayer]] = {}
        for entry in entries:
            layer = entry.layer
            key = (entry.x.shape, entry.delta.shape, entry.x.dtype, entry.delta.dtype, entry.x.device, entry.scale,
                   layer.has_bias, layer.transposed, layer.weight.dtype, layer.has_bias and layer.bias.dtype)
            groups.setdefault(key, []).append(entry)
        stacks = []
        for members in groups.values():
            x, delta = torch.stack([e.x for e in members]), torch.stack([e.delta for e in members])
            for entry in members:
                entry.x = entry.delta = None  # the stacks are the only copy from here on
            stacks.append((members, x, delta))
        return stacks

    @staticmethod
    def _kept_tokens(stacks: list[tuple]) -> dict[tuple, tuple[torch.Tensor, torch.Tensor]]:
        """Per (B, T, device) where some tokens have a zero output gradient in every layer of that shape
        (padding, ``-100`` labels): the flat indices of the others and their sample indices. Padding costs
        N² in the token Gram for nothing. The counts come in one host read for all shapes (per device):
        one sync per batched round, i.e. per backward unless a reentrant checkpoint or the memory budget
        splits it (one per group would each wait for the groups before it)."""
        masks: dict[tuple, torch.Tensor] = {}
        for _, x, delta in stacks:
            if x.shape[2] > 1:
                key = (x.shape[1], x.shape[2], x.device)
                keep = F.stacked_kept_tokens(delta)
                masks[key] = keep if key not in masks else masks[key].logical_or_(keep)
        by_device: dict[torch.device, list[tuple]] = {}
        for key in masks:
            by_device.setdefault(key[2], []).append(key)
        kept = {}
        for keys in by_device.values():  # a model spread over devices reads each device's counts
            for key, count in zip(keys, FNGD._host_counts([masks[key].sum() for key in keys])):
                if count < masks[key].shape[0]:
                    index = _nonzero(masks[key], count)
                    kept[key] = (index, index // key[1])
        return kept

    @staticmethod
    def _host_counts(counts: list[torch.Tensor]) -> list[int]:
        return torch.stack(counts).tolist()  # the batched first epoch's one host read per round

    def _batched_layer_gradients(self, entries: list[_DeferredLayer], x: torch.Tensor, delta: torch.Tensor,
                                 batch: int, sample: torch.Tensor | None, membership: torch.Tensor | None) -> None:
        """:meth:`_fresh_coefficients`, the bank staging and the weighted gradient of equally shaped layers,
        each step batched over them; the natural gradients go into ``.grad`` as autograd would put them.
        ``x``/``delta``: the layers' stacked tensors (L, B, T, ·), or their kept tokens (L, N, ·) with each
        token's ``sample`` index and its one-hot ``membership`` (N, B)."""
        first = entries[0]
        has_bias = first.layer.has_bias
        gram = F.stacked_gram_matrices(self._stats(x), self._stats(delta), has_bias, first.scale, membership)
        beta, damping_b, norm = self._damped_solve(gram, self.param_groups[0])
        self._note_finite(beta)
        self._diag_staged.append((damping_b.sum(), norm.sum(), batch))  # summed: one entry for len(entries) layers
        self._diag["fresh"] += len(entries)
        if any(entry.by_sample or entry.bank_slot is not None for entry in entries):
            # Converted and summed once for all layers; each layer stages its views.
            stored_beta, diagonal = beta.float(), gram.diagonal(dim1=-2, dim2=-1).float()
            traces = diagonal.sum(-1)
            for index, entry in enumerate(entries):
                self._stage_coefficients(entry.layer, entry.micro, entry.bank_slot, entry.by_sample,
                                         stored_beta[index], diagonal[index], traces[index])
        weights = F.sample_weights(beta, float(batch), delta.dtype).view(len(entries), batch)
        d_weight, d_bias = F.stacked_weighted_gradients(x, delta, weights, has_bias, first.layer.transposed, sample)
        weight_dtype = first.layer.weight.dtype
        if d_weight.dtype != weight_dtype:
            d_weight = d_weight.to(weight_dtype)
        if d_bias is not None and d_bias.dtype != first.layer.bias.dtype:
            d_bias = d_bias.to(first.layer.bias.dtype)
        bias_grads = (None,) * len(entries) if d_bias is None else d_bias.unbind(0)
        weight_grads = d_weight.unbind(0)
        for entry, weight_grad, bias_grad in zip(entries, weight_grads, bias_grads):
            self._record_probe(entry.layer, weight_grad, bias_grad)
        tag = direction_tag(weight_dtype)  # as _note_directions does per layer, here once for all
        if tag != 1.0:
            d_weight.mul_(tag)
            if d_bias is not None:
                d_bias.mul_(tag)
        # As AccumulateGrad: a missing .grad becomes the new gradient (here a view of the batched
        # result, no copy), an existing one is added to (gradient accumulation, a weight used twice).
        targets, values = [], []
        for entry, weight_grad, bias_grad in zip(entries, weight_grads, bias_grads):
            for param, grad in zip(entry.layer.params, (weight_grad, bias_grad)):
                if param.grad is None:
                    param.grad = grad
                else:
                    targets.append(param.grad)
                    values.append(grad)
        if targets:
            torch._foreach_add_(targets, values)

    def _stage_coefficients(self, layer: CapturedLayer, micro: int, bank_slot: int | None, by_sample: bool,
                            beta: torch.Tensor, diagonal: torch.Tensor, trace: torch.Tensor | None = None) -> None:
        """Keep a fresh ``β`` (and ``diag K``, or its sum ``trace``) for the bank; ``step()`` stores it if applied."""
        if by_sample:
            self._pending.setdefault(id(layer), []).append((None, micro, beta.float(), diagonal.float()))
        elif bank_slot is not None:
            trace = diagonal.float().sum(0) if trace is None else trace
            self._pending.setdefault(id(layer), []).append((bank_slot, micro, beta.float(), trace))

    def _stats(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self._stat_dtype_for(tensor.dtype)
        return tensor if tensor.dtype == dtype else tensor.to(dtype)

    def _stat_dtype_for(self, dtype: torch.dtype) -> torch.dtype:
        # None: a float64 model's statistics in float64 (its exactness is float64's), anything else in float32.
        return self.stat_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)

    def _fresh_coefficients(
        self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor, scale: float, group: dict, tokens=None
    ):
        """``(β, diag(K), λB, ‖K‖_F)`` of one layer and micro-batch; ``tokens`` from ``F.kept_tokens``."""
        gram = F.gram_matrix(x, delta, layer.has_bias, scale, self._gram_path(x), tokens)
        beta, damping_b, norm = self._damped_solve(gram, group)
        return beta, gram.diagonal(), damping_b, norm

    def _damped_solve(self, gram: torch.Tensor, group: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(β, λB used, ‖K‖_F)`` of Gram matrices with any leading dimensions (layers, CW-NGD's units)."""
        norm = torch.linalg.matrix_norm(gram)
        damping_b = F.damping_times_batch(gram, group["damping"], group["damping_mode"], group["damping_floor"], norm)
        beta, damping_b = self._solve(gram, damping_b)
        return beta, damping_b, norm

    def _solve(self, gram: torch.Tensor, damping_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(β, λB used)``. Checked per layer (one host sync each, retries with more damping) or,
        on GPUs, once in ``step()``: a GPU step is bound by the host, and 96 syncs per step stall it."""
        mode = self.solve_check
        if mode == "auto":
            mode = "per_step" if self._launch_bound(gram) else "per_layer"
        if mode == "per_layer" or self._solve_check_fell_back:
            return F.solve_coefficients(gram, damping_b)
        beta, damping_b, info = F.solve_coefficients_deferred(gram, damping_b)
        self._note_factored(info)
        return beta, damping_b

    def _solve_failed(self) -> None:
        self._solve_check_fell_back = True
        warnings.warn(
            f"{type(self).__name__} skipped step {self.global_step}: a damped Gram matrix was not positive "
            "definite in floating point, and solve_check='per_step' checks only at step() time. Parameters, "
            "momentum and statistics are unchanged; from now on every solve is checked where it happens and "
            "retried with more damping (solve_check='per_layer').",
            RuntimeWarning,
            stacklevel=3,
        )

    def _gram_path(self, x: torch.Tensor) -> str:
        # Measured (benchmarks/step_time.py --micro): on GPUs the token Gram is as fast or faster for
        # Transformer layer shapes and needs less memory; on CPUs the multiply-add count decides.
        if self.gram_path == "auto" and self._launch_bound(x):
            return "token"
        return self.gram_path

    @staticmethod
    def _launch_bound(tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s device runs FNGD's GPU choices (the ``"auto"`` of ``solve_check``, ``gram_path``
        and ``batch_layers``): on a GPU the step is bound by the host's kernel launches and syncs, not the
        arithmetic. ``benchmarks/step_time.py --gpu-code-path`` answers True here to time that path on a CPU."""
        return tensor.is_cuda

    def _trace(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
        return F.gram_trace(x, delta, layer.has_bias, scale)

    @staticmethod
    def _missing_ids_message() -> str:
        return (
            "share_by='sample' needs the ids of every micro-batch's samples: call opt.set_sample_ids(ids) "
            "(dataset indices, or fngd_hf.sample_sharing.sample_keys(input_ids, labels)) before each "
            "backward, or use FNGDTrainer, which does it."
        )

    def _accumulation_correction(self, layer: CapturedLayer, group: dict) -> float:
        """Factor fixing ``d`` when the micro-batch count differs from the declared one."""
        observed, declared = layer.micro_batches, self._accumulation
        if observed in (0, declared):
            return 1.0
        if self.loss_divided_by == "gradient_accumulation_steps":
            # Each micro-batch loss was divided by `declared` (accelerator.backward, also in an epoch's shorter
            # last window), as the per-sample scale assumed: every d_m is exact, only the average is short.
            return declared / observed
        relative = group["damping_mode"] == "relative"
        if not self._fixed_accumulation_warned:
            self._fixed_accumulation_warned = True
            consequence = (
                "with relative damping the step was rescaled, which is exact only if each micro-batch loss "
                f"was divided by {observed} (FNGDTrainer does this; a stock Trainer may not)"
                if relative
                else f"with fixed damping the per-sample gradient scale was taken as {declared}"
            )
            warnings.warn(
                f"{type(self).__name__} saw {observed} backward passes before step() but "
                f"gradient_accumulation_steps={declared}: {consequence}. Set "
                f"gradient_accumulation_steps={observed} for the exact average (in an accelerate loop, "
                f"call fngd_hf.attach_accelerator(accelerator, optimizer), since accelerator.backward divides "
                f"every micro-batch loss by its gradient_accumulation_steps).",
                RuntimeWarning,
                stacklevel=4,
            )
        if relative:
            # d_m scales like 1/(per-sample scale) and the average divides by the count.
            return (declared / observed) ** 2
        return declared / observed

    # -------------------------------------------------------------------- coefficient bank
    _float32_state_keys = ("coef_bank", "coef_size", "coef_trace", "coef_sample", "coef_sample_diag")

    def _discard_staged(self) -> None:
        self._deferred.clear()  # layers of a backward that raised before its end
        self._deferred_bytes.clear()
        self._fold_diagnostics()
        self._shared_weights.clear()
        self._pending.clear()
        self._sample_ids.clear()
        self._sample_rows.clear()

    def _after_step(self) -> None:
        """Store the coefficients staged by this step's backward (never those of a skipped step)."""
        if self.share_by == "sample":
            self._store_by_sample()
            return
        period = self._steps_per_epoch
        if period is not None and self._store_stacked(period):
            return
        writes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (bank view, value), all layers
        tails: list[torch.Tensor] = []
        size_values: dict[tuple[int, torch.device], torch.Tensor] = {}
        for layer in self._layers:
            entries = self._pending.get(id(layer))
            if not entries:
                continue
            micros, batch = max(e[1] for e in entries) + 1, max(e[2].shape[0] for e in entries)
            slots = max(e[0] for e in entries) + 1
            state = self._reserve_bank(layer, period, micros, batch, entries[0][2], slots)
            bank, host = state["coef_bank"], self._host_size_table(layer)
            for slot, micro, beta, trace in entries:
                if beta.shape[0] < bank.shape[2]:
                    tails.append(bank[slot, micro, beta.shape[0]:])
                size = state["coef_size"][slot, micro]
                key = (beta.shape[0], size.device)
                if key not in size_values:  # one small tensor per batch size, not one per layer
                    size_values[key] = size.new_full((), beta.shape[0])
                writes += [(bank[slot, micro, : beta.shape[0]], beta), (state["coef_trace"][slot, micro], trace),
                           (size, size_values[key])]
                host[slot, micro] = beta.shape[0]  # the host copy follows the tensor: no device read later
        if writes:
            # Three multi-tensor kernels per step instead of four kernels per layer (GPU host time).
            if tails:
                torch._foreach_zero_(tails)
            by_dtype: dict[torch.dtype, tuple[list, list]] = {}
            for view, value in writes:
                targets, values = by_dtype.setdefault(view.dtype, ([], []))
                targets.append(view)
                values.append(value)
            for targets, values in by_dtype.values():
                torch._foreach_copy_(targets, values)

    def _store_stacked(self, period: int) -> bool:
        """Store this step's coefficients of every layer with a few writes into the stacked banks, when every
        layer staged the same (slot, micro-batch, batch size) entries and the banks hold them (the usual
        case after the first step). ``False``: nothing was written, the per-layer path stores them."""
        staged = [self._pending.get(id(layer)) for layer in self._layers]
        if not staged or not all(staged):
            return False
        keys = [(slot, micro, beta.shape[0]) for slot, micro, beta, _ in staged[0]]
        if any([(slot, micro, beta.shape[0]) for slot, micro, beta, _ in entries] != keys for entries in staged[1:]):
            return False
        stacked = self._stacked_banks()
        if stacked is None:
            return False
        bank, sizes, traces = stacked
        if bank.shape[1] != period or max(k[1] for k in keys) >= bank.shape[2] or max(k[2] for k in keys) > bank.shape[3]:
            return False  # a new epoch length or a bigger batch: the per-layer path grows the banks
        hosts = [self._host_size_table(layer) for layer in self._layers]
        for index, (slot, micro, batch) in enumerate(keys):
            bank[:, slot, micro, :batch] = torch.stack([entries[index][2] for entries in staged])
            if batch < bank.shape[3]:
                bank[:, slot, micro, batch:] = 0.0
            traces[:, slot, micro] = torch.stack([entries[index][3] for entries in staged])
            sizes[:, slot, micro] = batch
            for host in hosts:
                host[slot, micro] = batch  # the host copy follows the tensor: no device read later
        return True

    def _reserve_bank(self, layer: CapturedLayer, period: int | None, micros: int, batch: int, like: torch.Tensor,
                      slots: int = 0):
        """The layer's bank, grown (or restarted) so that ``micros`` micro-batches of ``batch`` samples fit;
        ``period=None`` (epoch length being learnt): at least ``slots`` rows, grown geometrically."""
        state = self.state[layer.weight]
        bank = state.get("coef_bank")
        unit_shape = tuple(like.shape[1:])  # CW-NGD: one beta per unit
        rows = period if period is not None else max(slots, 2 * (0 if bank is None else bank.shape[0]))
        if bank is None or (period is not None and bank.shape[0] != period) or tuple(bank.shape[3:]) != unit_shape:
            if bank is not None:
                warnings.warn(
                    f"steps_per_epoch changed to {period}: the coefficient bank of {layer.name} restarts",
                    RuntimeWarning,
                )
            state["coef_bank"] = like.new_zeros(rows, micros, batch, *unit_shape)
            state["coef_size"] = torch.zeros(rows, micros, dtype=torch.int64, device=like.device)
            state["coef_trace"] = like.new_zeros(rows, micros, *unit_shape)
            self._host_sizes[id(layer)] = {}
        bank = state["coef_bank"]
        if period is None and bank.shape[0] < slots:  # learning the epoch length: more rows
            for key in self._stacked_keys:
                old = state[key]
                grown = old.new_zeros(rows, *old.shape[1:])
                grown[: old.shape[0]] = old
                state[key] = grown
            bank = state["coef_bank"]
        if micros > bank.shape[1] or batch > bank.shape[2]:
            micro_cap, batch_cap = max(micros, bank.shape[1]), max(batch, bank.shape[2])
            grown = like.new_zeros(bank.shape[0], micro_cap, batch_cap, *unit_shape)
            grown[:, : bank.shape[1], : bank.shape[2]] = bank
            sizes = state["coef_size"].new_zeros(bank.shape[0], micro_cap)
            sizes[:, : bank.shape[1]] = state["coef_size"]
            traces = like.new_zeros(bank.shape[0], micro_cap, *unit_shape)
            traces[:, : bank.shape[1]] = state["coef_trace"]
            state["coef_bank"], state["coef_size"], state["coef_trace"] = grown, sizes, traces
        return state

    # ------------------------------------------------------------- bank by sample (share_by)
    def _micro_batch_ids(self, micro: int, batch: int) -> list[int]:
        if micro not in self._sample_ids:  # the first layer of this micro-batch's backward binds the ids
            if self._next_sample_ids is None:
                raise ValueError(self._missing_ids_message())
            self._sample_ids[micro], self._next_sample_ids = self._next_sample_ids, None
        ids = self._sample_ids[micro]
        if len(ids) != batch:
            raise ValueError(
                f"set_sample_ids got {len(ids)} ids for micro-batch {micro}, but the managed layers see "
                f"{batch} samples (the first dimension of their input)"
            )
        return ids

    def _stored_sample_coefficients(self, layer: CapturedLayer, micro: int, batch: int, device):
        """``(β, Σ stored diag K)`` of this micro-batch's samples if all were seen before, else ``None``."""
        ids = self._micro_batch_ids(micro, batch)
        if micro not in self._sample_rows:  # looked up once per micro-batch, for every layer
            rows = self._sample_index.rows(ids)
            self._sample_rows[micro] = None if rows is None else torch.tensor(rows, device=device)
        rows = self._sample_rows[micro]
        if rows is None or layer.name in self._incomplete_layers:
            return None
        state = self.state[layer.weight]
        return state["coef_sample"].index_select(0, rows), state["coef_sample_diag"].index_select(0, rows).sum(0)

    def _store_by_sample(self) -> None:
        """Give the samples first seen in this step their rows and coefficients, in every layer."""
        staged = [self._pending.get(id(layer)) for layer in self._layers]
        if not any(staged) and not _distributed():
            return
        micros = sorted(self._sample_ids)
        # A step that computed nothing fresh (every sample seen) contributes no ids.
        ids = [key for micro in micros for key in self._sample_ids[micro]] if any(staged) else []
        per_layer = []
        for layer, entries in zip(self._layers, staged):
            if ids and (not entries or sorted(e[1] for e in entries) != micros):
                per_layer.append(None)  # e.g. a layer that did not run: it cannot serve these samples
                continue
            entries = sorted(entries or [], key=lambda entry: entry[1])
            empty = torch.zeros(0, *self._coefficient_shape(layer), dtype=torch.float32, device=layer.weight.device)
            per_layer.append(tuple(torch.cat([empty] + [e[k] for e in entries]) for k in (2, 3)))
        ids, per_layer = self._gather_across_ranks(ids, per_layer)
        positions, rows = self._sample_index.add(ids)
        if not positions:
            return
        index = torch.tensor(positions)
        for layer, values in zip(self._layers, per_layer):
            if values is None:
                self._incomplete_layers.add(layer.name)
                continue
            state = self.state[layer.weight]
            needed = len(self._sample_index)
            for key, value in zip(("coef_sample", "coef_sample_diag"), values):
                bank = state.get(key)
                if bank is None or bank.shape[0] < needed:  # grow geometrically: O(1) amortised per sample
                    grown = value.new_zeros(max(needed, 2 * (0 if bank is None else bank.shape[0])), *value.shape[1:])
                    if bank is not None:
                        grown[: bank.shape[0]] = bank
                    state[key] = bank = grown
                bank[torch.tensor(rows, device=value.device)] = value.index_select(0, index.to(value.device))

    def _coefficient_shape(self, layer: CapturedLayer) -> tuple[int, ...]:
        """Shape of one sample's coefficient: a number for FNGD (CW-NGD: one per output unit)."""
        return ()

    def _gather_across_ranks(self, ids: list[int], per_layer: list):
        """Under DDP every rank stores every rank's new samples: the sampler moves samples between ranks.

        A collective: every rank calls it at every applied step, whether or not it has new samples.
        A layer that could not store on some rank is left out (``None``) on every rank.
        """
        if not _distributed():
            return ids, per_layer
        world = torch.distributed.get_world_size()
        gathered_ids: list = [None] * world
        torch.distributed.all_gather_object(gathered_ids, ids)
        present: list = [None] * world
        torch.distributed.all_gather_object(present, [values is not None for values in per_layer])
        width = max(len(rank_ids) for rank_ids in gathered_ids)
        if width == 0:
            return [], per_layer
        merged = []
        for layer, values, everywhere in zip(self._layers, per_layer, map(all, zip(*present))):
            if not everywhere:
                merged.append(None)
                continue
            parts = []
            for tensor in values:
                padded = tensor.new_zeros(width, *tensor.shape[1:])
                padded[: tensor.shape[0]] = tensor
                chunks = [torch.empty_like(padded) for _ in range(world)]
                torch.distributed.all_gather(chunks, padded)
                parts.append(torch.cat([c[: len(r)] for c, r in zip(chunks, gathered_ids)]))
            merged.append(tuple(parts))
        return [key for rank_ids in gathered_ids for key in rank_ids], merged

    # ------------------------------------------------------------------------ diagnostics
    @staticmethod
    def _empty_diagnostics() -> dict[str, float]:
        return {"damping": 0.0, "gram_norm": 0.0, "fresh": 0, "shared": 0}

    def _fold_diagnostics(self) -> None:
        """Add the staged per-layer damping and Gram norms to the running sums: a few kernels per step."""
        by_batch: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for damping_b, norm, batch in self._diag_staged:
            by_batch.setdefault(batch, []).append((damping_b, norm))
        self._diag_staged = []
        for batch, entries in by_batch.items():
            # CW-NGD has one value per output unit: its layer's mean.
            dampings, norms = ([t.float() if t.dim() == 0 else t.float().mean() for t in column] for column in zip(*entries))
            self._diag["damping"] = self._diag["damping"] + torch.stack(dampings).sum() / batch
            self._diag["gram_norm"] = self._diag["gram_norm"] + torch.stack(norms).sum()

    def diagnostics(self) -> dict[str, float]:
        """Means over the layer-micro-batches since the last call, then reset.

        ``fngd/trust_clipped`` (with a trust region): the share of (layer, step) pairs whose update
        the trust region shrank.
        """
        self._fold_diagnostics()
        diag, self._diag = self._diag, self._empty_diagnostics()
        fresh, total = diag["fresh"], diag["fresh"] + diag["shared"]
        return {
            "fngd/damping": float(diag["damping"]) / fresh if fresh else math.nan,
            "fngd/gram_norm": float(diag["gram_norm"]) / fresh if fresh else math.nan,
            "fngd/fresh_fraction": fresh / total if total else math.nan,
            "fngd/skipped_steps": float(self.skipped_steps),
            **self.trust_region_diagnostics("fngd"),
        }


    # -------------------------------------------------------------------------- state dict
    def _extra_state(self) -> dict:
        return {
            "steps_per_epoch": self._steps_per_epoch,
            "share_coefficients": self.share_coefficients,
            "scale_mode": self.scale_mode,
            "share_by": self.share_by,
            "shared_phase": self.shared_phase,
            "solve_check_fell_back": self._solve_check_fell_back,
            "sample_ids": self._sample_index.to_tensor(),
            "incomplete_layers": sorted(self._incomplete_layers),
        }

    def _holds_rank_local_state(self) -> bool:
        # Sharing by sample gathers every rank's samples: the banks are the same on every rank.
        return self.share_coefficients and self.share_by == "position" and super()._holds_rank_local_state()

    def _forget_cached_state(self) -> None:
        self._host_sizes.clear()
        self._bank_stack = None  # loaded or restored banks replace the stacked one

    def _load_extra_state(self, extra: dict) -> None:
        for key, current in (("share_coefficients", self.share_coefficients), ("share_by", self.share_by),
                             ("scale_mode", self.scale_mode), ("shared_phase", self.shared_phase)):
            if key in extra and extra[key] != current:
                warnings.warn(
                    f"the checkpoint was written with {key}={extra[key]!r}, this optimizer has {current!r}: "
                    f"its coefficients are kept but this run continues differently from the saved one",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self._solve_check_fell_back = bool(extra.get("solve_check_fell_back", False))
        self._sample_index = SampleIndex(extra.get("sample_ids"))
        self._incomplete_layers = set(extra.get("incomplete_layers", ()))
        if extra.get("steps_per_epoch") is not None:
            self.steps_per_epoch = extra["steps_per_epoch"]
