"""The coefficient bank: FNGD's ``β``, stored in the first epoch and shared after it.

``share_by="position"`` (the paper): step ``s`` of the first epoch stores ``β`` per (layer, step,
micro-batch) in ``coef_bank`` (with its batch size ``coef_size`` and ``tr K`` in ``coef_trace``), and
step ``s`` of a later epoch reuses the row ``s mod steps_per_epoch``. When nobody gives the epoch
length, an accelerate-prepared dataloader tells where the first epoch ends, and the bank learns it.
``share_by="sample"``: every sample keeps the ``β_n`` (and ``diag K``) it got when first seen, in
``coef_sample``/``coef_sample_diag`` rows found by :class:`~fngd_hf.sample_sharing.SampleIndex`; under
DDP every rank stores every rank's new samples. Coefficients are staged during backward and stored
only once ``step()`` has applied the step; everything lives in ``optimizer.state`` as plain tensors
(``state_dict()`` round trips, rank-local banks are kept by :mod:`fngd_hf.integrations.checkpointing`).
"""

from __future__ import annotations

import logging
import warnings

import torch

from .capture import CapturedLayer
from .runtime import _distributed, _in_accelerate_loop
from .sample_sharing import SampleIndex
from .settings import positive_int

logger = logging.getLogger(__name__)


def _end_of_dataloader() -> bool:
    """Whether the accelerate dataloader being iterated has just yielded its last batch."""
    from accelerate.state import GradientState

    return bool(GradientState._shared_state) and GradientState().end_of_dataloader


