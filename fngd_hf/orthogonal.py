"""Muon's step on FNGD's direction: ``step_length="muon"``.

Each managed layer's momentum direction ``M = [m_W | m_b]`` (weight and bias as one ``out × (in+1)`` block, the
block the natural gradient and the trust region use) is orthogonalised with torch's own Newton-Schulz iteration,
the one ``torch.optim.Muon`` runs, and scaled as Muon's ``adjust_lr_fn="match_rms_adamw"`` scales it::

    Δ_L = -lr · 0.2·sqrt(max(out, in+1)) · NS(M_L)

so the update has an AdamW-like RMS (``lr`` is AdamW-scale) and all its singular values about equal: the natural
gradient chooses the singular *vectors*, Muon's geometry the step along them. Why: FNGD's direction has a low
stable rank (a weighted sum of a batch's per-sample gradients), so grafting AdamW's Frobenius length onto it
(``step_length="adamw"``) put that whole length on a few singular directions and did not train
(docs/convergence.md). Compared with the Muon baseline (:mod:`fngd_hf.muon`) only the input differs: FNGD's
natural gradient under FNGD's heavy-ball momentum instead of the plain gradient under Nesterov momentum. By
default each layer's direction is first scaled to unit norm (:func:`unit_layer_directions`), so the momentum
averages directions whose raw norms swing by orders of magnitude.
"""

from __future__ import annotations

import math

import torch

from .block_norms import layer_norms

try:  # torch's Muon internals (torch >= 2.9): the same iteration as the Muon baseline, not a copy of it
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _zeropower_via_newtonschulz
except ImportError:  # pragma: no cover - older torch
    _zeropower_via_newtonschulz = None

RMS_MATCH = 0.2  # torch.optim.Muon's "match_rms_adamw": an update RMS of about 0.2, AdamW's typical one


def orthogonalized_block(weight_direction: torch.Tensor, bias_direction: torch.Tensor | None,
                         transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``0.2·sqrt(max(rows, cols))·NS([m_W | m_b])`` split back into the weight's and the bias's shapes.

    ``transposed``: the weight is stored ``(in, out)`` (a transformers ``Conv1D``); the block is ``out × in``."""
    if _zeropower_via_newtonschulz is None:
        raise ImportError(f"step_length='muon' needs torch.optim.Muon (torch 2.9 or later); this is torch "
                          f"{torch.__version__}")
    weight = weight_direction.T if transposed else weight_direction
    block = weight if bias_direction is None else torch.cat([weight, bias_direction.reshape(-1, 1)], dim=1)
    update = _zeropower_via_newtonschulz(block, (DEFAULT_A, DEFAULT_B, DEFAULT_C), DEFAULT_NS_STEPS, EPS)
    update = update.to(weight_direction.dtype).mul_(RMS_MATCH * math.sqrt(max(block.shape)))
    new_weight = update[:, : weight.shape[1]]
    new_weight = (new_weight.T if transposed else new_weight).contiguous()
    new_bias = None if bias_direction is None else update[:, -1].reshape(bias_direction.shape).contiguous()
    return new_weight, new_bias


def unit_layer_directions(directions: list, owner_index: torch.Tensor, layers: int) -> list:
    """Each managed layer's directions divided by the Frobenius norm of its ``[d_W | d_b]`` block (an all-zero
    layer stays zero); ``owner_index[i]``: the layer of ``directions[i]``, a device tensor. New tensors.

    Why (``normalize_directions=True``): with relative damping a direction's norm carries no step size (Muon's
    step discards it) yet swings by orders of magnitude, most at each shared epoch's first steps, whose
    coefficients were solved at initialisation; summed into the momentum buffer unnormalised, those few
    directions outweigh the rest for tens of steps. Normalised, momentum averages directions, as Muon's does."""
    norms = layer_norms(torch.stack(torch._foreach_norm(directions)).float(), owner_index, layers)
    inverse = torch.where(norms > 0, 1.0 / norms.clamp(min=1e-30), torch.zeros_like(norms))
    factors = inverse[owner_index].unbind(0)
    return torch._foreach_mul(directions, [f.to(d.dtype) for f, d in zip(factors, directions)])


def orthogonalized_directions(params: list, directions: list, owner: list[int], layers: list) -> list:
    """Every managed layer's directions (weight, and bias if it has one) replaced by :func:`orthogonalized_block`
    of them; ``owner[i]``: the index in ``layers`` of ``params[i]``'s layer. New tensors: the momentum buffers
    that ``directions`` may be stay as they are."""
    position = {id(p): i for i, p in enumerate(params)}
    result = list(directions)
    for index in sorted(set(owner)):
        layer = layers[index]
        weight_at = position.get(id(layer.params[0]))
        if weight_at is None:  # no weight gradient this step: nothing to orthogonalise
            continue
        bias_at = position.get(id(layer.params[1])) if len(layer.params) > 1 else None
        bias = None if bias_at is None else directions[bias_at]
        new_weight, new_bias = orthogonalized_block(directions[weight_at], bias, layer.transposed)
        result[weight_at] = new_weight
        if bias_at is not None:
            result[bias_at] = new_bias
    return result
