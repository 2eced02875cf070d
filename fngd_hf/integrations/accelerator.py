"""FNGD in a plain ``accelerate`` training loop (no Trainer): one call after ``accelerator.prepare``."""

from __future__ import annotations

from .checkpointing import keep_rank_state, unwrap_optimizer


def attach_accelerator(accelerator, optimizer):
    """Make an fngd_hf optimizer follow ``accelerator``'s gradient accumulation and checkpoints.

    * ``gradient_accumulation_steps`` becomes the accelerator's, and FNGD takes each micro-batch loss as
      divided by it, which is what ``accelerator.backward`` does, also in the shorter last window of an
      epoch that ``accelerator.accumulate`` closes early: that step is then the average of its
      micro-batches' natural gradients too, with no warning.
    * ``accelerator.save_state()``/``load_state()`` keep every process's own coefficient bank
      (:func:`fngd_hf.integrations.checkpointing.keep_rank_state`).

    ``optimizer``: the optimizer or what ``accelerator.prepare`` returned for it. Returns a handle whose
    ``remove()`` unregisters the checkpoint hooks.
    """
    inner = unwrap_optimizer(optimizer)
    inner.gradient_accumulation_steps = accelerator.gradient_accumulation_steps
    inner.accumulation_declared_by = "attach_accelerator"
    if hasattr(inner, "loss_divided_by"):  # FNGD, CW-NGD (the others take gradients as they come)
        inner.loss_divided_by = "gradient_accumulation_steps"
    return keep_rank_state(accelerator, inner)
