"""Slow, obviously-correct float64 reference for FNGD (used only by the tests).

Definitions follow ``shared/guide/fngd-math.md``:

* per-sample gradient ``g_n = B · (sample n's contribution to ∂L/∂Ŵ)``, ``L`` the batch loss
  exactly as the model returns it, so that ``(1/B) Σ_n g_n = ∂L/∂Ŵ``;
* layer block ``Ŵ = [W | b]``, ``J = [vec g_1 … vec g_B]``, ``F = (1/B) J Jᵀ``;
* damped natural gradient ``d = (F + λI)⁻¹ ḡ``; relative damping ``λ = γ ‖K‖_F / B``
  with ``K = JᵀJ``.

Everything here is dense and in float64: tiny models only. Per-sample gradients come from
``torch.func`` (``functional_call`` + ``grad``; ``vmap`` for the MLP, a Python loop over
samples for Hugging Face models). The reference never runs through the optimizer's hooks: run
it on a separate model instance (``clone_model``) that never had an optimizer attached.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

DTYPE = torch.float64


# ----------------------------------------------------------------------------- per-sample grads
def _slice(batch, n: int):
    """Sample ``n`` of a batch (dict or tuple of tensors), keeping a leading dim of 1."""
    if isinstance(batch, Mapping):
        return {k: v[n : n + 1] for k, v in batch.items()}
    return tuple(v[n : n + 1] for v in batch)


def _batch_size(batch) -> int:
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    return int(values[0].shape[0])


def per_sample_grads(
    model: nn.Module,
    batch,
    loss_fn: Callable,
    param_names,
    *,
    multiplier: float | None = None,
    vectorize: bool = False,
) -> dict[str, torch.Tensor]:
    """``{name: g}`` with ``g[n] = multiplier · ∂ contribution_n / ∂ param`` (float64).

    ``loss_fn(call, sample)`` returns sample ``n``'s contribution to the batch loss ``L``
    (e.g. ``CE_n / B`` for a mean-over-samples loss, ``Σ_t CE_nt / N_tokens(batch)`` for a
    token-mean seq2seq loss); ``sample`` is the batch sliced to ``[n:n+1]`` and ``call`` runs
    the model functionally (same signature as the model). ``multiplier`` defaults to the batch
    size ``B``; under gradient accumulation pass ``B_total`` and a contribution relative to the
    full objective. ``vectorize=True`` uses ``vmap`` (fine for plain ``nn`` models).
    """
    param_names = list(param_names)
    # Unique names only: functional_call(tie_weights=True) maps tied aliases to the same tensor.
    all_params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    missing = [name for name in param_names if name not in all_params]
    if missing:
        raise KeyError(f"unknown parameters {missing}")
    wrt = {name: all_params[name] for name in param_names}
    frozen = {k: v for k, v in all_params.items() if k not in wrt}
    batch_size = _batch_size(batch)
    multiplier = float(batch_size if multiplier is None else multiplier)

    def contribution(params, sample):
        state = {**frozen, **buffers, **params}

        def call(*args, **kwargs):
            return functional_call(model, state, args, kwargs)

        return loss_fn(call, sample)

    if vectorize:
        def one(params, sample):
            sample = (
                {k: v.unsqueeze(0) for k, v in sample.items()}
                if isinstance(sample, Mapping)
                else tuple(v.unsqueeze(0) for v in sample)
            )
            return grad(contribution)(params, sample)

        grads = vmap(one, in_dims=(None, 0))(wrt, batch)
        return {name: (multiplier * grads[name]).to(DTYPE) for name in param_names}

    per_sample = [grad(contribution)(wrt, _slice(batch, n)) for n in range(batch_size)]
    return {
        name: (multiplier * torch.stack([g[name] for g in per_sample])).to(DTYPE) for name in param_names
    }


def layer_per_sample(grads: Mapping[str, torch.Tensor], layer_name: str, bias: bool = True):
    """``(gW, gb)`` of one ``nn.Linear`` from a ``per_sample_grads`` result (``gb`` None without bias)."""
    g_weight = grads[f"{layer_name}.weight"]
    g_bias = grads.get(f"{layer_name}.bias") if bias else None
    return g_weight, g_bias


def layer_param_names(model: nn.Module, layer_names) -> list[str]:
    names = []
    for layer_name in layer_names:
        module = model.get_submodule(layer_name)
        names.append(f"{layer_name}.weight")
        if getattr(module, "bias", None) is not None:
            names.append(f"{layer_name}.bias")
    return names


# ------------------------------------------------------------------------------ dense solve
def jacobian(per_sample, bias: bool = True) -> tuple[torch.Tensor, torch.Size, int]:
    """``J`` as rows ``vec([g_W | g_b])_n`` (shape ``(B, p)``), the W shape and ``B``."""
    if isinstance(per_sample, torch.Tensor):
        g_weight, g_bias = per_sample, None
    else:
        g_weight, g_bias = per_sample
    if not bias:
        g_weight, g_bias = g_weight, None
    batch = g_weight.shape[0]
    g_weight = g_weight.to(DTYPE)
    rows = [g_weight.reshape(batch, -1)]
    if g_bias is not None:
        rows.append(g_bias.to(DTYPE).reshape(batch, -1))
    return torch.cat(rows, dim=1), g_weight.shape[1:], batch


def _split(vector: torch.Tensor, weight_shape: torch.Size, has_bias: bool):
    n_weight = weight_shape.numel()
    d_weight = vector[:n_weight].reshape(weight_shape)
    d_bias = vector[n_weight:] if has_bias else None
    return d_weight, d_bias


def damping_value(per_sample, damping: float, mode: str, bias: bool = True) -> float:
    """``λ``: fixed → ``damping``; relative → ``γ ‖K‖_F / B`` with ``K = JᵀJ`` (``B × B``)."""
    rows, _, batch = jacobian(per_sample, bias)
    if mode == "fixed":
        return float(damping)
    if mode == "relative":
        return float(damping * torch.linalg.matrix_norm(rows @ rows.T) / batch)
    raise ValueError(mode)


def dense_natural_gradient(per_sample, damping: float, mode: str = "fixed", bias: bool = True, fisher_samples=None):
    """``d = (F + λI)⁻¹ ḡ`` with the full ``p × p`` Fisher block, returned as ``(dW, db)``. ``fisher_samples``: other
    per-sample gradients (those of labels sampled from the model) to build ``F`` (and relative ``λ``) from;
    ``ḡ`` stays the mean of ``per_sample``."""
    rows, weight_shape, batch = jacobian(per_sample, bias)
    has_bias = rows.shape[1] > weight_shape.numel()
    fisher_rows = rows if fisher_samples is None else jacobian(fisher_samples, bias)[0]
    lam = damping_value(per_sample if fisher_samples is None else fisher_samples, damping, mode, bias)
    fisher = fisher_rows.T @ fisher_rows / batch
    mean_grad = rows.mean(dim=0)
    eye = torch.eye(fisher.shape[0], dtype=DTYPE)
    d = torch.linalg.solve(fisher + lam * eye, mean_grad)
    return _split(d, weight_shape, has_bias)


def smw_coefficients(per_sample, damping: float, mode: str = "fixed", bias: bool = True) -> torch.Tensor:
    """``β = (K + λB I)⁻¹ 1`` (``B``-vector)."""
    rows, _, batch = jacobian(per_sample, bias)
    lam = damping_value(per_sample, damping, mode, bias)
    gram = rows @ rows.T
    ones = torch.ones(batch, dtype=DTYPE)
    return torch.linalg.solve(gram + lam * batch * torch.eye(batch, dtype=DTYPE), ones)


def apply_coefficients(per_sample, beta: torch.Tensor, bias: bool = True):
    """``d = J β`` as ``(dW, db)``."""
    rows, weight_shape, _ = jacobian(per_sample, bias)
    has_bias = rows.shape[1] > weight_shape.numel()
    return _split(rows.T @ beta.to(DTYPE), weight_shape, has_bias)


def gram_trace(per_sample, bias: bool = True) -> torch.Tensor:
    rows, _, _ = jacobian(per_sample, bias)
    return (rows * rows).sum()


def smw_natural_gradient(per_sample, damping: float, mode: str = "fixed", bias: bool = True):
    return apply_coefficients(per_sample, smw_coefficients(per_sample, damping, mode, bias), bias)


# ------------------------------------------------------------------------------ tiny models
MLP_IN, MLP_HIDDEN, MLP_CLASSES = 5, 7, 3


def tiny_mlp(bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(MLP_IN, MLP_HIDDEN, bias=bias),
        nn.Tanh(),
        nn.Linear(MLP_HIDDEN, MLP_HIDDEN, bias=bias),
        nn.Tanh(),
        nn.Linear(MLP_HIDDEN, MLP_CLASSES, bias=bias),
    )
    return model.to(DTYPE).train()


def mlp_batch(batch: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        "x": torch.randn(batch, MLP_IN, generator=g, dtype=DTYPE),
        "y": torch.randint(0, MLP_CLASSES, (batch,), generator=g),
    }


def mlp_loss(model: nn.Module, batch) -> torch.Tensor:
    """The batch loss as training computes it: mean cross-entropy over samples."""
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def mlp_contribution(batch_size: int, loss_scale: float = 1.0) -> Callable:
    """Sample n's contribution to ``loss_scale · mean_n CE_n``: ``loss_scale · CE_n / B``."""

    def contribution(call, sample):
        logits = call(sample["x"])
        return loss_scale * nn.functional.cross_entropy(logits, sample["y"], reduction="sum") / batch_size

    return contribution


