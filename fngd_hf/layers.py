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
