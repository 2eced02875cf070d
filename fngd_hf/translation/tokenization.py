"""A joint (shared source/target) BPE tokenizer trained on the training split.

Byte-level BPE: every string can be encoded without <unk>, and the ByteLevel decoder gives the
text back exactly, so generated ids decode to detokenized text that sacreBLEU can score.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
SPECIAL_TOKENS = [PAD, EOS, UNK, BOS]  # ids 0..3 in this order


def iter_texts(dataset, columns: Iterable[str], batch_size: int = 1000) -> Iterator[list[str]]:
    """Yield batches of sentences from every given column (both languages -> joint vocabulary)."""
    for column in columns:
        if column not in dataset.column_names:
            raise ValueError(f"column {column!r} not in dataset (columns {dataset.column_names})")
        for start in range(0, len(dataset), batch_size):
            yield dataset[start : start + batch_size][column]


def build_bpe_tokenizer(vocab_size: int, min_frequency: int = 2) -> tuple[Tokenizer, trainers.BpeTrainer]:
    """An untrained byte-level BPE tokenizer and its trainer."""
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + 256} (specials + byte alphabet), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space: a word costs the same tokens at the start of a sentence as inside it.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    # Fuse + Strip removes the prefix space again, so decode(encode(s)) == s.
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def add_eos_postprocessor(tokenizer: Tokenizer) -> None:
    """Append </s> to every sequence (sources and targets), as Marian does."""
    eos_id = tokenizer.token_to_id(EOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos_id)]
    )


def wrap_fast(tokenizer: Tokenizer, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` so it saves/loads with transformers' Auto classes."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # the decoder already restores the exact text
    )


def train_tokenizer(
    dataset,
    languages: Iterable[str],
    vocab_size: int = 8000,
    min_frequency: int = 2,
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """Train a joint BPE tokenizer on ``dataset`` (a training split), one column per language."""
    languages = list(languages)
    if not languages:
        raise ValueError("need at least one language column to train on")
    tokenizer, trainer = build_bpe_tokenizer(vocab_size, min_frequency)
    tokenizer.train_from_iterator(iter_texts(dataset, languages), trainer=trainer, length=len(dataset) * len(languages))
    add_eos_postprocessor(tokenizer)
    return wrap_fast(tokenizer, model_max_length)


def load_tokenizer(name_or_path: str, **kwargs):
    """Load an existing tokenizer (local folder, or Hub name when online)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path} needs a pad and an eos token for seq2seq training")
    return tokenizer
