"""Which layers FNGD manages: ``nn.Linear`` and transformers' ``Conv1D``, minus vocabulary heads."""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

try:  # transformers is a dependency, but keep the layer helpers importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

SUPPORTED_LAYERS: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYERS)


def is_transposed(module: nn.Module) -> bool:
    """``Conv1D`` keeps its weight as ``(in, out)``; ``nn.Linear`` as ``(out, in)``."""
    return Conv1D is not None and isinstance(module, Conv1D)


def _embedding_weights(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    ids |= {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    return ids


def _vocabulary_heads(model: nn.Module) -> set[int]:
    """Output projections to the vocabulary: ``get_output_embeddings()`` and anything tied to an embedding."""
    heads = set()
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
        if isinstance(head, nn.Module):
            heads.add(id(head))
    embedding_ids = _embedding_weights(model)
    for module in model.modules():
        if is_supported(module) and (
            id(module.weight) in embedding_ids or module.weight.data_ptr() in embedding_ids
        ):
            heads.add(id(module))
    return heads


def _weight_used_directly(model: nn.Module) -> dict[int, str]:
    """Linear layers whose owner calls ``F.linear`` on their weight, so their forward never runs."""
    return {id(m.out_proj): "nn.MultiheadAttention applies its out_proj weight directly (F.linear)"
            for m in model.modules() if isinstance(m, nn.MultiheadAttention) and isinstance(m.out_proj, nn.Module)}


def _matches(name: str, pattern: str) -> bool:
    # PEFT style: an exact name, a dotted suffix, or a regex over the full name.
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def select_modules(
    model: nn.Module, target_modules: Iterable[str] | None = None
) -> dict[str, nn.Module]:
    """Name -> module for every layer FNGD will manage (trainable weight only)."""
    bypassed = _weight_used_directly(model)
    candidates = {
        name: module
        for name, module in model.named_modules()
        if is_supported(module) and module.weight.requires_grad and id(module) not in bypassed
    }
    if target_modules is None:
        heads = _vocabulary_heads(model)
        return {name: m for name, m in candidates.items() if id(m) not in heads}
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    patterns = list(target_modules)
    selected: dict[str, nn.Module] = {}
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"target_modules pattern {pattern!r} is not a valid regex: {error}") from None
        matched = [name for name, _ in model.named_modules() if name and _matches(name, pattern)]
        if not matched:
            raise ValueError(
                f"target_modules pattern {pattern!r} matches no module. "
                f"Supported layers in this model: {sorted(candidates)}"
            )
        for name in matched:
            if name not in candidates:
                module = model.get_submodule(name)
                if id(module) in bypassed:
                    reason = bypassed[id(module)]
                elif is_supported(module):
                    reason = "its weight is frozen"
                else:
                    reason = f"it is a {type(module).__name__}, not nn.Linear or Conv1D"
                raise ValueError(
                    f"target_modules pattern {pattern!r} matches {name!r}, which FNGD cannot manage: "
                    f"{reason}. Supported layers in this model: {sorted(candidates)}"
                )
            selected[name] = candidates[name]
    return selected


def layer_parameters(module: nn.Module) -> list[torch.nn.Parameter]:
    """The Fisher block of a layer: its weight and, if present and trainable, its bias."""
    params = [module.weight]
    if module.bias is not None and module.bias.requires_grad:
        params.append(module.bias)
    return params


def weight_decay_groups(
    model: nn.Module, params: list[nn.Parameter], weight_decay: float, no_decay: Iterable[str] | None
) -> list[tuple[list[nn.Parameter], float]]:
    """``[(params, weight_decay), (exempt params, 0.0)]``, or one pair (in model order, the checkpoint
    layout) when nothing is exempt or the decay is 0; empty lists are left out.

    ``no_decay`` holds names from ``model.named_parameters()``. Names of parameters outside ``params``
    (e.g. the managed layers' biases, which the natural-gradient part handles with its own
    ``weight_decay``) are accepted and ignored; unknown names are an error.
    """
    exempt_ids: set[int] = set()
    if no_decay is not None:
        if isinstance(no_decay, str):
            raise ValueError(f"adamw_no_decay takes a list of parameter names, got the string {no_decay!r}")
        known = dict(model.named_parameters())
        names = list(no_decay)
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(
                f"adamw_no_decay names {len(unknown)} parameter(s) the model does not have: {unknown[:5]}; "
                f"names look like {list(known)[:3]}"
            )
        exempt_ids = {id(known[name]) for name in names}
    exempt = [p for p in params if id(p) in exempt_ids]
    if weight_decay == 0.0 or not exempt:
        return [(list(params), weight_decay)] if params else []
    decayed = [p for p in params if id(p) not in exempt_ids]
    return [(group, decay) for group, decay in ((decayed, weight_decay), (exempt, 0.0)) if group]


def split_parameters(
    model: nn.Module, target_modules: Iterable[str] | None = None, *, matrices_only: bool = False
) -> tuple[dict[str, nn.Module], list[nn.Parameter], list[nn.Parameter]]:
    """``(modules, managed, others)``: the managed layers (:func:`select_modules`), their parameters
    (``matrices_only``: their 2-D weights, a shared one once) and every other trainable parameter."""
    modules = select_modules(model, target_modules)
    managed = [p for m in modules.values() for p in layer_parameters(m)]
    if matrices_only:
        managed = list({id(p): p for p in managed if p.ndim == 2}.values())
    managed_ids = {id(p) for p in managed}
    # model.parameters() already yields a tied parameter once; model order keeps checkpoints stable.
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in managed_ids]
    return modules, managed, others