SEQ2SEQ_KINDS = ("bart", "marian", "t5")
VOCAB = 50
PAD, BOS, EOS = 1, 0, 2


def tiny_seq2seq(kind: str = "bart", seed: int = 0) -> nn.Module:
    """A 1-2 layer encoder-decoder from config (no Hub), every dropout 0, float64, train mode."""
    common = dict(
        vocab_size=VOCAB,
        d_model=16,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=EOS if kind == "bart" else PAD,
    )
    torch.manual_seed(seed)
    if kind == "bart":  # the suite's one BART builder (same ids: bos 0, pad 1, eos 2 = decoder start)
        from tiny_models import tiny_bart

        model = tiny_bart(seed, vocab_size=VOCAB, d_model=16, ffn_dim=24, max_position_embeddings=32,
                          encoder_layers=1, decoder_layers=2, classifier_dropout=0.0)
    elif kind == "marian":
        from transformers import MarianConfig, MarianMTModel

        config = MarianConfig(**common)
        model = MarianMTModel(config)
    elif kind == "t5":  # no Linear has a bias; relative position bias instead of position embeddings
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=2, num_heads=2,
            dropout_rate=0.0, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
        )
        model = T5ForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    return model.to(DTYPE).train()


def clone_model(model: nn.Module, builder: Callable[[], nn.Module]) -> nn.Module:
    """A fresh instance (no hooks) holding ``model``'s current parameters."""
    fresh = builder()
    fresh.load_state_dict(model.state_dict())
    return fresh.to(DTYPE).train()


