"""The batched end-of-backward engine: FNGD's fresh coefficients for many layers in a few kernels.

In the first epoch (or any step computing fresh coefficients) each managed layer's backward would
form its token Gram matrix, solve and weighted gradient on its own: about 16 kernels per layer, which
bound a GPU step by the host's launches. :class:`BatchedFirstEpoch` instead *defers* a layer: its
backward stages the input and output gradient (:class:`_DeferredLayer`), and a callback queued on the
autograd engine runs when that backward's graph is done, before ``backward()`` returns. It stacks the
layers of equal shape and does their Gram matrices, damped solves and natural gradients together,
then writes ``.grad`` as ``AccumulateGrad`` would. Padding tokens (zero output gradient in every layer
of a shape) are left out with one host read per backward.

Only under ``loss.backward()`` without a process group; everything else keeps the per-layer path
(see ``FNGD``'s ``batch_layers``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import functional as F
from .capture import CapturedLayer
from .directions import direction_tag


# Layers batched into one set of kernels at the end of backward: at most this many elements of
# token Gram (L·N², twice) and stacked inputs and output gradients (L·N·(i + o)) at once.
_BATCHED_MAX_ELEMENTS = 1 << 27
# Inputs and output gradients a backward holds for the batched maths before it does the layers held
# so far (a large model then batches in rounds instead of keeping every layer's tensors).
_DEFERRED_MAX_BYTES = 1 << 30
# The batched path asks the autograd engine which backward is running and whether it writes .grad
# (private torch API, as DDP and FSDP use it); a torch without it keeps the per-layer path.
_ENGINE_QUERIES = all(hasattr(torch._C, name) for name in ("_current_graph_task_id", "_will_engine_execute_node")) \
    and hasattr(torch.autograd.graph, "get_gradient_edge")


def _nonzero(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of ``mask``'s ``count`` true entries, without a host sync where torch can (``count`` is known)."""
    try:
        return torch.nonzero_static(mask, size=count).squeeze(1)
    except (AttributeError, NotImplementedError, RuntimeError):  # an older torch, or no kernel for this device
        return mask.nonzero().squeeze(1)


@dataclass(eq=False)
class _DeferredLayer:
    """A layer's fresh-coefficient work, staged in its backward and done with its equals at the end."""

    layer: CapturedLayer
    x: torch.Tensor | None  # (B, T, i); None once stacked with its equals
    delta: torch.Tensor | None  # (B, T, o)
    scale: float
    micro: int
    bank_slot: int | None
    by_sample: bool


