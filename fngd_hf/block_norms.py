"""Each managed layer's norm over its ``[W|b]`` block, from the norms of its tensors (weight and bias).

The trust region, grafting and the unit-norm directions of Muon's step all measure a layer as one block; this
is that sum, as one device op (no host sync)."""

from __future__ import annotations

import torch


def layer_norms(tensor_norms: torch.Tensor, owner: torch.Tensor, layers: int) -> torch.Tensor:
    """``sqrt(Σ_{i: owner[i] = L} tensor_norms[i]²)`` for each of the ``layers`` layers (0 for one with none)."""
    return tensor_norms.new_zeros(layers).index_add_(0, owner, tensor_norms.square()).sqrt_()
