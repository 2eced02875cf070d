"""Encoder-decoder Transformers built from a config (no download), Marian architecture.

Marian is the "Attention is all you need" Transformer: sinusoidal positions, post-norm,
scaled embeddings, shared source/target embeddings tied to the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from transformers import GenerationConfig, MarianConfig, MarianMTModel


@dataclass(frozen=True)
class TransformerShape:
    """The size fields a preset sets; any can be overridden."""

    d_model: int
    ffn_dim: int
    attention_heads: int
    encoder_layers: int
    decoder_layers: int
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_position_embeddings: int = 256


PRESETS = {
    # Transformer-base of Vaswani et al. (2017).
    "paper": TransformerShape(d_model=512, ffn_dim=2048, attention_heads=8, encoder_layers=6, decoder_layers=6),
    # Trains on a CPU in reasonable time.
    "small": TransformerShape(d_model=256, ffn_dim=1024, attention_heads=4, encoder_layers=3, decoder_layers=3),
    # The README's CPU convergence setting (benchmarks/convergence.py --setting cpu: "small" with these
    # sizes), named so that the recipe's defaults reproduce its documented results.
    "cpu": TransformerShape(d_model=128, ffn_dim=512, attention_heads=4, encoder_layers=2, decoder_layers=2),
    # Unit and end-to-end tests only.
    "tiny": TransformerShape(
        d_model=32, ffn_dim=64, attention_heads=2, encoder_layers=2, decoder_layers=2, max_position_embeddings=128
    ),
}


def resolve_shape(preset: str = "small", **overrides) -> TransformerShape:
    """Preset shape with the non-None overrides applied, after checking they make sense."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}, choose from {sorted(PRESETS)}")
    known = {f.name for f in fields(TransformerShape)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}, known: {sorted(known)}")
    shape = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    check_shape(shape)
    return shape


def check_shape(shape: TransformerShape) -> None:
    """Reject sizes the attention layers cannot use."""
    for name in ("d_model", "ffn_dim", "attention_heads", "encoder_layers", "decoder_layers", "max_position_embeddings"):
        if getattr(shape, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(shape, name)}")
    if shape.d_model % shape.attention_heads:
        raise ValueError(f"d_model {shape.d_model} is not divisible by attention_heads {shape.attention_heads}")
    for name in ("dropout", "attention_dropout", "activation_dropout"):
        if not 0.0 <= getattr(shape, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(shape, name)}")


def special_token_ids(tokenizer) -> dict[str, int]:
    """pad / eos / decoder-start ids; decoding starts from <s> when there is one, else from pad (Marian)."""
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("tokenizer needs pad and eos tokens")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    return {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "decoder_start_token_id": start}


def build_config(shape: TransformerShape, vocab_size: int, token_ids: dict[str, int]) -> MarianConfig:
    """A MarianConfig with one shared vocabulary for source and target."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return MarianConfig(
        vocab_size=vocab_size,
        decoder_vocab_size=vocab_size,
        d_model=shape.d_model,
        encoder_ffn_dim=shape.ffn_dim,
        decoder_ffn_dim=shape.ffn_dim,
        encoder_attention_heads=shape.attention_heads,
        decoder_attention_heads=shape.attention_heads,
        encoder_layers=shape.encoder_layers,
        decoder_layers=shape.decoder_layers,
        dropout=shape.dropout,
        attention_dropout=shape.attention_dropout,
        activation_dropout=shape.activation_dropout,
        max_position_embeddings=shape.max_position_embeddings,
        activation_function="relu",  # as in the original Transformer
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        forced_eos_token_id=token_ids["eos_token_id"],
        bos_token_id=token_ids["decoder_start_token_id"],
        **token_ids,
    )


def build_generation_config(config: MarianConfig, max_length: int = 128, num_beams: int = 4) -> GenerationConfig:
    """Beam search defaults used by ``generate`` and ``pipeline('translation')``."""
    if max_length <= 1 or num_beams <= 0:
        raise ValueError(f"need max_length > 1 and num_beams > 0, got {max_length}, {num_beams}")
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        forced_eos_token_id=config.eos_token_id,  # a hypothesis cut at max_length still ends with </s>
        # pad is filler and <s> only starts decoding: never generate them (suppress_tokens is much
        # cheaper than bad_words_ids on CPU).
        suppress_tokens=sorted({config.pad_token_id, config.decoder_start_token_id}),
        max_length=min(max_length, config.max_position_embeddings),
        num_beams=num_beams,
    )


def build_model(
    tokenizer,
    preset: str = "small",
    max_length: int = 128,
    num_beams: int = 4,
    seed: int | None = None,
    **overrides,
) -> MarianMTModel:
    """A randomly initialised MarianMTModel sized by ``preset`` (+ overrides) for ``tokenizer``."""
    import torch

    shape = resolve_shape(preset, **overrides)
    config = build_config(shape, len(tokenizer), special_token_ids(tokenizer))
    if seed is not None:
        torch.manual_seed(seed)
    model = MarianMTModel(config)
    model.generation_config = build_generation_config(config, max_length, num_beams)
    return model
