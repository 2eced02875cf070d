"""SNGD: structured natural gradient with local Fisher layers (Liu et al.), AdamW for everything else.

The paper reconstructs the network: every managed layer ``y = Ŵ x̂`` gets a *local Fisher layer*
in front of it, ``y = W' (G^{-1/2} x̂)`` with ``W' = Ŵ G^{1/2}`` (``w' = G^{1/2} w`` for each row
``w`` of ``Ŵ``), and plain gradient descent on ``W'`` follows the natural-gradient path on ``Ŵ``.
Here the local factor is the layer's input second moment ``G = E[x̂ x̂ᵀ]`` (the K-FAC ``A``
factor, the paper's "linear" local Fisher matrix), so the local Fisher layer whitens the layer
input, which is why the paper compares it with batch normalisation.

This module never changes the model: the reparameterisation is applied as the equivalent
preconditioner. With ``G`` fixed, the gradient of ``W'`` is ``ḡ G^{-1/2}`` and a step
``W' ← W' - η ḡ G^{-1/2}`` moves ``Ŵ = W' G^{-1/2}`` by ``-η ḡ G^{-1}``. So during backward each
managed layer's ``.grad`` receives ``d = ḡ (G + λI)^{-1}`` and the checkpoint stays an ordinary
transformers checkpoint.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
from torch import nn

from . import matrix_functions as mf
from . import settings
from .base import LayerwiseOptimizer
from .capture import CapturedLayer

_FACTOR_DTYPE = torch.float64  # Nyström and Denman–Beavers run in float64; state stays in stat_dtype
_DAMPING_RETRIES = 3  # a factor that is not numerically SPD gets 10x the damping, this many times


class SNGD(LayerwiseOptimizer):
    """Structured natural gradient descent (local Fisher layers) with AdamW for the rest.

    Usage::

        from fngd_hf.sngd import SNGD
        opt = SNGD(model, lr=0.1, damping=0.1, rank=128, update_freq=10)
        for batch in train_loader:
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()

    Every managed layer (``nn.Linear`` / ``Conv1D`` except vocabulary heads, or
    ``target_modules``) with ``Ŵ = [W | b]`` (``o × n``, ``n = i + 1`` with a bias) and inputs
    ``x̂ = [x; 1]`` gets, during backward,

        d = ḡ (G + λ I)^{-1},   ḡ = Δᵀ X̂ (the layer's plain gradient)

    with ``G`` a bias-corrected exponential moving average (decay ``stat_decay``) of the per-step
    input second moment ``C = Σ_t x̂_t x̂_tᵀ / N`` over the ``N`` tokens whose output gradient is
    not exactly zero (padding and ignored labels do not count), and ``λ = damping · tr(G)/n``
    (``damping_mode="relative"``) or ``λ = damping`` (``"fixed"``). ``step()`` then applies the
    trust region, decoupled weight decay, momentum and ``-lr``. Every other trainable parameter
    follows ``torch.optim.AdamW`` exactly.

    ``G^{-1}`` is refreshed every ``update_freq`` applied steps (and after a layer's first
    step) from the committed statistics; steps in between reuse it. Layers with ``n <= rank``
    (or ``rank=None``) keep ``G`` densely and take ``(G + λI)^{-1} = ((G + λI)^{-1/2})²`` from
    Denman–Beavers iterations. Larger layers keep only the sketch ``G Ω`` (``Ω`` a fixed random
    ``n × rank`` orthonormal matrix per layer, from ``seed``) and ``tr G``: a Nyström
    approximation ``G ≈ Q M Qᵀ + ρ (I - Q Qᵀ)`` (``ρ`` the mean of the eigenvalues it misses,
    which keeps the trace) is powered by Denman–Beavers on the ``rank × rank`` core and applied by
    the Woodbury-like identity at ``O(o · n · rank)`` per micro-batch.

    The first step of a layer has no committed statistics yet; it uses the statistics of its
    own first micro-batch. Statistics are staged in backward and committed only when the step is
    applied; a skipped (non-finite) step changes nothing.

    Keyword-only extras: ``damping_mode`` (``"relative"`` or ``"fixed"``), ``seed`` (the sketches),
    ``stat_dtype`` (float32 or float64 statistics, factors and preconditioning; the factor maths
    itself always runs in float64), ``gradient_accumulation_steps`` (micro-batches per step; as for
    FNGD, each micro-batch backpropagates its mean loss divided by the number of micro-batches, so
    the directions, linear in ``ḡ``, sum to the accumulated batch's; the count only serves the
    correction when fewer micro-batches arrive than declared), ``trust_ratio``
    (per-layer trust region ``‖d‖ <= trust_ratio·‖[W|b]‖``), ``nesterov`` (as FNGD's), ``clip_update_norm`` (global clip of
    the applied update ``lr·(momentum buffer)``).
    """

    name = "sngd"

    _float32_state_keys = (
        "sngd_stat",  # EMA of G (dense, n × n) or of G Ω (Nyström, n × rank), not bias-corrected
        "sngd_trace",  # EMA of tr G (Nyström layers)
        "sngd_weight",  # EMA bias correction: G = sngd_stat / sngd_weight
        "sngd_omega",  # the fixed sketch Ω (Nyström layers)
        "sngd_precond",  # dense: (G + λI)^{-1}
        "sngd_basis",  # Nyström: Q
        "sngd_core",  # Nyström: C, with (G + λI)^{-1} ≈ Q C Qᵀ + c I
        "sngd_scale",  # Nyström: c
    )

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        target_modules: Iterable[str] | None = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        adamw_no_decay: Iterable[str] | None = None,
        rank: int | None = 128,
        update_freq: int = 10,
        db_iterations: int = 20,
        stat_decay: float = 0.95,
        damping_mode: str = "relative",
        seed: int = 0,
        stat_dtype: torch.dtype = torch.float32,
        gradient_accumulation_steps: int = 1,
        trust_ratio: float | None = None,
        clip_update_norm: float | None = None,
    ):
        settings.positive("damping", damping)
        settings.one_of("damping_mode", damping_mode, settings.DAMPING_MODES)
        settings.positive_int("rank", rank, optional=True)
        settings.positive_int("update_freq", update_freq)
        settings.positive_int("db_iterations", db_iterations)
        settings.fraction("stat_decay", stat_decay)
        settings.one_of("stat_dtype", stat_dtype, (torch.float32, torch.float64))
        super().__init__(
            model, settings.LayerwiseSettings.pick(locals()), group_options=dict(damping=damping, damping_mode=damping_mode)
        )
        self.rank = None if rank is None else int(rank)
        self.update_freq = int(update_freq)
        self.db_iterations = int(db_iterations)
        self.stat_decay = float(stat_decay)
        self.seed = int(seed)
        self.stat_dtype = stat_dtype
        self._index = {id(layer): i for i, layer in enumerate(self._layers)}
        # Per layer, this step's statistics summed over micro-batches (committed in _after_step).
        self._staged: dict[int, dict[str, torch.Tensor]] = {}
        self._diag = self._empty_diagnostics()

    # ------------------------------------------------------------------------ layer shapes
    @staticmethod
    def _dims(layer: CapturedLayer) -> tuple[int, int]:
        """``(o, n)``: output units and the width of ``x̂`` (inputs plus one for a bias)."""
        weight = layer.weight
        out_features, in_features = (weight.shape[1], weight.shape[0]) if layer.transposed else weight.shape
        return out_features, in_features + int(layer.has_bias)

    def _is_dense(self, layer: CapturedLayer) -> bool:
        return self.rank is None or self._dims(layer)[1] <= self.rank

    def _omega(self, layer: CapturedLayer, device: torch.device) -> torch.Tensor:
        """The layer's fixed sketch (drawn once from ``seed`` and the layer's index, kept in state)."""
        state = self.state[layer.weight]
        omega = state.get("sngd_omega")
        if omega is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self._index[id(layer)])
            omega = mf.gaussian_sketch(self._dims(layer)[1], self.rank, generator, dtype=self.stat_dtype)
            state["sngd_omega"] = omega = omega.to(device)
        return omega

    # ---------------------------------------------------------------- backward-time maths
    def _layer_gradient(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor):
        """Called from the layer's backward: ``ḡ (G + λI)^{-1}`` of one micro-batch."""
        layer.micro_batches += 1
        flat_delta = delta.detach().reshape(-1, delta.shape[-1])
        # x̂ in the output gradient's dtype, as autograd's own weight gradient would use it (under
        # autocast that is also what the layer multiplied); one matmul gives [ḡ_W | ḡ_b].
        x_hat = x.detach().reshape(-1, x.shape[-1]).to(flat_delta.dtype)
        if layer.has_bias:
            x_hat = nn.functional.pad(x_hat, (0, 1), value=1.0)
        gradient = (flat_delta.T @ x_hat).to(self.stat_dtype)

        staged = self._stage_statistics(layer, x_hat.to(self.stat_dtype), flat_delta)
        factor = self._factor_for_step(layer, staged)
        # Linear in ḡ: the micro-batch directions sum to the accumulated batch's (losses are scaled by 1/GA).
        direction = self._precondition(gradient, factor)
        in_features = direction.shape[1] - int(layer.has_bias)
        d_weight = direction[:, :in_features]
        d_bias = direction[:, in_features] if layer.has_bias else None
        return (d_weight.T if layer.transposed else d_weight), d_bias

    def _stage_statistics(self, layer: CapturedLayer, x_hat: torch.Tensor, flat_delta: torch.Tensor) -> dict:
        """Add this micro-batch's input statistics (in ``stat_dtype``) to the layer's staged sums."""
        active = (flat_delta != 0).any(dim=1).to(self.stat_dtype)  # tokens that reach the loss
        if self._is_dense(layer):
            stat = (x_hat * active[:, None]).T @ x_hat
            trace = stat.diagonal().sum()
        else:
            stat = x_hat.T @ ((x_hat @ self._omega(layer, x_hat.device)) * active[:, None])
            trace = torch.dot(x_hat.square().sum(dim=1), active)
        count = active.sum()
        self._note_finite(stat)
        staged = self._staged.get(id(layer))
        if staged is None:
            staged = self._staged[id(layer)] = {"stat": stat, "trace": trace, "count": count}
        else:
            staged["stat"] = staged["stat"] + stat
            staged["trace"] = staged["trace"] + trace
            staged["count"] = staged["count"] + count
        return staged

    def _factor_for_step(self, layer: CapturedLayer, staged: dict) -> dict:
        """The committed factor; a layer's very first step uses its first micro-batch's statistics."""
        state = self.state[layer.weight]
        if self._factor_key(layer) in state:
            return self._committed_factor(layer, state)
        if "bootstrap" not in staged:
            count = staged["count"].clamp(min=1.0)
            factors, _ = self._compute_factors([layer], [staged["stat"] / count], [staged["trace"] / count])
            staged["bootstrap"] = factors[0]  # a non-finite one gives a non-finite direction: a skipped step
        return staged["bootstrap"]

    def _factor_key(self, layer: CapturedLayer) -> str:
        return "sngd_precond" if self._is_dense(layer) else "sngd_basis"

    def _committed_factor(self, layer: CapturedLayer, state: dict) -> dict:
        if self._is_dense(layer):
            return {"precond": state["sngd_precond"]}
        return {"basis": state["sngd_basis"], "core": state["sngd_core"], "scale": state["sngd_scale"]}

    @staticmethod
    def _precondition(gradient: torch.Tensor, factor: dict) -> torch.Tensor:
        if "precond" in factor:
            return gradient @ factor["precond"]
        return mf.apply_lowrank(gradient, factor["basis"], factor["core"], factor["scale"])

    # --------------------------------------------------------------------- factor refresh
    def _damping(self, trace: torch.Tensor, dim: int, group: dict) -> torch.Tensor:
        if group["damping_mode"] == "fixed":
            return torch.full_like(trace, group["damping"])
        relative = group["damping"] * trace / dim
        # A layer with no input statistics at all (G = 0) gets P = I: its gradient is zero anyway.
        return torch.where(relative > 0, relative, torch.ones_like(relative))

    def _compute_factors(self, layers: list, stats: list, traces: list) -> tuple[list[dict], list[bool]]:
        """``(G + λI)^{-1}`` (dense) or its Nyström form for each layer, from bias-corrected statistics.

        Layers of the same kind and width are stacked, so Nyström, Denman–Beavers and their host
        syncs run once per group, not once per layer. Returns the factors (in ``stat_dtype``) and,
        per layer, whether its factor is finite (it may not be when even more damping failed).
        """
        group = next(g for g in self.param_groups if g["fngd"])
        groups: dict[tuple[bool, int], list[int]] = {}
        for index, layer in enumerate(layers):
            groups.setdefault((self._is_dense(layer), self._dims(layer)[1]), []).append(index)
        factors: list[dict] = [{} for _ in layers]
        finite = [True for _ in layers]
        for (dense, dim), members in groups.items():
            stat = torch.stack([stats[i] for i in members]).to(_FACTOR_DTYPE)
            if dense:
                gram = (stat + stat.transpose(-1, -2)) * 0.5
                trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
                basis = core = residual = None
            else:
                trace = torch.stack([traces[i] for i in members]).to(_FACTOR_DTYPE)
                omega = torch.stack([self._omega(layers[i], stat.device) for i in members]).to(_FACTOR_DTYPE)
                basis, core = mf.nystrom_from_sketch(omega, stat)
                # Eigenvalues the sketch misses: their mean, so that the approximation keeps tr G.
                missed = trace - core.diagonal(dim1=-2, dim2=-1).sum(-1)
                residual = missed.clamp(min=0.0) / max(dim - self.rank, 1)
                eye = torch.eye(self.rank, dtype=_FACTOR_DTYPE, device=stat.device)
            damping = self._damping(trace, dim, group)
            for _ in range(_DAMPING_RETRIES + 1):
                if dense:
                    eye = torch.eye(dim, dtype=_FACTOR_DTYPE, device=stat.device)
                    _, inv_root = mf.denman_beavers(gram + damping[:, None, None] * eye, self.db_iterations)
                    result = (inv_root @ inv_root + (inv_root @ inv_root).transpose(-1, -2)) * 0.5
                else:
                    # Q (M - ρI) Qᵀ + (ρ + λ) I  =  Q M Qᵀ + ρ (I - QQᵀ) + λ I
                    result, scale = mf.lowrank_plus_identity_power(
                        basis, core - residual[:, None, None] * eye, residual + damping, -1,
                        iterations=self.db_iterations,
                    )
                bad = ~torch.isfinite(result).flatten(1).all(dim=1)
                if not bool(bad.any()):
                    break
                damping = torch.where(bad, damping * 10.0, damping)
            self._diag["damping"] += float(damping.sum())
            self._diag["refreshes"] += len(members)
            for k, (i, is_bad) in enumerate(zip(members, bad.tolist())):
                finite[i] = not is_bad
                if dense:
                    factors[i] = {"precond": result[k].to(self.stat_dtype)}
                else:
                    factors[i] = {
                        "basis": basis[k].to(self.stat_dtype),
                        "core": result[k].to(self.stat_dtype),
                        "scale": scale[k].to(self.stat_dtype),
                    }
        return factors, finite

    def _after_step(self) -> None:
        """Commit the staged statistics; refresh every layer's factor when it is due."""
        applied = self.global_step - self.skipped_steps  # applied steps before this one
        due = applied % self.update_freq == 0
        decay = self.stat_decay
        refresh = []
        for layer in self._layers:
            state = self.state[layer.weight]
            staged = self._staged.get(id(layer))
            if staged is not None:
                if "sngd_stat" not in state:
                    state["sngd_stat"] = torch.zeros_like(staged["stat"])
                    state["sngd_trace"] = torch.zeros_like(staged["trace"])
                    state["sngd_weight"] = torch.zeros_like(staged["trace"])
                # A step whose micro-batches had no active token leaves the average unchanged.
                has = (staged["count"] > 0).to(staged["count"].dtype)
                new = (1.0 - decay) * has
                keep = 1.0 - new
                count = staged["count"].clamp(min=1.0)
                state["sngd_stat"].mul_(keep).add_(staged["stat"] / count * new)
                state["sngd_trace"].mul_(keep).add_(staged["trace"] / count * new)
                state["sngd_weight"].mul_(keep).add_(new)
            if "sngd_stat" in state and (due or self._factor_key(layer) not in state):
                refresh.append(layer)
        if not refresh:
            return
        states = [self.state[layer.weight] for layer in refresh]
        weights = [s["sngd_weight"].clamp(min=torch.finfo(s["sngd_weight"].dtype).tiny) for s in states]
        factors, finite = self._compute_factors(
            refresh, [s["sngd_stat"] / w for s, w in zip(states, weights)],
            [s["sngd_trace"] / w for s, w in zip(states, weights)],
        )
        for layer, state, factor, ok in zip(refresh, states, factors, finite):
            if not ok:
                warnings.warn(
                    f"{type(self).__name__}: the factor of {layer.name} is not finite even with more damping; "
                    "keeping the previous one.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            for name, value in factor.items():
                state["sngd_" + name] = value

    def _discard_staged(self) -> None:
        self._staged.clear()

    # ------------------------------------------------------------------------ diagnostics
    @staticmethod
    def _empty_diagnostics() -> dict:
        return {"damping": 0.0, "refreshes": 0}

    def diagnostics(self) -> dict[str, float]:
        """Mean damping λ over the factor refreshes since the last call, their count; then reset."""
        diag, self._diag = self._diag, self._empty_diagnostics()
        refreshes = diag["refreshes"]
        return {
            "sngd/damping": diag["damping"] / refreshes if refreshes else math.nan,
            "sngd/refreshes": float(refreshes),
            **self._step_diagnostics("sngd"),
        }

    # -------------------------------------------------------------------------- state dict
    def _extra_state(self) -> dict:
        return {
            "rank": self.rank,
            "update_freq": self.update_freq,
            "stat_decay": self.stat_decay,
            "seed": self.seed,
        }

    def _load_extra_state(self, extra: dict) -> None:
        """Drop a layer's statistics if they were saved under a different ``rank`` or ``seed``."""
        for layer in self._layers:
            state = self.state.get(layer.weight)
            if not state:
                continue
            dense = self._is_dense(layer)
            dim = self._dims(layer)[1]
            stat = state.get("sngd_stat")
            expected = (dim, dim) if dense else (dim, self.rank)
            stale = stat is not None and tuple(stat.shape) != expected
            stale |= (not dense) and extra.get("seed", self.seed) != self.seed and "sngd_omega" in state
            stale |= (not dense and "sngd_precond" in state) or (dense and "sngd_basis" in state)
            if stale:
                warnings.warn(
                    f"{type(self).__name__}: the saved statistics of {layer.name} do not match rank={self.rank}, "
                    f"seed={self.seed}; they restart.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                for key in self._float32_state_keys:
                    state.pop(key, None)
