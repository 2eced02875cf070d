"""Tiny models, batches and probes shared by the optimizer tests (no downloads: everything from configs).

The one place a test model is built: ``tiny_bart`` (every tiny BART of the suite, its shape given by
arguments), ``make_mlp``, ``NoLinear`` (nothing for a layer-wise method to manage), the ``CopyTask``
data set and ``stock_seq2seq_args``. ``conftest.py`` hands them to tests as fixtures; a test module or
a helper script (``dist_train.py``, ``reference.py``) imports them from here.
"""

from pathlib import Path

import torch
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration


def make_mlp(bias=True, seed=0, dtype=torch.float32):
    """Linear-Tanh-LayerNorm-Linear: two managed layers and one AdamW LayerNorm."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3, bias=bias)).to(dtype)


def mlp_batch(seed, batch=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 6, generator=g).to(dtype), torch.randint(0, 3, (batch,), generator=g)


def train_steps(model, opt, seeds, batch=5):
    """One optimizer step per seed, each on its own batch in the model's dtype."""
    for seed in seeds:
        x, y = mlp_batch(seed, batch, dtype=next(model.parameters()).dtype)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def tiny_bart(
    seed=0,
    vocab_size=40,
    d_model=16,
    ffn_dim=32,
    max_position_embeddings=32,
    *,
    encoder_layers=1,
    decoder_layers=1,
    attention_heads=2,
    dtype=None,
    **config,
):
    """A dropout-free BART, one layer per side unless told (its lm_head is tied to the embedding).

    Special tokens: bos 0, pad 1, eos 2 (also the decoder start); ids 3 and up are ordinary tokens.
    ``config`` overrides any other ``BartConfig`` field; ``dtype`` casts the model (default: as built).
    Seeded with ``seed`` just before it is built, so equal arguments give bit-identical models."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size, d_model=d_model, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=attention_heads, decoder_attention_heads=attention_heads, encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim, max_position_embeddings=max_position_embeddings, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2,
    )
    settings.update(config)
    model = BartForConditionalGeneration(BartConfig(**settings))
    return model if dtype is None else model.to(dtype)


class NoLinear(nn.Module):
    """Embedding, LayerNorm and a bare 2-D parameter as head: no ``nn.Linear``, so nothing for FNGD and its
    peers to manage (every parameter goes to their AdamW part)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(12, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Parameter(torch.randn(3, 6) * 0.3)

    def forward(self, ids):
        return self.norm(self.embed(ids)).mean(1) @ self.head.T


def no_linear_batch(seed, batch=4, length=5):
    """Token ids and class labels for ``NoLinear``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 12, (batch, length), generator=g), torch.randint(0, 3, (batch,), generator=g)


def train_pairs_on_no_linear(pairs, steps):
    """``steps`` steps of every ``(model, optimizer)`` in ``pairs`` on the same ``no_linear_batch`` batches."""
    for seed in range(steps):
        ids, y = no_linear_batch(seed)
        for model, opt in pairs:
            nn.functional.cross_entropy(model(ids), y).backward()
            opt.step()
            opt.zero_grad()


class CopyTask(torch.utils.data.Dataset):
    """Fixed-length copy task for a seq2seq model: labels are the source ids (ordinary tokens, no padding, so
    the default collator stacks it)."""

    def __init__(self, n, length=6, vocab_size=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(3, vocab_size, (n, length), generator=g)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        x = self.rows[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    def batch(self, start=0, stop=None):
        """Rows ``start:stop`` as one batch (what the default collator would make of them)."""
        x = self.rows[start:stop]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    def batches(self, batch_size):
        """The data set cut into consecutive batches, in order (a plain loop's fixed batches)."""
        return [self.batch(start, start + batch_size) for start in range(0, len(self), batch_size)]


def stock_seq2seq_args(output_dir, **overrides):
    """Stock ``Seq2SeqTrainingArguments`` (its ``max_grad_norm=1.0``, linear decay, ...) with only what a test
    run needs changed: CPU, no report, no progress bar, no checkpoints, a loss logged every step, seed 0."""
    from transformers import Seq2SeqTrainingArguments

    settings = dict(output_dir=str(Path(output_dir)), report_to="none", use_cpu=True, disable_tqdm=True,
                    save_strategy="no", logging_steps=1, seed=0)
    settings.update(overrides)
    return Seq2SeqTrainingArguments(**settings)


def spy_batches(opt):
    """The number of layers of every batched call of ``opt`` (``batch_layers``), so a test can tell that
    batching happened and how."""
    calls = []
    original = opt._batched_layer_gradients

    def spy(entries, *args):
        calls.append(len(entries))
        return original(entries, *args)

    opt._batched_layer_gradients = spy
    return calls
