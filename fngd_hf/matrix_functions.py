"""Pure matrix maths for SNGD: Denman–Beavers square roots, Nyström sketches, low-rank + λI powers.

Nothing here knows about layers or optimizer state. Every function accepts leading batch
dimensions where that is natural and works in the dtype it is given (SNGD calls it in float64).

* :func:`denman_beavers` — ``(A^{1/2}, A^{-1/2})`` of a symmetric positive definite ``A`` by the
  scaled product form of the Denman–Beavers iteration (one Cholesky per iteration, no eigensolver).
* :func:`nystrom` / :func:`nystrom_from_sketch` — a rank-``r`` Nyström approximation
  ``A ≈ Q M Qᵀ`` (``Q``: ``n × r`` orthonormal, ``M``: ``r × r`` symmetric PSD) from a sketch
  ``Y = A Ω``; exact when ``r = n``.
* :func:`lowrank_plus_identity_power` / :func:`apply_lowrank` — ``(Q K Qᵀ + λI)^p`` for
  ``p ∈ {1, -1, 1/2, -1/2}`` as ``Q C Qᵀ + c I`` with an ``r × r`` ``C`` (``K`` a matrix, powered by
  Denman–Beavers, or a vector of eigenvalues ``s``: ``K = diag(s)``), applied at ``O(n r)`` per row.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "apply_lowrank",
    "denman_beavers",
    "gaussian_sketch",
    "lowrank_plus_identity_power",
    "nystrom",
    "nystrom_from_sketch",
]


def _eye_like(a: torch.Tensor) -> torch.Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def _symmetrize(a: torch.Tensor) -> torch.Tensor:
    return (a + a.transpose(-1, -2)) * 0.5


def denman_beavers(
    a: torch.Tensor,
    iterations: int = 20,
    *,
    tol: float | None = None,
    scale: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A^{1/2}, A^{-1/2})`` of a symmetric positive definite ``A`` (shape ``(..., n, n)``).

    Product form of the Denman–Beavers iteration (Higham, *Functions of Matrices*, §6.3) on
    ``A / c`` with ``c = tr(A) / n``::

        M₀ = Y₀ = A/c,  Z₀ = I
        μ = det(M)^{-1/(2n)}                        (determinant scaling; 1 when ``scale=False``)
        Y ← ½ μ Y (I + μ⁻² M⁻¹),   Z ← ½ μ Z (I + μ⁻² M⁻¹)
        M ← ½ (I + (μ² M + μ⁻² M⁻¹) / 2)

    ``Y → (A/c)^{1/2}``, ``Z → (A/c)^{-1/2}``, ``M → I`` quadratically; the scaling makes the
    initial phase short even for condition numbers of 10⁶ and more (a handful of iterations).
    ``M`` stays SPD with eigenvalues ≥ 1 after the first iteration, so each iteration costs one
    Cholesky factorisation (which also gives ``det M``) and a Cholesky inverse.

    Stops after ``iterations`` iterations, or one iteration after ``‖M - I‖_F / √n <= tol``
    (default ``√eps`` of the dtype: the next iteration squares the error), for the worst matrix
    of a batch. A matrix that is not numerically positive definite (a failed Cholesky
    factorisation) gives NaN results, for that matrix only, rather than an exception, so a caller
    can test ``isfinite`` and add damping.
    """
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"denman_beavers needs square matrices, got shape {tuple(a.shape)}")
    if iterations < 1:
        raise ValueError(f"Invalid iterations: {iterations}")
    n = a.shape[-1]
    eye = _eye_like(a)
    if tol is None:
        tol = math.sqrt(torch.finfo(a.dtype).eps)
    a = _symmetrize(a)
    c = (a.diagonal(dim1=-2, dim2=-1).sum(-1) / n)[..., None, None]
    c = torch.where(c > 0, c, torch.ones_like(c))
    m = a / c
    factor, info = torch.linalg.cholesky_ex(m)
    failed = (info > 0)[..., None, None]  # not numerically SPD: NaN results for that matrix only
    if bool(failed.any()):
        m = torch.where(failed, eye, m)
        factor = torch.where(failed, eye, factor)
    y = m.clone()
    z = eye.expand_as(m).clone()
    finishing = False
    for k in range(iterations):
        if k > 0:
            factor, _ = torch.linalg.cholesky_ex(m)
        m_inv = torch.cholesky_inverse(factor)
        if scale and not finishing:
            logdet = 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            mu = torch.exp(-logdet / (2 * n))[..., None, None]
        else:
            mu = torch.ones_like(c)
        mu2 = mu * mu
        step = eye + m_inv / mu2
        y = 0.5 * mu * (y @ step)
        z = 0.5 * mu * (z @ step)
        m = _symmetrize(0.5 * (eye + 0.5 * (mu2 * m + m_inv / mu2)))
        if finishing:
            break
        error = torch.linalg.matrix_norm(m - eye).amax() / math.sqrt(n)
        if bool(error <= tol):  # one host sync per iteration; the caller refreshes rarely
            finishing = True
    root_c = c.sqrt()
    root, inv_root = _symmetrize(y) * root_c, _symmetrize(z) / root_c
    nan = torch.full_like(root, float("nan"))
    return torch.where(failed, nan, root), torch.where(failed, nan, inv_root)


