"""Each rank's own statistics in checkpoints (FNGD's coefficient bank, CW-NGD's, SNGD's factors).

Under DDP every rank computes ``β`` from its own micro-batches, so the banks differ between ranks, while
a checkpoint's ``optimizer.pt``/``optimizer.bin`` is written by the main process alone: loaded as it is,
every rank would continue with rank 0's bank, and the resumed run would not be the one that was saved.
So each rank also writes its own statistics (``fngd_coefficients_rank{r}.pt``) and reads them back
after the optimizer state. :class:`fngd_hf.FNGDTrainer` does it in its checkpoints;
:func:`keep_rank_state` (part of :func:`fngd_hf.attach_accelerator`) does it for
``accelerator.save_state()``/``load_state()`` in a plain ``accelerate`` loop. A rank that loads another
rank's statistics without its own warns (``LayerwiseOptimizer.load_state_dict``).
"""

from __future__ import annotations

import os

import torch

from ..base import LayerwiseOptimizer

RANK_STATE_FILE = "fngd_coefficients_rank{rank}.pt"


def unwrap_optimizer(optimizer) -> LayerwiseOptimizer:
    """The layer-wise optimizer inside ``optimizer`` (accelerate's ``AcceleratedOptimizer`` wraps it)."""
    inner = optimizer
    while not isinstance(inner, LayerwiseOptimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, LayerwiseOptimizer):
        raise ValueError(f"expected an fngd_hf optimizer (FNGD, CWNGD, KFAC, SNGD), got {type(optimizer).__name__}")
    return inner


def rank_state(optimizer: LayerwiseOptimizer) -> dict[int, dict[str, torch.Tensor]]:
    """This rank's own statistics, keyed by parameter index (as in ``optimizer.state_dict()``)."""
    keys = optimizer._float32_state_keys
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        index: {key: optimizer.state[p][key] for key in keys if key in optimizer.state.get(p, {})}
        for index, p in enumerate(params)
        if any(key in optimizer.state.get(p, {}) for key in keys)
    }


def restore_rank_state(optimizer: LayerwiseOptimizer, saved: dict[int, dict[str, torch.Tensor]]) -> None:
    """Put :func:`rank_state`'s result back (after ``load_state_dict``, which brought the main rank's)."""
    optimizer._put_statistics(saved)
    optimizer._forget_cached_state()


def save_rank_state(optimizer, directory: str, rank: int) -> str:
    """Write this rank's statistics to ``directory``; returns the file's path."""
    optimizer = unwrap_optimizer(optimizer)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, RANK_STATE_FILE.format(rank=rank))
    torch.save(rank_state(optimizer), path)
    return path


def read_rank_state(directory: str, rank: int) -> dict | None:
    """This rank's saved statistics, or ``None`` if ``directory`` has none for it (then the optimizer's
    ``load_state_dict`` warns that this rank continues with the main rank's)."""
    path = os.path.join(directory, RANK_STATE_FILE.format(rank=rank))
    return torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None


def restore_on_load(optimizer, directory: str, rank: int) -> None:
    """Have the optimizer's next ``load_state_dict`` (the main rank's state) end with this rank's own statistics."""
    unwrap_optimizer(optimizer)._restore_after_load = read_rank_state(directory, rank)


class _RankStateHandle:
    def __init__(self, handles):
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def keep_rank_state(accelerator, optimizer) -> _RankStateHandle:
    """Make ``accelerator.save_state(dir)`` write every rank's statistics and ``load_state(dir)`` restore them.

    accelerate writes the optimizer state from the main process only. With this, each rank also writes
    ``fngd_coefficients_rank{r}.pt`` into the checkpoint and, when it loads one, puts its own back once
    the optimizer state is loaded. Nothing happens with one process (``optimizer.bin`` holds the only bank).
    Returns a handle whose ``remove()`` unregisters both hooks.
    """
    inner = unwrap_optimizer(optimizer)

    def save(models, weights, output_dir):
        if accelerator.num_processes > 1:
            save_rank_state(inner, output_dir, accelerator.process_index)

    def load(models, input_dir):
        # Runs before accelerate loads the optimizer state, which would overwrite anything restored now.
        if accelerator.num_processes > 1:
            restore_on_load(inner, input_dir, accelerator.process_index)

    return _RankStateHandle(
        (accelerator.register_save_state_pre_hook(save), accelerator.register_load_state_pre_hook(load))
    )
