"""Coefficient sharing by sample: each training example keeps the ``β_n`` it got the first time.

The paper shares ``β`` by *position* (step ``s`` of a later epoch reuses the vector of step
``s`` of the first epoch for a reshuffled batch, so the coefficients land on other samples).
Sharing by sample instead gives sample ``n`` the coefficient it received in the batch where it
was first seen. The optimizer needs to know which samples a micro-batch holds: the trainer
passes :func:`sample_keys` of the batch content, plain PyTorch users pass dataset indices to
``opt.set_sample_ids``.

:class:`SampleIndex` is the host-side map from sample id to row in the per-layer banks; its
state is one int64 tensor (rows in order), so it goes into ``state_dict()`` as a plain tensor.
"""

from __future__ import annotations

import functools

import torch

# Two primes below 2^31: a residue times a power stays below 2^62 (exact in int64).
_MODULI = (2_147_483_629, 2_147_483_587)
_BASES = (1_000_003, 998_244_353)


@functools.lru_cache(maxsize=64)
def _position_powers(length: int, base: int, modulus: int) -> torch.Tensor:
    powers = torch.empty(length, dtype=torch.int64)
    value = 1
    for t in range(length):
        powers[t] = value
        value = value * base % modulus
    return powers


def sample_keys(*sequences: torch.Tensor | None, masks: tuple[torch.Tensor | None, ...] = ()) -> torch.Tensor:
    """A 62-bit content hash per row of the given ``(B, T)`` id tensors (e.g. input ids and labels).

    Padding does not change a row's key: positions where the row's mask is 0 (``masks[k]`` for
    ``sequences[k]``; default: ids ``< 0`` count as padding, as ``-100`` labels do) are left out,
    so the same sentence pair padded to different lengths in different epochs has the same key.
    Each tensor is hashed with its own bases (source and target do not commute). Two different
    samples share a key with probability about ``2^-62``.
    """
    given = [(k, s) for k, s in enumerate(sequences) if s is not None]
    if not given:
        raise ValueError("sample_keys needs at least one (batch, length) tensor of token ids")
    batch = given[0][1].shape[0]
    keys = None
    for index, ids in given:
        if ids.dim() != 2 or ids.shape[0] != batch:
            raise ValueError(f"sample_keys: every tensor must be (batch={batch}, length), got {tuple(ids.shape)}")
        mask = masks[index] if index < len(masks) and masks[index] is not None else ids >= 0
        ids = torch.where(mask.bool(), ids.long() + 1, torch.zeros_like(ids, dtype=torch.int64))
        residues = []
        for base, modulus in zip(_BASES, _MODULI):
            powers = _position_powers(ids.shape[1], base + 2 * index, modulus).to(ids.device)
            residues.append(((ids % modulus) * powers % modulus).sum(dim=1) % modulus)
        part = residues[0] * _MODULI[1] + residues[1]  # < 2^62
        keys = part if keys is None else keys ^ part
    return keys


class SampleIndex:
    """Sample id -> row of the per-layer coefficient banks, kept on the host (no device sync per layer)."""

    def __init__(self, ids: torch.Tensor | None = None):
        self._rows: dict[int, int] = {}
        if ids is not None:
            for row, key in enumerate(ids.tolist()):
                self._rows[int(key)] = row

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, ids: list[int]) -> list[int] | None:
        """Rows of ``ids`` if every one is known, else ``None`` (the batch then gets fresh coefficients)."""
        rows = []
        for key in ids:
            row = self._rows.get(key)
            if row is None:
                return None
            rows.append(row)
        return rows

    def add(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """Give the unknown ids of ``ids`` new rows; returns (positions in ``ids``, their new rows).

        A sample keeps the row (and coefficient) of the first time it was seen; an id repeated
        within ``ids`` takes its first position.
        """
        positions, rows = [], []
        for position, key in enumerate(ids):
            if key not in self._rows:
                self._rows[key] = len(self._rows)
                positions.append(position)
                rows.append(self._rows[key])
        return positions, rows

    def to_tensor(self) -> torch.Tensor:
        ids = torch.empty(len(self._rows), dtype=torch.int64)
        for key, row in self._rows.items():
            ids[row] = key
        return ids
