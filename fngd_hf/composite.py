"""Two torch optimizers stepped as one ``torch.optim.Optimizer`` (the Muon and Shampoo hybrids).

The wrapper's ``param_groups`` are the inner optimizers' own group dicts, so an LR scheduler's change
reaches the part that owns the group, and all parts share one ``state`` (their parameters are
disjoint), so ``state_dict()`` is torch's. A step whose gradients are not all finite is skipped whole
(parameters, moments and statistics unchanged), counted in ``skipped_steps`` and warned, as the
layer-wise optimizers do: torch's Muon would write NaN into every weight, and Shampoo would fold it
into its statistics and fail at every later root.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .runtime import closure_loss, warn_skipped


class CompositeOptimizer(torch.optim.Optimizer):
    """Steps ``optimizers`` (no ``None``) in order as one optimizer; ``add_param_group`` is not supported."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], defaults: dict):
        self.optimizers = [o for o in optimizers if o is not None]
        if not self.optimizers:
            raise ValueError(f"{type(self).__name__} needs at least one inner optimizer")
        self.skipped_steps = 0
        self._ready = False
        super().__init__([g for o in self.optimizers for g in o.param_groups], defaults)  # keeps these very dicts
        self._ready = True
        self._link()

    def _link(self) -> None:
        """One ``state`` for all parts and the parts' own group dicts."""
        state: defaultdict = defaultdict(dict)
        for optimizer in self.optimizers:
            state.update(optimizer.state)
            optimizer.state = state
        self.state = state
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    def add_param_group(self, param_group: dict) -> None:
        if self._ready:
            raise NotImplementedError(f"{type(self).__name__} cannot add parameter groups: build a new one from the model")
        super().add_param_group(param_group)

    def _step_part(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def _gradients_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())  # one host sync

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        if not self._gradients_finite():
            self.skipped_steps += 1
            warn_skipped(
                self.skipped_steps,
                f"{type(self).__name__} skipped a step: non-finite gradients. Parameters and state are unchanged "
                f"({self.skipped_steps} skipped so far).",
                stacklevel=2,
            )
            return loss
        for optimizer in self.optimizers:
            self._step_part(optimizer)
        return loss

    def _check_loaded_groups(self, saved_groups: list[dict]) -> None:
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the loaded state dict has {len(saved_groups)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}: it was saved for another model or other settings"
            )

    def load_state_dict(self, state_dict: dict) -> None:
        """Hand each part its own groups and state (torch's own loading), then relink the shared views."""
        saved_groups = state_dict["param_groups"]
        self._check_loaded_groups(saved_groups)
        start = 0
        for optimizer in self.optimizers:
            groups = saved_groups[start : start + len(optimizer.param_groups)]
            start += len(optimizer.param_groups)
            ids = {i for g in groups for i in g["params"]}
            state = {i: v for i, v in state_dict["state"].items() if i in ids}
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        self._link()
