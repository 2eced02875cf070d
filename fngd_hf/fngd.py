"""FNGD: layer-wise natural gradient for Linear layers, AdamW for everything else.

The optimizer itself: its settings, the backward-time maths of one layer (fresh coefficients from
the token Gram matrix, or the bank's stored ones), and its diagnostics and state. The coefficient bank
lives in :mod:`fngd_hf.bank`, the batched end-of-backward engine in :mod:`fngd_hf.batched`; both are
mixins of :class:`FNGD` and import nothing from here.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
from torch import nn

from . import functional as F
from . import settings
from .bank import CoefficientBank, _end_of_dataloader
from .base import LayerwiseOptimizer
from .batched import BatchedFirstEpoch, _DeferredLayer
from .capture import CapturedLayer
from .graft import AdamWStepLength
from .orthogonal import orthogonalized_directions, unit_layer_directions
from .runtime import _distributed
from .sample_sharing import SampleIndex
from .sampled_fisher import IGNORE_INDEX, sample_labels, sampled_label_loss


class FNGD(BatchedFirstEpoch, CoefficientBank, AdamWStepLength, LayerwiseOptimizer):
    """Inverse-free fast natural gradient descent (Ou et al., 2024) with AdamW for the rest.

    Usage::

        from fngd_hf import FNGD
        opt = FNGD(model, steps_per_epoch=len(train_loader))
        for epoch in range(epochs):
            for batch in train_loader:
                loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad()

    Every managed layer (``nn.Linear`` / ``Conv1D`` except vocabulary heads, or
    ``target_modules``) forms one Fisher block ``[W|b]``. During backward its ``.grad``
    receives the damped natural gradient ``d = Jβ``, ``β = (K + λB I)⁻¹ 1`` (averaged over
    accumulated micro-batches); ``step()`` applies momentum and decoupled weight decay, then moves
    the layer along that direction by Muon's orthogonalised, RMS-matched step (``step_length="muon"``,
    the default: it beat the paper's ``-lr * d`` by 3.0 test BLEU on full Multi30K, 3 seeds) or by ``-lr * d``
    within the trust region (``step_length="trust_region"``, the paper's step with our safeguard).
    ``lr`` and ``adamw_lr`` default to the step length's measured best (``settings.DEFAULT_RATES``:
    6e-3 and 4e-3 for ``"muon"``, 1e-2 and 2e-3 for ``"trust_region"``); so does ``damping`` (relative ``γ``,
    ``settings.DEFAULT_RELATIVE_DAMPING``: 10 for ``"muon"``, 0.1 otherwise; fixed ``λ``: 0.1). All other trainable
    parameters (LayerNorm, embeddings, heads) follow ``torch.optim.AdamW`` exactly.

    With ``share_coefficients=True`` the first ``steps_per_epoch`` steps compute and store
    ``β`` per (layer, step, micro-batch); step ``s`` after that reuses the ``β`` of step
    ``s mod steps_per_epoch`` and computes no Gram matrix (``share_by="position"``, the
    paper's scheme). ``share_by="sample"`` instead stores ``β_n`` per training sample and gives
    every sample the coefficient it got the first time it was seen; it needs the ids of each
    micro-batch's samples (``opt.set_sample_ids(ids)`` before its backward; ``FNGDTrainer``
    passes content hashes) and no epoch length.

    Keyword-only extras: ``nesterov`` (Nesterov momentum in torch.optim.SGD's form, ``d + momentum·buffer``,
    instead of heavy ball), ``adamw_no_decay`` (names, as in ``model.named_parameters()``, of
    parameters the AdamW part does not weight-decay; ``FNGDTrainer`` passes the stock Trainer's
    choice: biases and LayerNorm), ``gradient_accumulation_steps`` (micro-batches per step, sets the
    per-sample gradient scale), ``damping_floor`` (relative mode: ``λ >= damping_floor``),
    ``trust_ratio`` (per-layer trust region ``‖d‖ <= trust_ratio·‖[W|b]‖`` before momentum, so a
    step moves a layer by at most ``lr·trust_ratio`` of its norm; ``"auto"`` = ``min(1, √(B/64))`` for
    relative damping with ``B`` the samples of the step, off for fixed; with ``step_length="muon"``, which has no
    trust region, ``"auto"`` scales Muon's step by ``√(B/64)``, at most 2, and ``None`` leaves it whole), ``scale_mode`` (``"shared"``: reuse ``β`` as stored;
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
:func:`fngd_hf.attach_accelerator` sets it), ``shared_phase`` (after the first epoch: ``"coefficients"``,
    reuse its coefficients, the paper; ``"adamw"``, AdamW on the managed layers' plain gradient),
    ``step_length`` (how far a managed layer moves: ``"muon"``, the default: Muon's orthogonalised,
    RMS-matched step along FNGD's direction, ``lr`` AdamW-scale, :mod:`fngd_hf.orthogonal`; ``"trust_region"``,
    ``lr·d`` bounded by the trust region; ``"adamw"``, grafting: AdamW's update length for that layer along
    FNGD's direction, ``lr`` AdamW-scale, one more weight-gradient matmul per layer; :mod:`fngd_hf.graft`),
    ``normalize_directions`` (Muon's step only, where ``None``, the default, turns it on: each layer's direction
    scaled to unit norm before momentum, so momentum averages directions rather than being held for tens of
    steps by the few whose norm is orders of magnitude larger; :func:`fngd_hf.orthogonal.unit_layer_directions`;
    ``False`` is the momentum of the raw directions, as before), ``launch_bound``
    (``"auto"``: a step on a CUDA tensor is bound by kernel launches, elsewhere by arithmetic; ``True``/``False``
    forces the choices each implies, e.g. to time the GPU path on a CPU), ``drop_padding`` (leave tokens whose
    output gradient is zero, i.e. padding, out of the Gram and the weighted gradient: the same numbers for
    less arithmetic, at one host read per backward in the batched path and per layer in the per-layer path,
    which therefore drops them only on CPUs; ``False`` keeps them). Counters: ``host_reads`` (reads the batched
    path made for its padding drop) and ``peak_held_bytes`` (the most one batched round held).

    ``fisher="monte_carlo"`` (with ``share_coefficients=False``, i.e. NGD) inverts the Monte-Carlo estimate of the
    true Fisher instead of the empirical one: before each backward, :meth:`sampled_fisher_backward` backpropagates
    the loss of labels sampled from the model (``FNGDTrainer`` calls it), and the layer's direction is
    ``(F̂ + λI)⁻¹ḡ = (ḡ - Ĵα)/λ``, ``α = (K̂ + λB I)⁻¹ Ĵᵀḡ`` with ``Ĵ`` the sampled-label per-sample
    gradients (:func:`fngd_hf.functional.sampled_fisher_direction`). One more backward per step, one process, no
    gradient accumulation.
    """

    _supports_sampled_fisher = True  # CW-NGD's per-unit blocks have no Monte-Carlo path

    def __init__(
        self,
        model: nn.Module,
        lr: float | None = None,
        damping: float | None = None,
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
        nesterov: bool = False,
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
        step_length: str = settings.DEFAULT_STEP_LENGTH,
        normalize_directions: bool | None = None,
        launch_bound: bool | str = "auto",
        drop_padding: bool = True,
        fisher: str = "empirical",
    ):
        damping = settings.default_damping(step_length, damping_mode, damping)
        settings.non_negative("damping_floor", damping_floor)
        trust_auto = settings.auto_step_scaling(trust_ratio, step_length, damping_mode)
        trust_ratio = settings.trust_ratio_for_step_length(trust_ratio, step_length, damping_mode)
        lr, adamw_lr = settings.default_rates(step_length, lr, adamw_lr)
        settings.one_of("scale_mode", scale_mode, settings.SCALE_MODES)
        settings.one_of("stat_dtype", stat_dtype, (None, torch.float32, torch.float64))
        settings.one_of("gram_path", gram_path, settings.GRAM_PATHS)
        settings.one_of("share_by", share_by, settings.SHARE_BY)
        settings.one_of("solve_check", solve_check, settings.SOLVE_CHECKS)
        settings.one_of("batch_layers", batch_layers, settings.BATCH_LAYERS)
        settings.one_of("shared_phase", shared_phase, settings.SHARED_PHASES)
        settings.share_by_with_phase(share_by, shared_phase)
        settings.one_of("loss_divided_by", loss_divided_by, settings.LOSS_DIVISORS)
        settings.one_of("launch_bound", launch_bound, settings.LAUNCH_BOUND)
        normalize_directions = settings.resolve_normalize_directions(normalize_directions, step_length)
        settings.one_of("drop_padding", drop_padding, (True, False))
        settings.fisher_with_sharing(fisher, share_coefficients, batch_layers)
        if fisher == "monte_carlo" and not self._supports_sampled_fisher:
            raise ValueError(f"{type(self).__name__} has no fisher='monte_carlo' path (use FNGD or NGD)")
        self.steps_per_epoch = steps_per_epoch  # validates before any layer is captured
        group_options = dict(damping=damping, damping_mode=damping_mode, damping_floor=damping_floor)
        super().__init__(model, settings.LayerwiseSettings.pick(locals()), group_options)
        self.share_coefficients = bool(share_coefficients)
        self.scale_mode = scale_mode
        self.stat_dtype = stat_dtype
        self.gram_path = gram_path
        self.share_by = share_by
        self.solve_check = solve_check
        self.batch_layers = batch_layers
        self.loss_divided_by = loss_divided_by
        self.shared_phase = shared_phase
        self.step_length = step_length
        self.normalize_directions = normalize_directions
        self.launch_bound = launch_bound
        self.drop_padding = drop_padding
        self.fisher = fisher
        self._probing = False  # inside sampled_fisher_backward: layers keep their sampled output gradient
        self._sampled_deltas: dict[tuple[int, int], torch.Tensor] = {}  # (layer, micro-batch) -> δ̂
        self._init_graft()
        self._trust_auto = trust_auto
        self._step_samples: dict[int, int] = {}  # micro-batch -> its samples, this step (the auto trust ratio)
        self._init_batched()
        self._init_bank()
        self._solve_check_fell_back = False  # a per-step check failed once: per-layer checks from then on
        self._fixed_accumulation_warned = False
        self._diag = self._empty_diagnostics()
        self._diag_staged: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (λB, ‖K‖_F, B) since the last step

    # ---------------------------------------------------------------- backward-time maths
    def _managed_by_adamw(self) -> bool:
        period = self._steps_per_epoch
        return (self.shared_phase == "adamw" and self.share_coefficients and period is not None
                and self.global_step >= period)

    def step(self, closure=None):
        loss = super().step(closure)
        if self._learning_epoch_length and _end_of_dataloader():
            self._learn_epoch_length(self.global_step)
        return loss

    def _layer_gradient(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor):
        """Called from the layer's backward: the micro-batch's natural gradient, already averaged.

        ``x`` and ``delta`` are outside any graph (the capture detaches them under ``create_graph``)."""
        if self._probing:
            self._sampled_deltas[(layer.index, layer.micro_batches)] = delta
            return None, None  # no gradient: sampled_fisher_backward only gathers δ̂
        if self.fisher == "monte_carlo":
            return self._sampled_fisher_gradient(layer, x, delta, self.param_groups[0])
        if self._grafting:
            self._record_plain_gradient(layer, x, delta)
        micro = layer.micro_batches
        batch = x.shape[0]
        self._step_samples.setdefault(micro, batch)
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
            if self.drop_padding and x.shape[1] > 1 and not self._launch_bound(x) and x.device.type == "cpu":
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

    def sampled_fisher_backward(self, logits: torch.Tensor, labels: torch.Tensor | None = None,
                                ignore_index: int = IGNORE_INDEX, generator: torch.Generator | None = None) -> torch.Tensor:
        """``fisher="monte_carlo"``: call after the forward and before ``loss.backward()``. Draws one label per
        position from ``softmax(logits)`` (positions whose ``labels`` are ``ignore_index`` stay ignored), and
        backpropagates their token-mean cross-entropy through the managed layers only, keeping the graph for the
        data's backward and leaving every ``.grad`` unchanged. Returns the sampled labels."""
        if self.fisher != "monte_carlo":
            raise ValueError(f"sampled_fisher_backward is for fisher='monte_carlo' (this optimizer has {self.fisher!r})")
        if self._accumulation != 1 or _distributed():
            raise ValueError("fisher='monte_carlo' supports one process without gradient accumulation")
        sampled = sample_labels(logits, labels, ignore_index, generator)
        weights = [layer.weight for layer in self._layers if layer.weight.requires_grad]
        if not weights:
            raise ValueError("fisher='monte_carlo': no managed layer has a trainable weight")
        self._sampled_deltas.clear()
        self._probing = True
        try:
            torch.autograd.backward(sampled_label_loss(logits, sampled, ignore_index), inputs=weights,
                                    retain_graph=True)
        finally:
            self._probing = False
        return sampled

    def _sampled_fisher_gradient(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor, group: dict):
        """``(F̂ + λI)⁻¹ḡ`` of one layer from the sampled output gradients gathered by ``sampled_fisher_backward``
        (no coefficients to share: ``fisher_with_sharing`` refused sharing)."""
        sampled = self._sampled_deltas.pop((layer.index, layer.micro_batches), None)
        if sampled is None or sampled.shape != delta.shape:  # raises before any state changes
            raise RuntimeError(
                f"{layer.name}: fisher='monte_carlo' needs opt.sampled_fisher_backward(logits, labels) after the "
                "forward and before each loss.backward() (FNGDTrainer calls it; a stock Trainer does not, so use "
                "FNGDTrainer or fisher='empirical')"
            )
        if self._grafting:
            self._record_plain_gradient(layer, x, delta)
        batch = x.shape[0]
        self._step_samples.setdefault(layer.micro_batches, batch)
        layer.micro_batches += 1
        scale = float(batch)  # g_n = B · (sample n's contribution): no accumulation here
        x, delta, sampled = self._stats(x), self._stats(delta), self._stats(sampled)
        gram = F.gram_matrix(x, sampled, layer.has_bias, scale, self._gram_path(x))
        plain = F.plain_gradient(x, delta, layer.has_bias, layer.transposed)  # ḡ, once for both uses below
        products = F.sampled_gradient_products(x, sampled, plain, scale, layer.transposed)
        alpha, damping_b, norm = self._damped_solve(gram, group, rhs=products)
        self._diag_staged.append((damping_b, norm, batch))
        self._diag["fresh"] += 1
        self._note_finite(alpha)
        return F.sampled_fisher_direction(x, plain, sampled, alpha, damping_b, layer.transposed)

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

    def _damped_solve(self, gram: torch.Tensor, group: dict, rhs: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(β, λB used, ‖K‖_F)`` of Gram matrices with any leading dimensions (layers, CW-NGD's units);
        ``rhs`` replaces the ``1`` of ``β = (K + λB I)⁻¹ 1`` (the Monte-Carlo Fisher's ``Ĵᵀḡ``)."""
        norm = torch.linalg.matrix_norm(gram)
        damping_b = F.damping_times_batch(gram, group["damping"], group["damping_mode"], group["damping_floor"], norm)
        beta, damping_b = self._solve(gram, damping_b, rhs)
        return beta, damping_b, norm

    def _solve(self, gram: torch.Tensor, damping_b: torch.Tensor, rhs: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(β, λB used)``. Checked per layer (one host sync each, retries with more damping) or,
        on GPUs, once in ``step()``: a GPU step is bound by the host, and 96 syncs per step stall it."""
        mode = self.solve_check
        if mode == "auto":
            mode = "per_step" if self._launch_bound(gram) else "per_layer"
        if mode == "per_layer" or self._solve_check_fell_back:
            return F.solve_coefficients(gram, damping_b, rhs=rhs)
        beta, damping_b, info = F.solve_coefficients_deferred(gram, damping_b, rhs)
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

    def _launch_bound(self, tensor: torch.Tensor) -> bool:
        """Whether to make FNGD's GPU choices (the ``"auto"`` of ``solve_check``, ``gram_path`` and
        ``batch_layers``; no per-layer padding drop): on a GPU the step is bound by the host's kernel launches
        and syncs, not the arithmetic. ``launch_bound=True`` makes them on a CPU too
        (``benchmarks/step_time.py --gpu-code-path`` times that path there)."""
        return tensor.is_cuda if self.launch_bound == settings.AUTO else self.launch_bound

    def _trace(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
        return F.gram_trace(x, delta, layer.has_bias, scale)

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

    def _trust_scale(self) -> float:
        """``trust_ratio="auto"``: shrink the trust region, or Muon's step, for steps of fewer than 64 samples
        (all processes); grow Muon's step above 64, up to ``settings.AUTO_MUON_MAX_SCALE``."""
        if not self._trust_auto or not self._step_samples:
            return 1.0
        world = torch.distributed.get_world_size() if _distributed() else 1
        return settings.auto_trust_scale(sum(self._step_samples.values()) * world, self.step_length)

    def _before_momentum(self, params: list, directions: list, owner: list[int]) -> list:
        if not self.normalize_directions:
            return directions
        owner_index, _ = self._owner_index(owner, [p.numel() for p in params], directions[0].device)
        return unit_layer_directions(directions, owner_index, len(self._layers))

    def _scale_step(self, params: list, directions: list, owner: list[int], group: dict) -> list:
        if self.step_length == "muon":
            steps = orthogonalized_directions(params, directions, owner, self._layers)
            scale = self._trust_scale()
            # out of place: a layer without a weight gradient keeps its momentum buffer in ``steps``
            return steps if scale == 1.0 else list(torch._foreach_mul(steps, scale))
        if not self._grafting:
            return directions
        owner_index, _ = self._owner_index(owner, [p.numel() for p in params], directions[0].device)
        return self._graft(params, directions, owner_index, group)

    def _discard_staged(self) -> None:
        self._step_samples.clear()
        self._sampled_deltas.clear()
        self._discard_plain_gradients()
        self._discard_deferred()
        self._fold_diagnostics()
        self._discard_bank_staging()

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
            **self._step_diagnostics("fngd"),
        }

    # -------------------------------------------------------------------------- state dict
    def _extra_state(self) -> dict:
        return {
            "steps_per_epoch": self._steps_per_epoch,
            "share_coefficients": self.share_coefficients,
            "scale_mode": self.scale_mode,
            "share_by": self.share_by,
            "shared_phase": self.shared_phase,
            "step_length": self.step_length,
            "normalize_directions": self.normalize_directions,
            "fisher": self.fisher,
            "solve_check_fell_back": self._solve_check_fell_back,
            "sample_ids": self._sample_index.to_tensor(),
            "incomplete_layers": sorted(self._incomplete_layers),
        }

    def _load_extra_state(self, extra: dict) -> None:
        if "step_length" in extra and "normalize_directions" not in extra:
            extra = {**extra, "normalize_directions": False}  # written before the setting existed: raw momentum
        for key, current in (("share_coefficients", self.share_coefficients), ("share_by", self.share_by),
                             ("scale_mode", self.scale_mode), ("shared_phase", self.shared_phase),
                             ("step_length", self.step_length),
                             ("normalize_directions", self.normalize_directions), ("fisher", self.fisher)):
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
