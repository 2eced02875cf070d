"""Pure maths of FNGD for one linear layer (see the README's "Maths" section).

Shapes: ``x`` is the layer input reshaped to ``(B, T, i)`` and ``delta`` the output gradient
``(B, T, o)``: ``B`` samples, ``T`` tokens per sample (``T = 1`` for an MLP). ``scale`` turns a
token's contribution into the per-sample gradient of the note: ``g_n = scale * sum_t delta_t x̂_tᵀ``
with ``scale = B`` (times the number of accumulated micro-batches, see the optimizer).
"""

from __future__ import annotations

import torch

# Materialised per-sample gradients are only worth it below this many elements (B * o * i).
_PER_SAMPLE_MAX_ELEMENTS = 1 << 27


def choose_gram_path(batch: int, tokens: int, in_features: int, out_features: int) -> str:
    """The cheaper way (in multiply-adds, then memory) to form ``K`` for a layer of this shape."""
    n = batch * tokens
    token_cost = n * n * (in_features + out_features)
    per_sample_cost = n * in_features * out_features + batch * batch * in_features * out_features
    if per_sample_cost < token_cost and batch * in_features * out_features <= _PER_SAMPLE_MAX_ELEMENTS:
        return "per_sample"
    return "token"


def gram_matrix(
    x: torch.Tensor, delta: torch.Tensor, has_bias: bool, scale: float, path: str = "auto"
) -> torch.Tensor:
    """``K_nm = scale² Σ_{t∈n} Σ_{s∈m} (x̂_t·x̂_s)(δ_t·δ_s)`` in the dtype of ``x``/``delta``."""
    batch, tokens, in_features = x.shape
    out_features = delta.shape[-1]
    if path == "auto":
        path = choose_gram_path(batch, tokens, in_features, out_features)
    if path == "per_sample":
        per_sample = torch.einsum("bto,bti->boi", delta, x).reshape(batch, -1)
        gram = per_sample @ per_sample.T
        if has_bias:
            bias_grad = delta.sum(dim=1)
            gram = gram + bias_grad @ bias_grad.T
    elif path == "token":
        flat_x = x.reshape(batch * tokens, in_features)
        flat_delta = delta.reshape(batch * tokens, out_features)
        input_gram = flat_x @ flat_x.T
        if has_bias:
            input_gram += 1.0
        token_gram = input_gram.mul_(flat_delta @ flat_delta.T)
        gram = token_gram.view(batch, tokens, batch, tokens).sum(dim=(1, 3))
    else:
        raise ValueError(f"Unknown gram path {path!r}; expected 'auto', 'token' or 'per_sample'")
    return gram * (scale * scale)


def gram_trace(x: torch.Tensor, delta: torch.Tensor, has_bias: bool, scale: float) -> torch.Tensor:
    """``trace(K) = Σ_n ‖g_n‖²`` from the per-sample token Gram blocks only (no ``B × B`` work)."""
    input_gram = x @ x.transpose(1, 2)
    if has_bias:
        input_gram += 1.0
    return (input_gram * (delta @ delta.transpose(1, 2))).sum() * (scale * scale)


def unit_gram_matrices(
    x: torch.Tensor, delta: torch.Tensor, has_bias: bool, scale: float, path: str = "auto"
) -> torch.Tensor:
    """CW-NGD: one Gram matrix per output unit ``j``, shape ``(o, B, B)``.

    ``K⁽ʲ⁾_nm = scale² Σ_{t∈n} Σ_{s∈m} δ_{t,j} δ_{s,j} (x̂_t·x̂_s)``.
    """
    batch, tokens, in_features = x.shape
    out_features = delta.shape[-1]
    if path == "auto":
        path = "token" if tokens == 1 else "per_sample"
    if path == "token" and tokens == 1:
        input_gram = x[:, 0] @ x[:, 0].T
        if has_bias:
            input_gram += 1.0
        unit_delta = delta[:, 0].T  # (o, B)
        gram = input_gram.unsqueeze(0) * (unit_delta.unsqueeze(2) * unit_delta.unsqueeze(1))
    elif path in ("token", "per_sample"):
        per_sample = torch.einsum("bto,bti->obi", delta, x)  # (o, B, i): row j of every g_n
        gram = per_sample @ per_sample.transpose(1, 2)
        if has_bias:
            bias_grad = delta.sum(dim=1).T  # (o, B)
            gram = gram + bias_grad.unsqueeze(2) * bias_grad.unsqueeze(1)
    else:
        raise ValueError(f"Unknown gram path {path!r}; expected 'auto', 'token' or 'per_sample'")
    return gram * (scale * scale)


