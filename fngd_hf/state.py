"""A layer-wise optimizer's ``state_dict``: torch's, plus its counters and statistics in their own dtype.

Statistics (FNGD's coefficient bank, K-FAC's factors, SNGD's) keep their dtype through
``load_state_dict`` (torch.optim would cast them to the parameter's), the step counters travel under
``"layerwise"``, and each rank can put its own statistics back after loading the main rank's
(:mod:`fngd_hf.integrations.checkpointing`).
"""

from __future__ import annotations

import warnings

import torch

from .runtime import _process_rank


class LayerwiseState:
    """Mixin of :class:`~fngd_hf.base.LayerwiseOptimizer`: ``state_dict``/``load_state_dict`` and their hooks.

    Its state: ``_restore_after_load`` (this rank's own statistics for the next ``load_state_dict``, ``None``
    from construction, set by the checkpoint integrations). What it uses of the optimizer: ``global_step``, ``skipped_steps``,
    ``gradient_accumulation_steps``; subclasses name their statistics in ``_float32_state_keys`` and add
    their own settings through ``_extra_state``/``_load_extra_state``.
    """

    # Per-layer statistics whose dtype must survive torch.optim's cast to the parameter dtype.
    _float32_state_keys: tuple[str, ...] = ()

    def _extra_state(self) -> dict:
        return {}

    def _forget_cached_state(self) -> None:
        """Drop host-side copies of optimizer state (the state was just replaced)."""

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def _holds_rank_local_state(self) -> bool:
        """Whether this rank holds statistics of its own (from its own micro-batches) that other ranks lack."""
        keys = self._float32_state_keys
        return any(key in state for state in self.state.values() for key in keys)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["layerwise"] = {
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "gradient_accumulation_steps": self._accumulation,
            "process_rank": _process_rank(),  # whose rank-local statistics these are
            **self._extra_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("layerwise", None)
        keep = self._float32_state_keys
        # torch.optim casts floating state to the parameter dtype; statistics keep their own.
        kept = {i: {k: v[k] for k in keep if k in v} for i, v in state_dict["state"].items()}
        state_dict["state"] = {i: {k: x for k, x in v.items() if k not in keep} for i, v in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        self._put_statistics(kept)
        if extra is not None:
            self.global_step = int(extra["global_step"])
            self.skipped_steps = int(extra["skipped_steps"])
            self.gradient_accumulation_steps = extra.get("gradient_accumulation_steps", 1)
            self._load_extra_state(extra)
        # This rank's own statistics, read from its rank file before the main rank's optimizer state was
        # loaded (FNGDTrainer, fngd_hf.attach_accelerator): they replace the main rank's now.
        own, self._restore_after_load = self._restore_after_load, None
        if own is not None:
            self._put_statistics(own)
        elif extra is not None and extra.get("process_rank", 0) != _process_rank() and self._holds_rank_local_state():
            warnings.warn(
                f"rank {_process_rank()} loaded the optimizer state saved by rank {extra.get('process_rank', 0)}, so it "
                f"continues with that rank's {type(self).__name__} statistics and the run differs from the saved "
                f"one. FNGDTrainer keeps each rank's own (fngd_coefficients_rank{{r}}.pt); in an accelerate loop call "
                f"fngd_hf.attach_accelerator(accelerator, optimizer) before save_state()/load_state().",
                RuntimeWarning,
                stacklevel=2,
            )
        self._forget_cached_state()

    def _put_statistics(self, saved: dict[int, dict[str, torch.Tensor]]) -> None:
        """Write ``{parameter index: {key: tensor}}`` statistics into the state, each on its parameter's device."""
        params = [p for group in self.param_groups for p in group["params"]]
        if any(int(index) >= len(params) for index in saved):
            raise ValueError(
                f"the saved statistics name parameter {max(int(i) for i in saved)}, but this optimizer has "
                f"{len(params)} parameters: they were saved for another model or another target_modules"
            )
        for index, tensors in saved.items():
            param = params[int(index)]
            for key, value in tensors.items():
                self.state[param][key] = value.to(param.device)