def seq2seq_batch(
    batch: int = 4,
    seed: int = 0,
    src_lengths: list[int] | None = None,
    tgt_lengths: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded source (pad tokens, attention mask) and labels (-100 past each target's end)."""
    g = torch.Generator().manual_seed(2000 + seed)
    if src_lengths is None:
        src_lengths = [int(v) for v in torch.randint(3, 9, (batch,), generator=g)]
    if tgt_lengths is None:
        tgt_lengths = [int(v) for v in torch.randint(2, 8, (batch,), generator=g)]
    src_lengths[0], tgt_lengths[-1] = 9, 8  # make the padding visible in the other rows
    max_src, max_tgt = max(src_lengths), max(tgt_lengths)
    input_ids = torch.full((batch, max_src), PAD, dtype=torch.long)
    attention_mask = torch.zeros(batch, max_src, dtype=torch.long)
    labels = torch.full((batch, max_tgt), -100, dtype=torch.long)
    for n, (s, t) in enumerate(zip(src_lengths, tgt_lengths)):
        input_ids[n, : s - 1] = torch.randint(3, VOCAB, (s - 1,), generator=g)
        input_ids[n, s - 1] = EOS
        attention_mask[n, :s] = 1
        labels[n, : t - 1] = torch.randint(3, VOCAB, (t - 1,), generator=g)
        labels[n, t - 1] = EOS
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """What the model builds from ``labels`` (shift right, -100 -> pad, start token first)."""
    config = model.config
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1].clone()
    shifted[:, 0] = config.decoder_start_token_id
    return shifted.masked_fill(shifted == -100, config.pad_token_id)


def with_decoder_inputs(model: nn.Module, batch: dict) -> dict:
    return {**batch, "decoder_input_ids": decoder_inputs(model, batch["labels"])}


def seq2seq_loss(model: nn.Module, batch) -> torch.Tensor:
    """The batch loss as training computes it: ``model(**batch).loss`` (token mean over labels != -100)."""
    return model(**batch).loss


def seq2seq_contribution(n_tokens: int, loss_scale: float = 1.0) -> Callable:
    """Sample n's contribution to ``loss_scale · L``: ``loss_scale · Σ_t CE_nt / n_tokens``.

    ``n_tokens`` is the number of non-ignored label tokens in the WHOLE batch the loss was
    averaged over (a fixed normaliser). ``sample`` must carry ``decoder_input_ids`` built from
    the full batch (``with_decoder_inputs``), so the sample sees exactly its batch row.
    """

    def contribution(call, sample):
        out = call(
            input_ids=sample["input_ids"],
            attention_mask=sample["attention_mask"],
            decoder_input_ids=sample["decoder_input_ids"],
        )
        logits = out.logits
        ce = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), sample["labels"].reshape(-1), ignore_index=-100, reduction="sum"
        )
        return loss_scale * ce / n_tokens

    return contribution


def n_label_tokens(batch) -> int:
    return int((batch["labels"] != -100).sum())


def linear_layer_names(model: nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in exclude]


# --------------------------------------------------------------------------- convenience
def reference_grads(kind: str, model: nn.Module, batch, layer_names, *, multiplier=None, loss_scale=1.0,
                    normaliser=None):
    """Per-sample gradients of every named layer for an ``"mlp"`` or seq2seq ``model``/``batch``.

    ``normaliser``: the batch size (MLP) or token count (seq2seq) the loss averages over;
    defaults to this batch's.
    """
    names = layer_param_names(model, layer_names)
    if kind == "mlp":
        size = _batch_size(batch) if normaliser is None else normaliser
        return per_sample_grads(model, batch, mlp_contribution(size, loss_scale), names,
                                multiplier=multiplier, vectorize=True)
    tokens = n_label_tokens(batch) if normaliser is None else normaliser
    return per_sample_grads(model, with_decoder_inputs(model, batch), seq2seq_contribution(tokens, loss_scale),
                            names, multiplier=multiplier)