def unit_gram_traces(x: torch.Tensor, delta: torch.Tensor, has_bias: bool, scale: float) -> torch.Tensor:
    """``trace(K⁽ʲ⁾)`` for every output unit, shape ``(o,)``, from each sample's own token block."""
    input_gram = x @ x.transpose(1, 2)
    if has_bias:
        input_gram += 1.0
    return torch.einsum("bts,btj,bsj->j", input_gram, delta, delta) * (scale * scale)


def damping_times_batch(
    gram: torch.Tensor, damping: float, mode: str, damping_floor: float, norm: torch.Tensor | None = None
) -> torch.Tensor:
    """``λB`` per Gram matrix: fixed ``damping * B``; relative ``max(damping * ‖K‖_F, damping_floor * B)``.

    ``norm`` is ``‖K‖_F`` if the caller already has it.
    """
    batch = gram.shape[-1]
    if mode == "fixed":
        return gram.new_full(gram.shape[:-2], damping * batch)
    if mode == "relative":
        relative = damping * (torch.linalg.matrix_norm(gram) if norm is None else norm)
        return torch.clamp(relative, min=damping_floor * batch)
    raise ValueError(f"Unknown damping_mode {mode!r}; expected 'relative' or 'fixed'")


def solve_coefficients(
    gram: torch.Tensor, damping_b: torch.Tensor, max_retries: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``β = (K + λB I)⁻¹ 1`` by Cholesky; returns ``(β, λB actually used)``.

    ``gram`` may carry leading batch dimensions (CW-NGD solves one system per output unit).
    A zero ``K`` with zero damping (a layer or unit that got no gradient) gives ``β = 0``: the
    update ``Jβ`` is zero whatever ``β`` is. ``K`` is PSD in exact arithmetic; if rounding makes
    a system indefinite, its damping is raised tenfold a few times, and as a last resort ``K`` is
    projected onto the PSD cone by an eigendecomposition. Never raises; a non-finite ``K``
    gives a NaN ``β``, which the optimizer turns into a skipped step.
    """
    batch = gram.shape[-1]
    ones = torch.ones(*gram.shape[:-1], 1, dtype=gram.dtype, device=gram.device)
    eye = torch.eye(batch, dtype=gram.dtype, device=gram.device)
    damping_b = damping_b.to(gram.dtype)
    norm = None
    for _ in range(max_retries + 1):
        factor, info = torch.linalg.cholesky_ex(gram + damping_b[..., None, None] * eye)
        failed = info > 0
        if not bool(failed.any()):  # the only host sync on the common path
            beta = torch.cholesky_solve(ones, factor).squeeze(-1)
            if norm is not None:  # units with no gradient at all get zero coefficients
                beta = torch.where(empty[..., None], torch.zeros_like(beta), beta)
            return beta, damping_b
        if norm is None:
            norm = torch.linalg.matrix_norm(gram)
            if not bool(torch.isfinite(norm).all()):
                return ones.squeeze(-1).fill_(float("nan")), damping_b  # the caller skips the step
            empty = (norm == 0) & (damping_b == 0)
            damping_b = torch.where(empty, torch.ones_like(damping_b), damping_b)
            failed = failed & ~empty
        raised = torch.maximum(damping_b * 10.0, 10.0 * torch.finfo(gram.dtype).eps * norm)
        damping_b = torch.where(failed, raised, damping_b)
    values, vectors = torch.linalg.eigh((gram + gram.transpose(-1, -2)) / 2)
    values = values.clamp(min=0.0) + damping_b[..., None]
    beta = (vectors @ ((vectors.transpose(-1, -2) @ ones).squeeze(-1) / values).unsqueeze(-1)).squeeze(-1)
    return torch.where(empty[..., None], torch.zeros_like(beta), beta), damping_b


def weighted_gradient(
    x: torch.Tensor,
    delta: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    has_bias: bool,
    transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``d = Jβ = scale · Σ_n β_n Σ_t δ_t x̂_tᵀ``: one matmul, the cost of a plain weight gradient.

    Returns ``(dW, db)``; ``dW`` has shape ``(o, i)``, or ``(i, o)`` when ``transposed``
    (transformers' ``Conv1D`` stores its weight that way).
    """
    batch, tokens, in_features = x.shape
    # beta: (B,) for FNGD, (B, o) for CW-NGD (one coefficient per sample and output unit).
    weights = (beta * scale).to(delta.dtype).view(batch, 1, -1)
    weighted_delta = (delta * weights).reshape(batch * tokens, -1)
    # Under autocast x may be float32 (a LayerNorm output) while delta is bf16: use delta's dtype,
    # as autograd's own weight gradient would.
    flat_x = x.reshape(batch * tokens, in_features).to(weighted_delta.dtype)
    if transposed:
        d_weight = flat_x.T @ weighted_delta
    else:
        d_weight = weighted_delta.T @ flat_x
    d_bias = weighted_delta.sum(dim=0) if has_bias else None
    return d_weight, d_bias
