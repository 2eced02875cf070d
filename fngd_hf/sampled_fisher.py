"""Labels sampled from the model, for the Monte-Carlo estimate of the true Fisher (``fisher="monte_carlo"``).

The empirical Fisher is built from the gradients of the data's labels; the Fisher of the model's own predictive
distribution from those of labels drawn from it (one draw per token: an unbiased estimate, Kunstner et al.
2019). :func:`sampled_label_loss` is the loss whose backward gives those gradients, normalised as the model's own
token-mean cross-entropy is, so that the sampled per-sample gradients share the data's per-sample scale.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100  # transformers' and torch's cross-entropy convention for padding labels


def sample_labels(logits: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One label per position drawn from ``softmax(logits)`` (``(..., V)`` -> ``(...)``); positions whose data
    label is ``ignore_index`` keep it, so the sampled loss covers exactly the tokens the data's loss does."""
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., vocabulary), got {tuple(logits.shape)}")
    if labels is not None and labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)}")
    probs = torch.softmax(logits.detach().float(), dim=-1).reshape(-1, logits.shape[-1])
    sampled = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
    if labels is not None:
        sampled = torch.where(labels == ignore_index, labels, sampled)
    return sampled


def sampled_label_loss(logits: torch.Tensor, sampled: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The token-mean cross-entropy of ``sampled`` (as transformers' seq2seq models compute their loss), in
    float32 at least (bf16 logits would round the sampled gradients)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return F.cross_entropy(flat, sampled.reshape(-1), ignore_index=ignore_index)