def gaussian_sketch(
    dim: int,
    rank: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A ``dim × rank`` test matrix with orthonormal columns (QR of a Gaussian matrix).

    Drawn on the CPU from ``generator`` and then moved, so the same seed gives the same sketch
    on every device.
    """
    if not 1 <= rank <= dim:
        raise ValueError(f"Invalid sketch rank {rank} for dimension {dim} (1 <= rank <= dim)")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    gaussian = torch.randn(dim, rank, generator=generator, dtype=torch.float64, device=gen_device)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(r.diagonal()).where(r.diagonal() != 0, torch.ones_like(r.diagonal()))
    return q.to(dtype=dtype, device=device if device is not None else gen_device)


def nystrom_from_sketch(
    omega: torch.Tensor,
    sketch: torch.Tensor,
    *,
    shift: float | None = None,
    max_retries: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nyström approximation ``A ≈ Q M Qᵀ`` from ``Ω`` (``n × r``, orthonormal) and ``Y = A Ω``.

    The numerically stable form (Tropp, Yurtsever, Udell & Cevher 2017, Alg. 3) with a QR in
    place of the SVD, so that the ``r × r`` core ``M`` is left for a matrix function::

        ν = shift (default √n · eps(dtype of Y) · ‖Y‖_F),  Y_ν = Y + ν Ω
        C Cᵀ = Ωᵀ Y_ν                    (Cholesky; ν raised tenfold while it fails)
        F = Y_ν C⁻ᵀ = Q R                 (thin QR)
        M = R Rᵀ - ν I

    so ``Q M Qᵀ = A Ω (Ωᵀ A Ω)⁻¹ Ωᵀ A`` up to the shift. ``A`` must be symmetric PSD. With
    ``r = n`` (``Ω`` square orthogonal) the approximation is ``A`` itself. Leading batch
    dimensions are allowed (each matrix gets its own shift). Computes in the dtype of ``sketch``
    (pass float64 for accuracy); returns ``(Q, M)``.
    """
    if omega.shape[-2:] != sketch.shape[-2:] or sketch.dim() < 2:
        raise ValueError(f"omega and sketch must both be (..., n, r); got {tuple(omega.shape)}, {tuple(sketch.shape)}")
    omega = omega.to(sketch.dtype)
    n, rank = sketch.shape[-2:]
    eye = torch.eye(rank, dtype=sketch.dtype, device=sketch.device)
    if shift is None:
        scale = torch.linalg.matrix_norm(sketch)
        shift_t = math.sqrt(n) * torch.finfo(sketch.dtype).eps * scale
        shift_t = torch.where(scale > 0, shift_t, torch.full_like(shift_t, torch.finfo(sketch.dtype).tiny))
    else:
        shift_t = torch.full(sketch.shape[:-2], float(shift), dtype=sketch.dtype, device=sketch.device)
    shift_t = shift_t[..., None, None]
    for _ in range(max_retries + 1):
        shifted = sketch + shift_t * omega
        small = _symmetrize(omega.transpose(-1, -2) @ shifted)
        factor, info = torch.linalg.cholesky_ex(small)
        failed = (info > 0)[..., None, None]
        if not bool(failed.any()):
            break
        shift_t = torch.where(failed, shift_t * 10.0, shift_t)
    # F Cᵀ = Y_ν  <=>  C Fᵀ = Y_νᵀ  (a matrix still not SPD gives NaN, for that matrix only)
    factor = torch.where(failed, eye, factor)
    f = torch.linalg.solve_triangular(factor, shifted.transpose(-1, -2), upper=False).transpose(-1, -2)
    q, r = torch.linalg.qr(f)
    core = _symmetrize(r @ r.transpose(-1, -2)) - shift_t * eye
    return q, torch.where(failed, torch.full_like(core, float("nan")), core)


def nystrom(
    a: torch.Tensor | Matvec,
    rank: int,
    generator: torch.Generator | None = None,
    *,
    dim: int | None = None,
    omega: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` Nyström approximation ``A ≈ Q M Qᵀ`` of a symmetric PSD ``A``.

    ``a`` is the matrix (``n × n``) or a function ``X ↦ A X`` on ``n × r`` blocks (then give
    ``dim``). The test matrix is ``omega`` if given, else :func:`gaussian_sketch` from
    ``generator``. ``rank`` is clamped to ``n``; at ``rank = n`` the result is exact. Works in
    ``dtype`` (default: the matrix's dtype, float64 for a matvec). Returns ``(Q, M)``;
    ``torch.linalg.eigh(M)`` turns it into ``U diag(s) Uᵀ`` with ``U = Q V`` if eigenvalues are wanted.
    """
    if callable(a) and not isinstance(a, torch.Tensor):
        if dim is None and omega is None:
            raise ValueError("nystrom with a matvec needs dim= (or omega=)")
        matvec = a
        n = dim if dim is not None else omega.shape[0]
        dtype = dtype or (omega.dtype if omega is not None else torch.float64)
        device = omega.device if omega is not None else None
    else:
        if a.dim() != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"nystrom needs a square matrix, got shape {tuple(a.shape)}")
        n = a.shape[0]
        dtype = dtype or a.dtype
        device = a.device
        matrix = a.to(dtype)

        def matvec(x: torch.Tensor) -> torch.Tensor:
            return matrix @ x

    rank = min(int(rank), n)
    if omega is None:
        omega = gaussian_sketch(n, rank, generator, dtype=dtype, device=device)
    omega = omega.to(dtype)
    return nystrom_from_sketch(omega, matvec(omega).to(dtype))


def lowrank_plus_identity_power(
    basis: torch.Tensor,
    core: torch.Tensor,
    shift: float | torch.Tensor,
    power: float,
    *,
    iterations: int = 20,
    tol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q K Qᵀ + λ I)^p = Q [(K + λI)^p - λ^p I] Qᵀ + λ^p I`` for orthonormal ``Q``; returns ``(C, λ^p)``.

    The Woodbury-like identity for ``U diag(s) Uᵀ + λI``: ``Q`` (``n × r``) has orthonormal
    columns, so ``Q K Qᵀ + λI`` acts as ``K + λI`` on ``range(Q)`` and as ``λ`` on its complement,
    and any matrix function splits the same way (leading batch dimensions allowed, with one
    ``λ`` per matrix). ``core`` is ``K``, either an ``r × r`` symmetric
    matrix (its power then comes from :func:`denman_beavers`: ``p = ±1/2`` directly, ``p = -1`` as
    ``(K + λI)^{-1/2}`` squared, ``p = 1`` trivially) or a vector ``s`` of eigenvalues
    (``K = diag(s)``, powered elementwise). ``K + λI`` must be positive definite (``λ > 0``).
    ``basis`` is only checked for shape: the result depends on ``Q`` only through :func:`apply_lowrank`.
    """
    if power not in (1, -1, 0.5, -0.5):
        raise ValueError(f"Unsupported power {power}: one of 1, -1, 0.5, -0.5")
    rank = basis.shape[-1]
    shift_t = torch.as_tensor(shift, dtype=core.dtype, device=core.device)
    identity_part = shift_t**power
    if core.dim() == basis.dim() - 1:  # eigenvalues: K = diag(s)
        if core.shape[-1] != rank:
            raise ValueError(f"{core.shape[-1]} eigenvalues for a rank-{rank} basis")
        powered = (core + shift_t[..., None]) ** power - identity_part[..., None]
        return torch.diag_embed(powered), identity_part
    if core.shape[-2:] != (rank, rank):
        raise ValueError(f"core must be (..., {rank}, {rank}), got {tuple(core.shape)}")
    eye = _eye_like(core)
    shifted = _symmetrize(core) + shift_t[..., None, None] * eye
    if power == 1:
        powered = shifted
    else:
        root, inv_root = denman_beavers(shifted, iterations, tol=tol)
        powered = {0.5: root, -0.5: inv_root, -1: _symmetrize(inv_root @ inv_root)}[power]
    return powered - identity_part[..., None, None] * eye, identity_part


def apply_lowrank(
    x: torch.Tensor, basis: torch.Tensor, core: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """``X (Q C Qᵀ + c I) = c X + ((X Q) C) Qᵀ`` for ``X`` of shape ``(..., n)``: ``O(n r)`` per row."""
    if x.dim() == 2 and basis.dim() == 2:
        return torch.addmm(x * scale, (x @ basis) @ core, basis.T)
    return x * scale + ((x @ basis) @ core) @ basis.transpose(-1, -2)