class CoefficientBank:
    """Mixin of :class:`~fngd_hf.FNGD`: storing, sharing, growing and gathering its coefficients.

    Its state (made by :meth:`_init_bank`; the tensors themselves are in ``self.state[layer.weight]``
    under :attr:`_float32_state_keys`): ``_steps_per_epoch`` (``None``: unknown, or being learnt while
    ``_learning_epoch_length``), ``_pending`` (per layer, the ``(slot, micro-batch, β, trace or diag K)``
    this step staged), the host copies ``_host_sizes`` (of ``coef_size``) and ``_bank_stack`` (every
    layer's bank stacked, see :meth:`_stacked_banks`), ``_shared_weights`` (this step's ``B·β`` per
    micro-batch), and for ``share_by="sample"`` ``_sample_index``, ``_next_sample_ids``, ``_sample_ids``,
    ``_sample_rows`` and ``_incomplete_layers``. What it uses of the optimizer: the settings
    ``share_coefficients``, ``share_by``, ``scale_mode`` and ``shared_phase``, and the base class's
    ``global_step``, ``_layers`` and ``state``.
    """

    _float32_state_keys = ("coef_bank", "coef_size", "coef_trace", "coef_sample", "coef_sample_diag")
    _stacked_keys = ("coef_bank", "coef_size", "coef_trace")

    def _init_bank(self) -> None:
        self._sample_index = SampleIndex()
        self._next_sample_ids: list[int] | None = None  # from set_sample_ids, for the next micro-batch
        self._sample_ids: dict[int, list[int]] = {}  # micro-batch index of this step -> its sample ids
        self._sample_rows: dict[int, torch.Tensor | None] = {}  # per micro-batch: bank rows, None = unseen samples
        self._incomplete_layers: set[str] = set()  # missed a store: always fresh coefficients (share_by="sample")
        self._host_sizes: dict[int, dict[tuple[int, int], int]] = {}  # host copies of coef_size, per layer
        self._pending: dict[int, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}  # per layer, per micro-batch
        self._learning_epoch_length = False  # steps_per_epoch unknown: the first epoch's end will tell it
        self._unknown_epoch_warned = False
        # (self.state, per-layer state dicts, their coef_bank views, the stacked tensors): see _stacked_banks
        self._bank_stack: tuple | None = None
        self._shared_weights: dict[tuple, tuple[torch.Tensor, ...] | None] = {}  # this step's, per micro-batch

    # ----------------------------------------------------------------------------- settings
    @property
    def steps_per_epoch(self) -> int | None:
        return self._steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, value: int | None) -> None:
        self._steps_per_epoch = positive_int("steps_per_epoch", value, optional=True)

    def set_sample_ids(self, ids) -> None:
        """Ids of the samples of the next micro-batch, in batch order (``share_by="sample"``).

        Call once per micro-batch, before its forward and backward: dataset indices, or
        :func:`fngd_hf.sample_sharing.sample_keys` of its token ids. Each call serves exactly
        one backward (a forgotten call is an error, not a silent reuse). Ignored otherwise.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.is_floating_point():
                raise ValueError(f"sample ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        self._next_sample_ids = [int(i) for i in ids]

    def _sharing_slot(self) -> int | None:
        """The bank slot of this step: its position in the epoch; while the epoch length is being learnt
        (an accelerate dataloader says where the first epoch ends), the step itself; ``None``: not stored
        (no sharing, or ``shared_phase="adamw"``, which needs only the epoch length)."""
        if not self.share_coefficients or self.share_by == "sample":
            return None
        stores = self.shared_phase == "coefficients"
        if self._steps_per_epoch is not None:
            return self.global_step % self._steps_per_epoch if stores else None
        if self.global_step == 0 and _in_accelerate_loop():
            self._learning_epoch_length = True
        if self._learning_epoch_length:
            return self.global_step if stores else None
        if not self._unknown_epoch_warned:
            self._unknown_epoch_warned = True
            warnings.warn(
                f"{type(self).__name__} does not know the epoch length, so it cannot share coefficients: every step "
                "computes fresh ones (NGD, slower). Pass steps_per_epoch=N (optimizer steps per epoch), set "
                "opt.steps_per_epoch = N, or train from an accelerate-prepared dataloader (the HF Trainer's), "
                "where FNGD learns the length in the first epoch.",
                RuntimeWarning,
                stacklevel=5,
            )
        return None

    def _learn_epoch_length(self, steps: int) -> None:
        """The first epoch ended after ``steps`` steps: keep that many bank rows and share from now on."""
        self._learning_epoch_length = False
        for layer in self._layers:
            state = self.state.get(layer.weight, {})
            for key in self._stacked_keys:
                if key in state:  # exactly `steps` rows (fewer were stored if the last steps were skipped)
                    old, kept = state[key], min(steps, state[key].shape[0])
                    state[key] = old.new_zeros(steps, *old.shape[1:])
                    state[key][:kept] = old[:kept]
        self._forget_cached_state()
        self._steps_per_epoch = steps
        logger.info("%s: learnt the epoch length, %d optimizer steps; coefficients are shared from now on",
                    type(self).__name__, steps)

    def _host_size_table(self, layer: CapturedLayer) -> dict[tuple[int, int], int]:
        """``{(slot, micro): batch}`` of the filled bank slots: a host copy of ``coef_size``, read from
        the device only after a checkpoint load (kept sparse: an epoch can be a million steps)."""
        sizes = self._host_sizes.get(id(layer))
        if sizes is None:
            tensor = self.state.get(layer.weight, {}).get("coef_size")
            sizes = {}
            if tensor is not None:
                filled = tensor.nonzero()
                sizes = dict(zip(map(tuple, filled.tolist()), tensor[tuple(filled.T)].tolist()))
            self._host_sizes[id(layer)] = sizes
        return sizes

    def _stored_size(self, layer: CapturedLayer, slot: int, micro: int) -> int:
        """Batch size of a bank slot (0 = empty), from a host copy: no device sync per layer."""
        return self._host_size_table(layer).get((slot, micro), 0)

    def _stored_coefficients(self, layer: CapturedLayer, slot: int, micro: int, batch: int):
        if self._stored_size(layer, slot, micro) != batch:
            return None  # never truncate or pad: a different batch size gets fresh coefficients
        state = self.state[layer.weight]
        # The stored trace only serves scale_mode="refreshed" (views cost host time on GPUs).
        trace = state["coef_trace"][slot, micro] if self.scale_mode == "refreshed" else None
        return state["coef_bank"][slot, micro, :batch], trace

    def _slot_filled(self, layer: CapturedLayer, slot: int, micro: int) -> bool:
        return self._stored_size(layer, slot, micro) > 0

    def _all_shared_sample_weights(self, micro: int, batch: int, dtype: torch.dtype):
        """``B·β`` of every layer's stored slot for this micro-batch, shaped as :func:`F.sample_weights`
        shapes it (``None`` for a layer whose slot holds another batch size), from one stacked bank: a
        few kernels per micro-batch instead of an index and a multiply per layer. ``None`` outside the
        shared phase by position with ``scale_mode="shared"`` and FNGD's ``(B,)`` coefficients: those
        take the general path."""
        period = self._steps_per_epoch
        if (not self.share_coefficients or self.share_by != "position" or self.scale_mode != "shared"
                or period is None or self.global_step < period):
            return None
        stacked = self._stacked_banks()
        if stacked is None or stacked[0].shape[1] != period or micro >= stacked[0].shape[2]:
            return None  # none, or not for this epoch length or this many micro-batches
        slot = self.global_step % period
        weights = stacked[0][:, slot, micro, :batch].mul(batch).to(dtype)[:, :, None, None].unbind(0)
        return tuple(w if self._stored_size(layer, slot, micro) == batch else None for layer, w in zip(self._layers, weights))

    def _stacked_banks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every layer's ``coef_bank``, ``coef_size`` and ``coef_trace``, each stacked into one tensor
        (layers first), or ``None`` if a layer has none or their shapes, dtypes or devices differ (CW-NGD's
        per-unit banks always do). Each layer's state then holds views of them (no second copy). A bank
        replaced since (grown, or a loaded state: ``_reserve_bank`` replaces the three together) is
        noticed by identity and stacked again."""
        cached = self._bank_stack
        if cached is not None:
            state, layer_states, banks, stacked = cached
            if state is self.state and all(s.get("coef_bank") is b for s, b in zip(layer_states, banks)):
                return stacked
        self._bank_stack = None
        layer_states = [self.state[layer.weight] for layer in self._layers]
        columns = [[s.get(key) for s in layer_states] for key in self._stacked_keys]
        for tensors in columns:
            first = tensors[0]
            if first is None or any(
                t is None or t.shape != first.shape or t.dtype != first.dtype or t.device != first.device
                for t in tensors
            ):
                return None
        if columns[0][0].dim() != 3:  # FNGD's (P, micro-batches, B); CW-NGD's has a unit dimension
            return None
        stacked = tuple(torch.stack(tensors) for tensors in columns)
        for index, layer_state in enumerate(layer_states):
            for key, column in zip(self._stacked_keys, stacked):
                layer_state[key] = column[index]
        self._bank_stack = (self.state, layer_states, [s["coef_bank"] for s in layer_states], stacked)
        return stacked

    def _stage_coefficients(self, layer: CapturedLayer, micro: int, bank_slot: int | None, by_sample: bool,
                            beta: torch.Tensor, diagonal: torch.Tensor, trace: torch.Tensor | None = None) -> None:
        """Keep a fresh ``β`` (and ``diag K``, or its sum ``trace``) for the bank; ``step()`` stores it if applied."""
        if by_sample:
            self._pending.setdefault(id(layer), []).append((None, micro, beta.float(), diagonal.float()))
        elif bank_slot is not None:
            trace = diagonal.float().sum(0) if trace is None else trace
            self._pending.setdefault(id(layer), []).append((bank_slot, micro, beta.float(), trace))

    @staticmethod
    def _missing_ids_message() -> str:
        return (
            "share_by='sample' needs the ids of every micro-batch's samples: call opt.set_sample_ids(ids) "
            "(dataset indices, or fngd_hf.sample_sharing.sample_keys(input_ids, labels)) before each "
            "backward, or use FNGDTrainer, which does it."
        )

    def _discard_bank_staging(self) -> None:
        self._shared_weights.clear()
        self._pending.clear()
        self._sample_ids.clear()
        self._sample_rows.clear()

    def _after_step(self) -> None:
        """Store the coefficients staged by this step's backward (never those of a skipped step)."""
        if self.share_by == "sample":
            self._store_by_sample()
            return
        period = self._steps_per_epoch
        if period is not None and self._store_stacked(period):
            return
        writes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (bank view, value), all layers
        tails: list[torch.Tensor] = []
        size_values: dict[tuple[int, torch.device], torch.Tensor] = {}
        for layer in self._layers:
            entries = self._pending.get(id(layer))
            if not entries:
                continue
            micros, batch = max(e[1] for e in entries) + 1, max(e[2].shape[0] for e in entries)
            slots = max(e[0] for e in entries) + 1
            state = self._reserve_bank(layer, period, micros, batch, entries[0][2], slots)
            bank, host = state["coef_bank"], self._host_size_table(layer)
            for slot, micro, beta, trace in entries:
                if beta.shape[0] < bank.shape[2]:
                    tails.append(bank[slot, micro, beta.shape[0]:])
                size = state["coef_size"][slot, micro]
                key = (beta.shape[0], size.device)
                if key not in size_values:  # one small tensor per batch size, not one per layer
                    size_values[key] = size.new_full((), beta.shape[0])
                writes += [(bank[slot, micro, : beta.shape[0]], beta), (state["coef_trace"][slot, micro], trace),
                           (size, size_values[key])]
                host[slot, micro] = beta.shape[0]  # the host copy follows the tensor: no device read later
        if writes:
            # Three multi-tensor kernels per step instead of four kernels per layer (GPU host time).
            if tails:
                torch._foreach_zero_(tails)
            by_dtype: dict[torch.dtype, tuple[list, list]] = {}
            for view, value in writes:
                targets, values = by_dtype.setdefault(view.dtype, ([], []))
                targets.append(view)
                values.append(value)
            for targets, values in by_dtype.values():
                torch._foreach_copy_(targets, values)

    def _store_stacked(self, period: int) -> bool:
        """Store this step's coefficients of every layer with a few writes into the stacked banks, when every
        layer staged the same (slot, micro-batch, batch size) entries and the banks hold them (the usual
        case after the first step). ``False``: nothing was written, the per-layer path stores them."""
        staged = [self._pending.get(id(layer)) for layer in self._layers]
        if not staged or not all(staged):
            return False
        keys = [(slot, micro, beta.shape[0]) for slot, micro, beta, _ in staged[0]]
        if any([(slot, micro, beta.shape[0]) for slot, micro, beta, _ in entries] != keys for entries in staged[1:]):
            return False
        stacked = self._stacked_banks()
        if stacked is None:
            return False
        bank, sizes, traces = stacked
        if bank.shape[1] != period or max(k[1] for k in keys) >= bank.shape[2] or max(k[2] for k in keys) > bank.shape[3]:
            return False  # a new epoch length or a bigger batch: the per-layer path grows the banks
        hosts = [self._host_size_table(layer) for layer in self._layers]
        for index, (slot, micro, batch) in enumerate(keys):
            bank[:, slot, micro, :batch] = torch.stack([entries[index][2] for entries in staged])
            if batch < bank.shape[3]:
                bank[:, slot, micro, batch:] = 0.0
            traces[:, slot, micro] = torch.stack([entries[index][3] for entries in staged])
            sizes[:, slot, micro] = batch
            for host in hosts:
                host[slot, micro] = batch  # the host copy follows the tensor: no device read later
        return True

    def _reserve_bank(self, layer: CapturedLayer, period: int | None, micros: int, batch: int, like: torch.Tensor,
                      slots: int = 0):
        """The layer's bank, grown (or restarted) so that ``micros`` micro-batches of ``batch`` samples fit;
        ``period=None`` (epoch length being learnt): at least ``slots`` rows, grown geometrically."""
        state = self.state[layer.weight]
        bank = state.get("coef_bank")
        unit_shape = tuple(like.shape[1:])  # CW-NGD: one beta per unit
        rows = period if period is not None else max(slots, 2 * (0 if bank is None else bank.shape[0]))
        if bank is None or (period is not None and bank.shape[0] != period) or tuple(bank.shape[3:]) != unit_shape:
            if bank is not None:
                warnings.warn(
                    f"steps_per_epoch changed to {period}: the coefficient bank of {layer.name} restarts",
                    RuntimeWarning,
                )
            state["coef_bank"] = like.new_zeros(rows, micros, batch, *unit_shape)
            state["coef_size"] = torch.zeros(rows, micros, dtype=torch.int64, device=like.device)
            state["coef_trace"] = like.new_zeros(rows, micros, *unit_shape)
            self._host_sizes[id(layer)] = {}
        bank = state["coef_bank"]
        if period is None and bank.shape[0] < slots:  # learning the epoch length: more rows
            for key in self._stacked_keys:
                old = state[key]
                grown = old.new_zeros(rows, *old.shape[1:])
                grown[: old.shape[0]] = old
                state[key] = grown
            bank = state["coef_bank"]
        if micros > bank.shape[1] or batch > bank.shape[2]:
            micro_cap, batch_cap = max(micros, bank.shape[1]), max(batch, bank.shape[2])
            grown = like.new_zeros(bank.shape[0], micro_cap, batch_cap, *unit_shape)
            grown[:, : bank.shape[1], : bank.shape[2]] = bank
            sizes = state["coef_size"].new_zeros(bank.shape[0], micro_cap)
            sizes[:, : bank.shape[1]] = state["coef_size"]
            traces = like.new_zeros(bank.shape[0], micro_cap, *unit_shape)
            traces[:, : bank.shape[1]] = state["coef_trace"]
            state["coef_bank"], state["coef_size"], state["coef_trace"] = grown, sizes, traces
        return state

    # ------------------------------------------------------------- bank by sample (share_by)
    def _micro_batch_ids(self, micro: int, batch: int) -> list[int]:
        if micro not in self._sample_ids:  # the first layer of this micro-batch's backward binds the ids
            if self._next_sample_ids is None:
                raise ValueError(self._missing_ids_message())
            self._sample_ids[micro], self._next_sample_ids = self._next_sample_ids, None
        ids = self._sample_ids[micro]
        if len(ids) != batch:
            raise ValueError(
                f"set_sample_ids got {len(ids)} ids for micro-batch {micro}, but the managed layers see "
                f"{batch} samples (the first dimension of their input)"
            )
        return ids

    def _stored_sample_coefficients(self, layer: CapturedLayer, micro: int, batch: int, device):
        """``(β, Σ stored diag K)`` of this micro-batch's samples if all were seen before, else ``None``."""
        ids = self._micro_batch_ids(micro, batch)
        if micro not in self._sample_rows:  # looked up once per micro-batch, for every layer
            rows = self._sample_index.rows(ids)
            self._sample_rows[micro] = None if rows is None else torch.tensor(rows, device=device)
        rows = self._sample_rows[micro]
        if rows is None or layer.name in self._incomplete_layers:
            return None
        state = self.state[layer.weight]
        return state["coef_sample"].index_select(0, rows), state["coef_sample_diag"].index_select(0, rows).sum(0)

    def _store_by_sample(self) -> None:
        """Give the samples first seen in this step their rows and coefficients, in every layer."""
        staged = [self._pending.get(id(layer)) for layer in self._layers]
        if not any(staged) and not _distributed():
            return
        micros = sorted(self._sample_ids)
        # A step that computed nothing fresh (every sample seen) contributes no ids.
        ids = [key for micro in micros for key in self._sample_ids[micro]] if any(staged) else []
        per_layer = []
        for layer, entries in zip(self._layers, staged):
            if ids and (not entries or sorted(e[1] for e in entries) != micros):
                per_layer.append(None)  # e.g. a layer that did not run: it cannot serve these samples
                continue
            entries = sorted(entries or [], key=lambda entry: entry[1])
            empty = torch.zeros(0, *self._coefficient_shape(layer), dtype=torch.float32, device=layer.weight.device)
            per_layer.append(tuple(torch.cat([empty] + [e[k] for e in entries]) for k in (2, 3)))
        ids, per_layer = self._gather_across_ranks(ids, per_layer)
        positions, rows = self._sample_index.add(ids)
        if not positions:
            return
        index = torch.tensor(positions)
        for layer, values in zip(self._layers, per_layer):
            if values is None:
                self._incomplete_layers.add(layer.name)
                continue
            state = self.state[layer.weight]
            needed = len(self._sample_index)
            for key, value in zip(("coef_sample", "coef_sample_diag"), values):
                bank = state.get(key)
                if bank is None or bank.shape[0] < needed:  # grow geometrically: O(1) amortised per sample
                    grown = value.new_zeros(max(needed, 2 * (0 if bank is None else bank.shape[0])), *value.shape[1:])
                    if bank is not None:
                        grown[: bank.shape[0]] = bank
                    state[key] = bank = grown
                bank[torch.tensor(rows, device=value.device)] = value.index_select(0, index.to(value.device))

    def _coefficient_shape(self, layer: CapturedLayer) -> tuple[int, ...]:
        """Shape of one sample's coefficient: a number for FNGD (CW-NGD: one per output unit)."""
        return ()

    def _gather_across_ranks(self, ids: list[int], per_layer: list):
        """Under DDP every rank stores every rank's new samples: the sampler moves samples between ranks.

        A collective: every rank calls it at every applied step, whether or not it has new samples.
        A layer that could not store on some rank is left out (``None``) on every rank.
        """
        if not _distributed():
            return ids, per_layer
        world = torch.distributed.get_world_size()
        gathered_ids: list = [None] * world
        torch.distributed.all_gather_object(gathered_ids, ids)
        present: list = [None] * world
        torch.distributed.all_gather_object(present, [values is not None for values in per_layer])
        width = max(len(rank_ids) for rank_ids in gathered_ids)
        if width == 0:
            return [], per_layer
        merged = []
        for layer, values, everywhere in zip(self._layers, per_layer, map(all, zip(*present))):
            if not everywhere:
                merged.append(None)
                continue
            parts = []
            for tensor in values:
                padded = tensor.new_zeros(width, *tensor.shape[1:])
                padded[: tensor.shape[0]] = tensor
                chunks = [torch.empty_like(padded) for _ in range(world)]
                torch.distributed.all_gather(chunks, padded)
                parts.append(torch.cat([c[: len(r)] for c, r in zip(chunks, gathered_ids)]))
            merged.append(tuple(parts))
        return [key for rank_ids in gathered_ids for key in rank_ids], merged

    def _holds_rank_local_state(self) -> bool:
        # Sharing by sample gathers every rank's samples: the banks are the same on every rank.
        return self.share_coefficients and self.share_by == "position" and super()._holds_rank_local_state()

    def _forget_cached_state(self) -> None:
        self._host_sizes.clear()
        self._bank_stack = None  # loaded or restored banks replace the stacked one