class BatchedFirstEpoch:
    """Mixin of :class:`~fngd_hf.FNGD`: layers computing fresh coefficients, batched at the end of backward.

    Its state (made by :meth:`_init_batched`): ``_deferred`` (per autograd graph task, the layers waiting
    for the batched maths), ``_deferred_bytes`` (what each task's list holds) and ``_grad_accumulators``
    (per layer, its parameters' ``AccumulateGrad`` nodes), and the public counters ``host_reads`` and
    ``peak_held_bytes``. What it uses of the optimizer: the settings
    ``batch_layers``, ``gram_path`` and ``drop_padding``, the maths ``_stats``, ``_stat_dtype_for``, ``_damped_solve`` and
    ``_launch_bound``, the bank's ``_stage_coefficients``, and the base class's ``_note_finite``,
    ``_record_probe`` and diagnostics (``_diag``, ``_diag_staged``).
    """

    _batchable = True  # FNGD's (B,) coefficients from the token Gram (CW-NGD's per-unit systems are not)

    def _init_batched(self) -> None:
        # Layers waiting for the batched maths, per autograd graph task (a backward; a reentrant
        # checkpoint's backward runs inside another): each task's end runs its own.
        self._deferred: dict[int, list[_DeferredLayer]] = {}
        self._deferred_bytes: dict[int, int] = {}  # what each task's list holds
        self._grad_accumulators: dict[int, tuple] = {}  # per layer: (its params, their AccumulateGrad nodes)
        self.host_reads = 0  # device-to-host reads this engine made (the kept-token counts), for benchmarks
        self.peak_held_bytes = 0  # the most input and output-gradient bytes one round held

    def _can_defer(self, layer: CapturedLayer, x: torch.Tensor) -> bool:
        mode = self.batch_layers
        if mode is False or (mode == "auto" and not self._launch_bound(x)) or not _ENGINE_QUERIES:
            return False
        # Any process group, even of one process: DDP's reducer writes .grad from its buckets at the end.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return False
        if not self._batchable or self.gram_path == "per_sample" or torch.is_grad_enabled():
            return False
        for param in layer.params:
            # A frozen parameter, or hooks that expect their gradient as autograd makes it.
            if not param.requires_grad or param._backward_hooks or getattr(param, "_post_accumulate_grad_hooks", None):
                return False
        # Only a backward that accumulates into .grad: torch.autograd.grad(loss, params) must get d returned.
        nodes = self._grad_accumulators.get(layer.index)
        if nodes is None or nodes[0] is not layer.params:
            nodes = (layer.params, tuple(torch.autograd.graph.get_gradient_edge(p).node for p in layer.params))
            self._grad_accumulators[layer.index] = nodes  # held: the node stays the one graphs use
        try:
            return all(torch._C._will_engine_execute_node(node) for node in nodes[1])
        except RuntimeError:  # torch refuses the question inside autograd.grad, which never writes .grad
            return False

    def _defer(self, entry: _DeferredLayer) -> None:
        task = torch._C._current_graph_task_id()
        entries = self._deferred.get(task)
        if entries is None:
            # A backward that raises never runs its callback: its layers stay here, unapplied (as if
            # that backward had not happened), until step() or zero_grad() forgets them.
            entries = self._deferred[task] = []
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self._flush_deferred, task))
        entries.append(entry)
        held = self._deferred_bytes.get(task, 0) + sum(t.numel() * t.element_size() for t in (entry.x, entry.delta))
        self.peak_held_bytes = max(self.peak_held_bytes, held)
        if held > _DEFERRED_MAX_BYTES:
            self._flush_deferred(task)  # the next layer of this backward starts a new list (and callback)
        else:
            self._deferred_bytes[task] = held

    def _flush_deferred(self, task: int) -> None:
        """The staged layers' coefficients and ``.grad``, equally shaped layers together (a queued autograd
        callback: runs when the backward's graph is done, before ``backward()`` returns)."""
        entries = self._deferred.pop(task, None)
        self._deferred_bytes.pop(task, None)
        if not entries:
            return
        with torch.no_grad(), torch.autocast(entries[0].x.device.type, enabled=False):
            stacks = self._stack_equal_layers(entries)
            kept = self._kept_tokens(stacks) if self.drop_padding else {}
            memberships: dict[tuple, torch.Tensor] = {}  # one per shape and statistics dtype
            stacks.reverse()
            while stacks:
                members, x, delta = stacks.pop()  # each group's stacks go once it is done
                batch = x.shape[1]
                x, delta, sample, membership = self._select_kept_tokens(x, delta, kept, memberships)
                rows = x.shape[1] * (x.shape[2] if sample is None else 1)
                per_layer = 2 * rows * rows + rows * (x.shape[-1] + delta.shape[-1])
                size = max(1, _BATCHED_MAX_ELEMENTS // max(1, per_layer))
                for start in range(0, len(members), size):
                    chunk = slice(start, start + size)
                    self._batched_layer_gradients(members[chunk], x[chunk], delta[chunk], batch, sample, membership)
                del members, x, delta

    def _select_kept_tokens(self, x: torch.Tensor, delta: torch.Tensor, kept: dict, memberships: dict):
        """``(x, delta, sample, membership)``: the stacks (L, B, T, ·) as they are with ``None, None`` where
        their shape keeps every token, else their kept tokens (L, N, ·), each token's sample index and the
        one-hot ``membership`` (N, B) that sums token Gram entries by sample."""
        _, batch, length, _ = x.shape
        if (batch, length, x.device) not in kept:
            return x, delta, None, None
        tokens, sample = kept[(batch, length, x.device)]
        key = (batch, length, x.device, self._stat_dtype_for(delta.dtype))
        if key not in memberships:
            memberships[key] = F.sample_membership(sample, batch, key[-1])
        x, delta = (t.flatten(1, 2).index_select(1, tokens) for t in (x, delta))
        return x, delta, sample, memberships[key]

    @staticmethod
    def _stack_equal_layers(entries: list[_DeferredLayer]) -> list[tuple[list[_DeferredLayer], torch.Tensor, torch.Tensor]]:
        """``(members, x (L, B, T, i), delta (L, B, T, o))`` per group of layers that can share kernels."""
        groups: dict[tuple, list[_DeferredLayer]] = {}
        for entry in entries:
            layer = entry.layer
            key = (entry.x.shape, entry.delta.shape, entry.x.dtype, entry.delta.dtype, entry.x.device, entry.scale,
                   layer.has_bias, layer.transposed, layer.weight.dtype, layer.has_bias and layer.bias.dtype)
            groups.setdefault(key, []).append(entry)
        stacks = []
        for members in groups.values():
            x, delta = torch.stack([e.x for e in members]), torch.stack([e.delta for e in members])
            for entry in members:
                entry.x = entry.delta = None  # the stacks are the only copy from here on
            stacks.append((members, x, delta))
        return stacks

    def _kept_tokens(self, stacks: list[tuple]) -> dict[tuple, tuple[torch.Tensor, torch.Tensor]]:
        """Per (B, T, device) where some tokens have a zero output gradient in every layer of that shape
        (padding, ``-100`` labels): the flat indices of the others and their sample indices. Padding costs
        N² in the token Gram for nothing. The counts come in one host read for all shapes (per device):
        one sync per batched round, i.e. per backward unless a reentrant checkpoint or the memory budget
        splits it (one per group would each wait for the groups before it)."""
        masks: dict[tuple, torch.Tensor] = {}
        for _, x, delta in stacks:
            if x.shape[2] > 1:
                key = (x.shape[1], x.shape[2], x.device)
                keep = F.stacked_kept_tokens(delta)
                masks[key] = keep if key not in masks else masks[key].logical_or_(keep)
        by_device: dict[torch.device, list[tuple]] = {}
        for key in masks:
            by_device.setdefault(key[2], []).append(key)
        kept = {}
        for keys in by_device.values():  # a model spread over devices reads each device's counts
            self.host_reads += 1
            for key, count in zip(keys, self._host_counts([masks[key].sum() for key in keys])):
                if count < masks[key].shape[0]:
                    index = _nonzero(masks[key], count)
                    kept[key] = (index, index // key[1])
        return kept

    @staticmethod
    def _host_counts(counts: list[torch.Tensor]) -> list[int]:
        return torch.stack(counts).tolist()  # the batched first epoch's one host read per round

    def _batched_layer_gradients(self, entries: list[_DeferredLayer], x: torch.Tensor, delta: torch.Tensor,
                                 batch: int, sample: torch.Tensor | None, membership: torch.Tensor | None) -> None:
        """:meth:`_fresh_coefficients`, the bank staging and the weighted gradient of equally shaped layers,
        each step batched over them; the natural gradients go into ``.grad`` as autograd would put them.
        ``x``/``delta``: the layers' stacked tensors (L, B, T, ·), or their kept tokens (L, N, ·) with each
        token's ``sample`` index and its one-hot ``membership`` (N, B)."""
        first = entries[0]
        has_bias = first.layer.has_bias
        gram = F.stacked_gram_matrices(self._stats(x), self._stats(delta), has_bias, first.scale, membership)
        beta, damping_b, norm = self._damped_solve(gram, self.param_groups[0])
        self._note_finite(beta)
        self._diag_staged.append((damping_b.sum(), norm.sum(), batch))  # summed: one entry for len(entries) layers
        self._diag["fresh"] += len(entries)
        if any(entry.by_sample or entry.bank_slot is not None for entry in entries):
            # Converted and summed once for all layers; each layer stages its views.
            stored_beta, diagonal = beta.float(), gram.diagonal(dim1=-2, dim2=-1).float()
            traces = diagonal.sum(-1)
            for index, entry in enumerate(entries):
                self._stage_coefficients(entry.layer, entry.micro, entry.bank_slot, entry.by_sample,
                                         stored_beta[index], diagonal[index], traces[index])
        weights = F.sample_weights(beta, float(batch), delta.dtype).view(len(entries), batch)
        d_weight, d_bias = F.stacked_weighted_gradients(x, delta, weights, has_bias, first.layer.transposed, sample)
        weight_dtype = first.layer.weight.dtype
        if d_weight.dtype != weight_dtype:
            d_weight = d_weight.to(weight_dtype)
        if d_bias is not None and d_bias.dtype != first.layer.bias.dtype:
            d_bias = d_bias.to(first.layer.bias.dtype)
        bias_grads = (None,) * len(entries) if d_bias is None else d_bias.unbind(0)
        weight_grads = d_weight.unbind(0)
        for entry, weight_grad, bias_grad in zip(entries, weight_grads, bias_grads):
            self._record_probe(entry.layer, weight_grad, bias_grad)
        tag = direction_tag(weight_dtype)  # as _note_directions does per layer, here once for all
        if tag != 1.0:
            d_weight.mul_(tag)
            if d_bias is not None:
                d_bias.mul_(tag)
        # As AccumulateGrad: a missing .grad becomes the new gradient (here a view of the batched
        # result, no copy), an existing one is added to (gradient accumulation, a weight used twice).
        targets, values = [], []
        for entry, weight_grad, bias_grad in zip(entries, weight_grads, bias_grads):
            for param, grad in zip(entry.layer.params, (weight_grad, bias_grad)):
                if param.grad is None:
                    param.grad = grad
                else:
                    targets.append(param.grad)
                    values.append(grad)
        if targets:
            torch._foreach_add_(targets, values)

    def _discard_deferred(self) -> None:
        self._deferred.clear()  # layers of a backward that raised before its end
        self._deferred_bytes.clear()
