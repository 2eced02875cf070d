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
# Cost of writing and re-reading one tensor element, in multiply-adds: both Gram paths are partly
# memory-bound on CPUs (measured on a 2-core x86 VM with benchmarks/step_time.py --micro).
_MEMORY_COST = 100


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(value: float, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A read-only tensor filled with ``value``, made once per (shape, dtype, device): a GPU step is bound
    by the host, and a fresh ``torch.ones`` per layer is a kernel launch each time."""
    key = (value, shape, dtype, device)
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        if len(_CONSTANTS) > 64:  # a few batch sizes and dtypes in practice; never grow without bound
            _CONSTANTS.clear()
        tensor = _CONSTANTS[key] = torch.full(shape, value, dtype=dtype, device=device)
    return tensor


def choose_gram_path(batch: int, tokens: int, in_features: int, out_features: int, kept_tokens: int | None = None) -> str:
    """The cheaper way (multiply-adds plus memory traffic) to form ``K`` for a layer of this shape.

    ``tokens`` is the padded length; ``kept_tokens`` the number of tokens the token path really
    uses (see :func:`kept_tokens`; default all ``batch * tokens``).
    """
    n = batch * tokens
    kept = n if kept_tokens is None else kept_tokens
    io = in_features * out_features
    token_cost = kept * kept * (in_features + out_features + 3 * _MEMORY_COST)
    per_sample_cost = n * io + batch * batch * io + _MEMORY_COST * batch * io
    if per_sample_cost < token_cost and batch * io <= _PER_SAMPLE_MAX_ELEMENTS:
        return "per_sample"
    return "token"


def kept_tokens(x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x (N, i), delta (N, o), sample (N,))``: the tokens whose output gradient is not all zero.

    A token with ``δ_t = 0`` (padding, ``-100`` labels) adds nothing to ``K`` or to ``d``, so
    dropping it changes no number, while the token Gram costs ``N²``. ``sample`` is each kept
    token's sample index. One host sync (the count of kept tokens).
    """
    batch, tokens = x.shape[:2]
    flat_x = x.reshape(batch * tokens, x.shape[-1])
    flat_delta = delta.reshape(batch * tokens, delta.shape[-1])
    index = stacked_kept_tokens(delta.unsqueeze(0)).nonzero().squeeze(1)  # one layer of the batched path's rule
    return flat_x.index_select(0, index), flat_delta.index_select(0, index), index // tokens


def _sum_by_sample(token_gram: torch.Tensor, sample: torch.Tensor, batch: int) -> torch.Tensor:
    """``K_nm = Σ_{t∈n, s∈m} token_gram_ts`` for tokens listed with their sample index."""
    rows = token_gram.new_zeros(batch, token_gram.shape[1]).index_add_(0, sample, token_gram)
    return rows.new_zeros(batch, batch).index_add_(1, sample, rows)


def gram_matrix(
    x: torch.Tensor,
    delta: torch.Tensor,
    has_bias: bool,
    scale: float,
    path: str = "auto",
    tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``K_nm = scale² Σ_{t∈n} Σ_{s∈m} (x̂_t·x̂_s)(δ_t·δ_s)`` in the dtype of ``x``/``delta``.

    ``tokens``: the output of :func:`kept_tokens` for the same ``x``/``delta``; the token path
    then works on those tokens only (same ``K``, fewer rows).
    """
    batch, length, in_features = x.shape
    out_features = delta.shape[-1]
    if path == "auto":
        kept = None if tokens is None else tokens[0].shape[0]
        path = choose_gram_path(batch, length, in_features, out_features, kept)
    if path == "per_sample":
        per_sample = torch.bmm(delta.transpose(1, 2), x).reshape(batch, -1)
        gram = per_sample @ per_sample.T
        if has_bias:
            bias_grad = delta.sum(dim=1)
            gram = gram + bias_grad @ bias_grad.T
        return gram * (scale * scale)
    if path == "token":
        if tokens is None:
            flat_x = x.reshape(batch * length, in_features)
            flat_delta = delta.reshape(batch * length, out_features)
        else:
            flat_x, flat_delta, sample = (t.to(x.dtype) if t.is_floating_point() else t for t in tokens)
        token_gram = _token_gram(flat_x, flat_delta, has_bias, scale)
        if tokens is None:
            return token_gram.view(batch, length, batch, length).sum(dim=(1, 3))
        return _sum_by_sample(token_gram, sample, batch)
    raise ValueError(f"Unknown gram path {path!r}; expected 'auto', 'token' or 'per_sample'")


def _token_gram(flat_x: torch.Tensor, flat_delta: torch.Tensor, has_bias: bool, scale: float) -> torch.Tensor:
    """``scale² (x̂_t·x̂_s)(δ_t·δ_s)`` for every token pair: ``(N, N)`` from ``(N, i)``/``(N, o)``, or
    ``(L, N, N)`` with a leading layer dimension (batched matmuls)."""
    mm = torch.addmm if flat_x.dim() == 2 else torch.baddbmm
    if has_bias:  # x̂·x̂' = x·x' + 1, the 1 broadcast into the matmul
        input_gram = mm(_constant(1.0, (), flat_x.dtype, flat_x.device), flat_x, flat_x.mT)
    else:
        input_gram = flat_x @ flat_x.mT
    # scale² rides on the delta Gram's matmul (beta=0: the matmul ignores its first argument).
    return input_gram.mul_(mm(input_gram, flat_delta, flat_delta.mT, beta=0, alpha=scale * scale))


def stacked_gram_matrices(
    x: torch.Tensor, delta: torch.Tensor, has_bias: bool, scale: float, membership: torch.Tensor | None = None
) -> torch.Tensor:
    """``K`` of ``L`` equally shaped layers at once -> (L, B, B): from ``x`` (L, B, T, i) and ``delta``
    (L, B, T, o), or from kept tokens only: ``x`` (L, N, i), ``delta`` (L, N, o) and ``membership``
    (N, B), each token's sample one-hot (:func:`sample_membership`).

    :func:`gram_matrix`'s token path with a leading layer dimension: a handful of batched kernels
    for all ``L`` layers instead of a handful per layer (kernel launches bound a GPU step).
    """
    if membership is None:
        layers, batch, length, in_features = x.shape
        flat_x = x.reshape(layers, batch * length, in_features)
        flat_delta = delta.reshape(layers, batch * length, delta.shape[-1])
        token_gram = _token_gram(flat_x, flat_delta, has_bias, scale)
        return token_gram.view(layers, batch, length, batch, length).sum(dim=(2, 4))
    # Summed by sample with matmuls (B/(i+o) of the Gram's work), not index_add_, whose atomics make
    # a GPU's sums non-deterministic.
    return membership.T @ _token_gram(x, delta, has_bias, scale) @ membership


def sample_membership(sample: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """``(N, B)``: row ``t`` is the one-hot of token ``t``'s sample index ``sample[t]``."""
    return (sample[:, None] == torch.arange(batch, device=sample.device)).to(dtype)


def stacked_kept_tokens(delta: torch.Tensor) -> torch.Tensor:
    """The tokens whose output gradient is not zero in some of ``L`` layers, as a flat (B·T,) mask of
    ``delta`` (L, B, T, o): the others (padding, ``-100`` labels) add nothing to ``K`` or ``d``."""
    return delta.any(dim=(0, 3)).view(-1)  # a float is "any" where nonzero (NaN included: it must reach the checks)


def stacked_weighted_gradients(
    x: torch.Tensor, delta: torch.Tensor, weights: torch.Tensor, has_bias: bool, transposed: bool = False,
    sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`apply_sample_weights` for ``L`` layers at once: ``x`` (L, B, T, i), ``delta`` (L, B, T, o) and
    ``weights`` (L, B) (``scale·β`` per layer, in ``delta``'s dtype) -> ``(dW (L, o, i) or (L, i, o), db (L, o))``;
    or kept tokens ``x`` (L, N, i), ``delta`` (L, N, o) with their ``sample`` index (N,)."""
    if sample is not None:
        return _weighted_sum(x, delta * weights[:, sample, None], has_bias, transposed)
    layers, batch, length, in_features = x.shape
    weighted = (delta * weights[:, :, None, None]).reshape(layers, batch * length, delta.shape[-1])
    return _weighted_sum(x.reshape(layers, batch * length, in_features), weighted, has_bias, transposed)


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
        return torch.clamp(relative, min=damping_floor * batch) if damping_floor > 0 else relative
    raise ValueError(f"Unknown damping_mode {mode!r}; expected 'relative' or 'fixed'")


def _right_hand_side(gram: torch.Tensor, rhs: torch.Tensor | None) -> torch.Tensor:
    """The solvers' right-hand side as a column: ``rhs`` or, without it, the ``1`` of ``(K + λB I)⁻¹ 1`` (cached;
    both solvers only read it)."""
    if rhs is None:
        return _constant(1.0, (*gram.shape[:-1], 1), gram.dtype, gram.device)
    return rhs.to(gram.dtype).unsqueeze(-1)


def solve_coefficients(
    gram: torch.Tensor, damping_b: torch.Tensor, max_retries: int = 6, rhs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``β = (K + λB I)⁻¹ 1`` by Cholesky; returns ``(β, λB actually used)``. ``rhs`` (shape ``gram.shape[:-1]``)
    replaces the ``1`` (the Monte-Carlo Fisher solves for ``Ĵᵀḡ``).

    ``gram`` may carry leading batch dimensions (CW-NGD solves one system per output unit).
    A zero ``K`` with zero damping (a layer or unit that got no gradient) gives ``β = 0``: the
    update ``Jβ`` is zero whatever ``β`` is. ``K`` is PSD in exact arithmetic; if rounding makes
    a system indefinite, its damping is raised tenfold a few times, and as a last resort ``K`` is
    projected onto the PSD cone by an eigendecomposition. Never raises; a non-finite ``K``
    gives a NaN ``β``, which the optimizer turns into a skipped step.
    """
    batch = gram.shape[-1]
    ones = _right_hand_side(gram, rhs)
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
                return torch.full_like(ones.squeeze(-1), float("nan")), damping_b  # the caller skips the step
            empty = (norm == 0) & (damping_b == 0)
            damping_b = torch.where(empty, torch.ones_like(damping_b), damping_b)
            failed = failed & ~empty
        raised = torch.maximum(damping_b * 10.0, 10.0 * torch.finfo(gram.dtype).eps * norm)
        damping_b = torch.where(failed, raised, damping_b)
    values, vectors = torch.linalg.eigh((gram + gram.transpose(-1, -2)) / 2)
    values = values.clamp(min=0.0) + damping_b[..., None]
    beta = (vectors @ ((vectors.transpose(-1, -2) @ ones).squeeze(-1) / values).unsqueeze(-1)).squeeze(-1)
    return torch.where(empty[..., None], torch.zeros_like(beta), beta), damping_b


def solve_coefficients_deferred(
    gram: torch.Tensor, damping_b: torch.Tensor, rhs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``β = (K + λB I)⁻¹ 1`` with no host sync and few kernels: returns ``(β, λB used, info)``. ``rhs`` replaces
    the ``1`` as in :func:`solve_coefficients`.

    ``info`` is Cholesky's (0 = positive definite; one per system). Where it is not 0, ``β`` is
    meaningless and the caller must not apply it (:func:`solve_coefficients` retries instead). A
    system with ``λB = 0`` (relative damping of a ``K = 0``: a layer or unit with no gradient)
    gets ``β = 0``, as there.
    """
    ones = _right_hand_side(gram, rhs)
    damping_b = damping_b.to(gram.dtype)
    live = damping_b != 0
    damping_b = torch.where(live, damping_b, 1.0)  # K = 0 there: solve I β = 1, then zero β
    system = gram.clone()
    system.diagonal(dim1=-2, dim2=-1).add_(damping_b[..., None])
    factor, info = torch.linalg.cholesky_ex(system)
    beta = torch.cholesky_solve(ones, factor).squeeze(-1) * live[..., None]
    return beta, damping_b, info


def weighted_gradient(
    x: torch.Tensor,
    delta: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    has_bias: bool,
    transposed: bool = False,
    tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``d = Jβ = scale · Σ_n β_n Σ_t δ_t x̂_tᵀ``: one matmul, the cost of a plain weight gradient.

    Returns ``(dW, db)``; ``dW`` has shape ``(o, i)``, or ``(i, o)`` when ``transposed``
    (transformers' ``Conv1D`` stores its weight that way). ``tokens`` (from :func:`kept_tokens`)
    makes the matmul skip the tokens with zero output gradient.
    """
    if tokens is None:
        return apply_sample_weights(x, delta, sample_weights(beta, scale, delta.dtype), has_bias, transposed)
    flat_x, flat_delta, sample = tokens
    # beta: (B,) for FNGD, (B, o) for CW-NGD (one coefficient per sample and output unit).
    weights = (beta * scale).to(flat_delta.dtype).index_select(0, sample)
    weighted_delta = flat_delta * (weights if weights.dim() == 2 else weights[:, None])
    return _weighted_sum(flat_x, weighted_delta, has_bias, transposed)


def plain_gradient(
    x: torch.Tensor, delta: torch.Tensor, has_bias: bool, transposed: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's ordinary ``(dW, db) = Σ_t δ_t x̂_tᵀ`` from ``x`` of shape ``(B, T, i)`` and ``delta`` ``(B, T, o)``."""
    return _weighted_sum(x.reshape(-1, x.shape[-1]), delta.reshape(-1, delta.shape[-1]), has_bias, transposed)


def sample_weights(beta: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale·β`` in ``dtype``, shaped to multiply ``delta`` of shape ``(B, T, o)``: ``(B, 1, 1)`` for
    FNGD's ``β`` of shape ``(B,)``, ``(B, 1, o)`` for CW-NGD's ``(B, o)``."""
    weights = beta * scale
    if weights.dtype != dtype:
        weights = weights.to(dtype)
    return weights.view(beta.shape[0], 1, -1)


def apply_sample_weights(
    x: torch.Tensor, delta: torch.Tensor, weights: torch.Tensor, has_bias: bool, transposed: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dW, db)`` of :func:`weighted_gradient` from ``weights = sample_weights(β, scale, delta.dtype)``."""
    batch, length, in_features = x.shape
    weighted_delta = (delta * weights).reshape(batch * length, -1)
    return _weighted_sum(x.reshape(batch * length, in_features), weighted_delta, has_bias, transposed)


def _weighted_sum(
    flat_x: torch.Tensor, weighted_delta: torch.Tensor, has_bias: bool, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # (N, i) and (N, o), or with a leading layer dimension (stacked_weighted_gradients). Under autocast
    # x may be float32 (a LayerNorm output) while delta is bf16: use delta's dtype, as autograd's own
    # weight gradient would.
    if flat_x.dtype != weighted_delta.dtype:
        flat_x = flat_x.to(weighted_delta.dtype)
    if transposed:
        d_weight = flat_x.mT @ weighted_delta
    else:
        d_weight = weighted_delta.mT @ flat_x
    d_bias = weighted_delta.sum(dim=-2) if has_bias else None
    return d_weight, d_bias


def sampled_gradient_products(
    x: torch.Tensor, sampled_delta: torch.Tensor, plain: tuple[torch.Tensor, torch.Tensor | None], scale: float,
    transposed: bool = False,
) -> torch.Tensor:
    """``Ĵᵀḡ``: the inner product of each sample's sampled-label gradient ``ĝ_n = scale Σ_{t∈n} δ̂_t x̂_tᵀ``
    with the batch's gradient ``ḡ`` (``plain``: :func:`plain_gradient`'s ``(dW, db)``), as
    ``scale Σ_{t∈n} δ̂_t·(ḡ x̂_t)``: no per-sample gradient is formed. ``x`` ``(B, T, i)``, ``sampled_delta``
    ``(B, T, o)``; returns ``(B,)``."""
    grad_weight, grad_bias = plain
    projected = x @ (grad_weight if transposed else grad_weight.T)  # ḡ x̂_t without the bias column
    if grad_bias is not None:
        projected = projected + grad_bias
    return (sampled_delta * projected).sum(dim=(1, 2)) * scale


def sampled_fisher_direction(
    x: torch.Tensor,
    plain: tuple[torch.Tensor, torch.Tensor | None],
    sampled_delta: torch.Tensor,
    alpha: torch.Tensor,
    damping_b: torch.Tensor,
    transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``d = (F̂ + λI)⁻¹ ḡ = (ḡ - Ĵα) / λ`` (Sherman-Morrison-Woodbury with the Monte-Carlo Fisher
    ``F̂ = (1/B) Ĵ Ĵᵀ``), given ``α = (K̂ + λB I)⁻¹ Ĵᵀḡ`` and ``λB``. ``plain`` is the layer's ordinary
    gradient ``ḡ = Σ_t δ_t x̂_tᵀ`` as :func:`plain_gradient`'s ``(dW, db)``; ``Ĵα`` the ``α``-weighted sum of the
    sampled-label per-sample gradients (per-sample scale ``B``). ``λB > 0``, as :func:`solve_coefficients`
    returns it (a ``K̂ = 0`` under relative damping gets ``λB = 1`` and ``α = 0`` there)."""
    batch = x.shape[0]
    plain_w, plain_b = plain
    sampled_w, sampled_b = weighted_gradient(x, sampled_delta, alpha, float(batch), plain_b is not None, transposed)
    inverse_lambda = (batch / damping_b).to(plain_w.dtype)
    d_weight = (plain_w - sampled_w) * inverse_lambda
    d_bias = None if plain_b is None else (plain_b - sampled_b) * inverse_lambda
    return d_weight, d_bias
