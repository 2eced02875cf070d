"""Tiny models, batches and probes shared by the optimizer tests (no downloads: everything from configs)."""

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


def tiny_bart(seed=0, vocab_size=40, d_model=16, ffn_dim=32, max_position_embeddings=32):
    """A dropout-free BART with one layer per side (its lm_head is tied to the embedding)."""
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=vocab_size, d_model=d_model, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim,
        max_position_embeddings=max_position_embeddings, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    return BartForConditionalGeneration(config)


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
