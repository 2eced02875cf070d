"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse, 2015) on the capture machinery.

Each managed ``Linear``/``Conv1D`` layer is one Fisher block ``[W|b]`` (shape ``(o, i+1)`` with a
bias), approximated by ``G ⊗ A`` with

* ``A = E[x̂ x̂ᵀ]``, ``x̂ = [x; 1]`` (the ``1`` only with a trainable bias): the mean over the
  *counted* tokens of every micro-batch of the step. A token is counted when its output-gradient
  row ``δ_t`` is not all zero: padding (ignored by the loss and masked out of attention) gets an
  exactly zero ``δ`` and would otherwise pull ``A`` towards the padding activations. A layer whose
  every ``δ`` is zero in a step (no counted token) keeps its previous factors.
* ``G = (1/N) Σ_n Σ_t (s δ_{n,t})(s δ_{n,t})ᵀ`` with the per-sample scale ``s = B·M`` (``B``
  samples per micro-batch, ``M`` micro-batches in the step, ``N = B·M``): ``s δ`` is sample
  ``n``'s gradient of its own loss when every micro-batch backpropagates ``(its mean loss) / M``
  (the Hugging Face convention, also FNGD's). Tokens of one sample are summed, samples averaged
  (K-FAC-"expand" for sequences); for an MLP (one token per sample) this is the textbook
  ``G = E[D Dᵀ]`` and ``G ⊗ A`` approximates the empirical Fisher ``(1/N) Σ_n vec(g_n) vec(g_n)ᵀ``
  in the same scale as FNGD's Gram matrix. Accumulating ``M`` micro-batches of ``B`` samples
  gives exactly the factors of one batch of ``B·M`` samples.

Both factors are running averages ``F ← ρ F + (1-ρ) F_batch`` (``ρ = stat_decay``; the first
update takes ``F_batch`` as it is), updated every ``factor_update_freq`` optimizer steps.
Their inverses are refreshed every ``inverse_update_freq`` steps:

* ``inverse_method="eigen"`` (default): ``A = Q_A diag(a) Q_Aᵀ``, ``G = Q_G diag(g) Q_Gᵀ`` and the
  direction is the *exact* damped inverse ``(G ⊗ A + λ I)⁻¹ vec(ḡ)``
  ``= Q_G [(Q_Gᵀ ḡ Q_A) / (g aᵀ + λ)] Q_Aᵀ`` (the damping uses the current ``damping``).
* ``inverse_method="cholesky"``: factored Tikhonov damping without the π rescaling,
  ``(G + √λ I)⁻¹ ḡ (A + √λ I)⁻¹``, inverses by Cholesky (``λ`` at inverse time).

Unlike FNGD, K-FAC preconditions in ``step()``, not in backward: the backward writes the plain
gradient ``ḡ = Σ_t δ_t x̂_tᵀ`` of each micro-batch to ``.grad`` (so micro-batches accumulate as
usual and ``max_grad_norm`` clipping sees real gradients) and *stages* the batch statistics;
``step()`` forms this step's factors (the current batch is used at once, as in the paper), the
inverses when due, replaces ``.grad`` by ``G⁻¹ ḡ A⁻¹`` and then applies the shared trust
region, clipping, weight decay, momentum and learning rate. The new factors and inverses are
committed only after an applied step: a skipped step (non-finite gradient or statistics) leaves
them untouched. The direction is linear in ``ḡ``, so nothing is divided by
``gradient_accumulation_steps``; ``M`` is the number of backward passes the step really saw.

Under ``torch.distributed`` (DDP) the staged statistics are all-reduced before the factors are
formed, so every rank holds the global factors and applies the same update to the DDP-averaged
gradient.

Factors and inverses live in ``optimizer.state[layer.weight]`` as float32 tensors (float64 for
float64 parameters) under the ``kfac_*`` keys, and survive ``state_dict()`` /
``load_state_dict()`` (loadable with ``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from . import settings
from .base import LayerwiseOptimizer
from .capture import CapturedLayer

_EIGEN_KEYS = ("kfac_QA", "kfac_dA", "kfac_QG", "kfac_dG")
_CHOLESKY_KEYS = ("kfac_A_inv", "kfac_G_inv")


def _stat_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: the factors are PSD) and eigenvectors of a symmetric matrix."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return values.clamp(min=0.0), vectors


def _damped_inverse(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    """``(matrix + damping I)⁻¹`` by Cholesky; an eigendecomposition if rounding made it indefinite."""
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    symmetric = (matrix + matrix.T) / 2
    factor, info = torch.linalg.cholesky_ex(symmetric + damping * eye)
    if int(info) == 0:
        return torch.cholesky_inverse(factor)
    values, vectors = _symmetric_eigh(symmetric)
    return (vectors / (values + damping)) @ vectors.T


class KFAC(LayerwiseOptimizer):
    """K-FAC for the managed Linear layers, AdamW for every other parameter.

    Usage::

        from fngd_hf.kfac import KFAC
        opt = KFAC(model, lr=1e-2, damping=0.1)
        for batch in loader:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()

    Arguments shared with FNGD: ``lr``, ``momentum``, ``nesterov``, ``weight_decay`` (decoupled, managed
    layers), ``target_modules``, the ``adamw_*`` settings of the AdamW part,
    ``gradient_accumulation_steps`` (kept for interface parity: K-FAC uses the number of
    backward passes each step really saw), ``trust_ratio`` and ``clip_update_norm``.
    K-FAC's own: ``damping`` (``λ``), ``stat_decay`` (running-average weight of the old
    factors), ``factor_update_freq``, ``inverse_update_freq``, ``inverse_method``
    (``"eigen"`` or ``"cholesky"``, see the module docstring) and ``kl_clip`` (optional: scale
    every managed direction by ``min(1, sqrt(kl_clip / |lr² Σ ⟨d, ḡ⟩|))``, Ba et al. 2017).
    """

    _writes_directions = False  # backward leaves the plain gradient; step() preconditions it

    name = "kfac"
    _float32_state_keys = ("kfac_A", "kfac_G") + _EIGEN_KEYS + _CHOLESKY_KEYS

    def _holds_rank_local_state(self) -> bool:
        return False  # the factors are all-reduced: every rank holds the same

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
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
        stat_decay: float = 0.95,
        factor_update_freq: int = 1,
        inverse_update_freq: int = 10,
        inverse_method: str = "eigen",
        gradient_accumulation_steps: int = 1,
        trust_ratio: float | None = None,
        clip_update_norm: float | None = None,
        kl_clip: float | None = None,
    ):
        settings.positive("damping", damping)
        settings.fraction("stat_decay", stat_decay)
        settings.one_of("inverse_method", inverse_method, settings.INVERSE_METHODS)
        settings.positive("kl_clip", kl_clip, optional=True)
        self.factor_update_freq = settings.positive_int("factor_update_freq", factor_update_freq)
        self.inverse_update_freq = settings.positive_int("inverse_update_freq", inverse_update_freq)
        super().__init__(model, settings.LayerwiseSettings.pick(locals()), group_options=dict(damping=damping))
        self.stat_decay = float(stat_decay)
        self.inverse_method = inverse_method
        self.kl_clip = kl_clip
        # id(layer) -> [sum of x̂x̂ᵀ over counted tokens, counted tokens, Σ_m B_m Σ_t δδᵀ]
        self._staged: dict[int, list[torch.Tensor]] = {}
        # id(layer) -> state entries to write once the step has been applied
        self._to_commit: dict[int, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------------- backward
    def _has_factors(self, layer: CapturedLayer) -> bool:
        state = self.state.get(layer.weight)
        return state is not None and "kfac_A" in state and "kfac_G" in state

    def _is_factor_step(self, layer: CapturedLayer) -> bool:
        return self.global_step % self.factor_update_freq == 0 or not self._has_factors(layer)

    def _layer_gradient(self, layer: CapturedLayer, x: torch.Tensor, delta: torch.Tensor):
        """The plain gradient of the micro-batch; stages its K-FAC statistics on factor steps."""
        layer.micro_batches += 1
        x, delta = x.detach(), delta.detach()
        batch, _, in_features = x.shape
        out_features = delta.shape[-1]
        flat_delta = delta.reshape(-1, out_features)
        # As autograd would: under autocast x may be float32 while delta is bf16.
        flat_x = x.reshape(-1, in_features).to(flat_delta.dtype)
        d_weight = flat_x.T @ flat_delta if layer.transposed else flat_delta.T @ flat_x
        d_bias = flat_delta.sum(dim=0) if layer.has_bias else None

        if self._is_factor_step(layer):
            dtype = _stat_dtype(layer.weight)
            # A backward run inside an autocast region would otherwise do these matmuls in bf16.
            with torch.autocast(device_type=x.device.type, enabled=False):
                xs = x.reshape(-1, in_features).to(dtype)
                ds = flat_delta.to(dtype)
                if layer.has_bias:
                    xs = torch.cat([xs, xs.new_ones(xs.shape[0], 1)], dim=1)
                counted = (ds != 0).any(dim=1).to(dtype)  # padding tokens get an all-zero delta
                a_sum = (xs * counted[:, None]).T @ xs
                count = counted.sum()
                g_sum = (ds.T @ ds) * batch  # (1/B) Σ (B δ)(B δ)ᵀ; the factor M is applied in step()
            self._note_finite(a_sum)
            self._note_finite(g_sum)
            staged = self._staged.get(id(layer))
            if staged is None:
                self._staged[id(layer)] = [a_sum, count, g_sum]
            else:
                staged[0] += a_sum
                staged[1] += count
                staged[2] += g_sum
        return d_weight, d_bias

    # ----------------------------------------------------------------------------- step
    def _accumulation_correction(self, layer: CapturedLayer, group: dict) -> float:
        # The plain micro-batch gradients sum to the step's gradient; the preconditioner is linear.
        return 1.0

    def _synchronise(self, layers: list[CapturedLayer]) -> None:
        """All-reduce the staged statistics over DDP ranks (one collective for every layer)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world == 1 or not layers:
            return
        entries = [self._staged[id(layer)] for layer in layers]
        by_dtype: dict[torch.dtype, list[list[torch.Tensor]]] = {}
        for entry in entries:
            by_dtype.setdefault(entry[0].dtype, []).append(entry)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for entry in group for t in entry])
            torch.distributed.all_reduce(flat)
            offset = 0
            for entry in group:
                for t in entry:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
            for entry in group:
                entry[2] /= world  # G: the mean of the ranks' G (their δ are of the local mean loss)

    def _new_factors(self, layer: CapturedLayer, state: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        staged = self._staged.get(id(layer))
        if staged is None:
            return None
        a_sum, count, g_sum = staged
        micro = max(layer.micro_batches, 1)
        a_batch = a_sum / count.clamp(min=1.0)
        g_batch = g_sum * micro  # per-sample scale B·M: (1/M) Σ_m M² (1/B) Σ (Bδ)(Bδ)ᵀ
        old_a, old_g = state.get("kfac_A"), state.get("kfac_G")
        if old_a is None or old_g is None or old_a.shape != a_batch.shape or old_g.shape != g_batch.shape:
            return a_batch, g_batch
        rho = self.stat_decay
        empty = count == 0  # every delta zero: keep the old factors (no host sync)
        new_a = torch.where(empty, old_a, old_a * rho + a_batch * (1.0 - rho))
        new_g = torch.where(empty, old_g, old_g * rho + g_batch * (1.0 - rho))
        return new_a, new_g

    def _inverses(self, a: torch.Tensor, g: torch.Tensor, damping: float) -> dict[str, torch.Tensor]:
        if self.inverse_method == "eigen":
            d_a, q_a = _symmetric_eigh(a)
            d_g, q_g = _symmetric_eigh(g)
            return {"kfac_QA": q_a, "kfac_dA": d_a, "kfac_QG": q_g, "kfac_dG": d_g}
        root = math.sqrt(damping)
        return {"kfac_A_inv": _damped_inverse(a, root), "kfac_G_inv": _damped_inverse(g, root)}

    def _precondition(self, gradient: torch.Tensor, inverse: dict, damping: float) -> torch.Tensor:
        if self.inverse_method == "eigen":
            q_a, d_a, q_g, d_g = (inverse[k] for k in _EIGEN_KEYS)
            rotated = q_g.T @ gradient @ q_a
            rotated = rotated / (d_g[:, None] * d_a[None, :] + damping)
            return q_g @ rotated @ q_a.T
        return inverse["kfac_G_inv"] @ gradient @ inverse["kfac_A_inv"]

    def _managed_group_step(self, group: dict) -> None:
        """Form this step's factors and inverses, turn ``.grad`` into ``G⁻¹ ḡ A⁻¹``, then the shared step."""
        device = next((layer.weight.device for layer in self._layers), torch.device("cpu"))
        with torch.autocast(device_type=device.type, enabled=False):
            self._precondition_gradients(group)
        super()._managed_group_step(group)

    def _precondition_gradients(self, group: dict) -> None:
        damping = group["damping"]
        inverse_step = self.global_step % self.inverse_update_freq == 0
        keys = _EIGEN_KEYS if self.inverse_method == "eigen" else _CHOLESKY_KEYS
        layers = [layer for layer in self._layers if layer.weight.grad is not None]
        self._synchronise([layer for layer in layers if id(layer) in self._staged])
        directions = []
        for layer in layers:
            weight, bias = layer.weight, layer.bias
            state = self.state[weight]
            commit: dict[str, torch.Tensor] = {}
            factors = self._new_factors(layer, state)
            if factors is not None:
                commit["kfac_A"], commit["kfac_G"] = factors
                a, g = factors
            else:
                a, g = state.get("kfac_A"), state.get("kfac_G")
            if a is None or g is None:
                continue  # never saw statistics (cannot happen with capture on): the plain gradient stays
            inverse = {k: state[k] for k in keys if k in state}
            stale_shape = "kfac_dA" in inverse and inverse["kfac_dA"].shape[0] != a.shape[0]
            if inverse_step or len(inverse) != len(keys) or stale_shape:
                inverse = self._inverses(a, g, damping)
                commit.update(inverse)
            self._to_commit[id(layer)] = commit

            dtype = a.dtype
            w_grad = weight.grad.to(dtype)
            gradient = w_grad.T if layer.transposed else w_grad
            if layer.has_bias and bias is not None and bias.grad is not None:
                gradient = torch.cat([gradient, bias.grad.to(dtype)[:, None]], dim=1)
            direction = self._precondition(gradient, inverse, damping)
            directions.append((layer, gradient, direction))

        if self.kl_clip is not None and directions:
            lr = group["lr"]
            vg = sum((d * g).sum() for _, g, d in directions) * (lr * lr)
            nu = torch.clamp(torch.sqrt(self.kl_clip / vg.abs().clamp(min=1e-30)), max=1.0)
            directions = [(layer, g, d * nu) for layer, g, d in directions]

        for layer, _, direction in directions:
            in_features = layer.weight.shape[0] if layer.transposed else layer.weight.shape[1]
            d_weight = direction[:, :in_features]
            layer.weight.grad.copy_(d_weight.T if layer.transposed else d_weight)
            if direction.shape[1] > in_features:
                layer.bias.grad.copy_(direction[:, in_features])

    def _after_step(self) -> None:
        """Commit this step's factors and inverses (only for steps that were applied)."""
        for layer in self._layers:
            commit = self._to_commit.get(id(layer))
            if commit:
                self.state[layer.weight].update(commit)

    def _discard_staged(self) -> None:
        self._staged.clear()
        self._to_commit.clear()

    # ------------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> dict[str, float]:
        return self._step_diagnostics("kfac")

    # -------------------------------------------------------------------------- state dict
    def _extra_state(self) -> dict:
        return {"inverse_method": self.inverse_method}
