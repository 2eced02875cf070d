"""What every optimizer here shares with where it runs: a process group, an accelerate loop (asked,
never required), the step's closure and the warning of a skipped step."""

from __future__ import annotations

import warnings

import torch


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _in_accelerate_loop() -> bool:
    """Whether batches come from an ``accelerate``-prepared dataloader now (the HF Trainer's, or an
    accelerate loop): there the loss of each micro-batch is scaled by code FNGD does not see."""
    try:
        from accelerate.state import GradientState
    except ImportError:  # accelerate is a dependency, but the optimizer itself does not need it
        return False
    if not GradientState._shared_state:  # no Accelerator made in this process
        return False
    return GradientState().active_dataloader is not None


def _process_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def closure_loss(closure):
    """``torch.optim``'s step prologue: the loss of ``closure`` (with gradients on), or ``None``."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def warn_skipped(skipped_steps: int, message: str, stacklevel: int) -> None:
    """Warn on the 1st, 2nd, 4th, 8th ... skipped step: visible without flooding the log."""
    if skipped_steps & (skipped_steps - 1) == 0:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
