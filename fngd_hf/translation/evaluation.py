"""Translation metrics and the shuffled-source sanity check.

BLEU and chrF come from sacreBLEU directly (no ``evaluate`` download step): detokenized
hypotheses against the raw references, so the numbers are comparable with published ones.
:class:`ShuffledSourceCheck` runs the shuffled-source check after every evaluation of a Trainer.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import sacrebleu
import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    """Corpus metrics need one hypothesis per reference."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise ValueError("hypotheses and references must be lists of strings")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise ValueError("no sentences to score")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus BLEU (13a tokenization, 0..100)."""
    check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus chrF (character 6-grams, beta 2, 0..100)."""
    check_pairs(hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def score_translations(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU and chrF together, keyed the way Trainer logs metrics."""
    return {"bleu": corpus_bleu(hypotheses, references), "chrf": corpus_chrf(hypotheses, references)}


def metric_signatures() -> dict[str, str]:
    """sacreBLEU signatures, so a report says exactly how the scores were computed."""
    signatures = {}
    for name, metric in (("bleu", sacrebleu.metrics.BLEU()), ("chrf", sacrebleu.metrics.CHRF())):
        metric.corpus_score(["a"], [["a"]])  # the signature records nrefs, known only after scoring
        signatures[name] = str(metric.get_signature())
    return signatures


def decode_ids(tokenizer, ids, label_pad_id: int = -100) -> list[str]:
    """Decode generated ids or labels; -100 (ignored label positions) becomes pad first."""
    ids = np.asarray(ids)
    ids = np.where(ids == label_pad_id, tokenizer.pad_token_id, ids)
    # Generation may pad with values outside the vocabulary on some paths; clamp to pad as well.
    ids = np.where((ids < 0) | (ids >= len(tokenizer)), tokenizer.pad_token_id, ids)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def make_compute_metrics(tokenizer, references: Sequence[str] | None = None) -> Callable:
    """``compute_metrics`` for Seq2SeqTrainer with ``predict_with_generate=True``.

    With ``references`` (raw target sentences in dataset order) scores against them; otherwise
    against the decoded labels, which equal the raw text unless ``max_target_length`` truncated them.
    """

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        hypotheses = decode_ids(tokenizer, predictions)
        if references is not None and len(references) == len(hypotheses):
            targets = list(references)
        else:
            targets = decode_ids(tokenizer, labels)
        lengths = np.count_nonzero(np.asarray(predictions) != tokenizer.pad_token_id, axis=-1)
        return {**score_translations(hypotheses, targets), "gen_len": float(np.mean(lengths))}

    return compute_metrics


# --- shuffled-source check -------------------------------------------------------------------
# A model that ignores its source (collapsed into a target-side language model) has the same
# loss when each target is paired with another sentence's source. The gap between the two
# losses measures how much the model actually uses the source.


def derangement(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of range(n) with no fixed point (every row gets another source)."""
    if n < 2:
        raise ValueError(f"need at least 2 examples to shuffle sources, got {n}")
    perm = torch.randperm(n, generator=generator)
    # Rotating a random order by one gives a cycle through all n, hence no fixed point.
    result = torch.empty_like(perm)
    result[perm] = perm.roll(1)
    return result


def shuffle_sources(batch: dict, permutation: torch.Tensor) -> dict:
    """Copy of ``batch`` with source-side tensors permuted; labels/decoder inputs stay in place."""
    shuffled = dict(batch)
    for key in ("input_ids", "attention_mask"):
        if key in batch:
            shuffled[key] = batch[key][permutation]
    return shuffled


def source_gap_flag(real_loss: float, shuffled_loss: float, min_gap: float = 0.05) -> dict[str, float | bool]:
    """Gap = shuffled - real loss (nats/token); ``collapsed`` when it is below ``min_gap``."""
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    if not (math.isfinite(real_loss) and math.isfinite(shuffled_loss)):
        raise ValueError(f"losses must be finite, got real={real_loss}, shuffled={shuffled_loss}")
    gap = shuffled_loss - real_loss
    return {"loss": real_loss, "shuffled_source_loss": shuffled_loss, "source_gap": gap, "source_collapsed": gap < min_gap}


def token_weighted_loss(model, batch: dict) -> tuple[float, int]:
    """Summed token loss and token count of a batch (model loss is a mean over label tokens)."""
    n_tokens = int((batch["labels"] != -100).sum())
    return float(model(**batch).loss) * n_tokens, n_tokens


@torch.no_grad()
def shuffled_source_check(
    model, batches: Iterable[dict], min_gap: float = 0.05, seed: int = 0, max_batches: int | None = None
) -> dict[str, float | bool]:
    """Validation loss with real sources next to sources permuted across each batch.

    ``batches`` are collated seq2seq batches (input_ids, attention_mask, labels); batches of one
    example are skipped since they cannot be shuffled.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    real_sum = shuffled_sum = 0.0
    total = 0
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            if batch["input_ids"].shape[0] < 2:
                continue
            permutation = derangement(batch["input_ids"].shape[0], generator).to(device)
            real, n_tokens = token_weighted_loss(model, batch)
            shuffled, _ = token_weighted_loss(model, shuffle_sources(batch, permutation))
            real_sum, shuffled_sum, total = real_sum + real, shuffled_sum + shuffled, total + n_tokens
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("no batch with at least 2 examples to run the shuffled-source check on")
    return source_gap_flag(real_sum / total, shuffled_sum / total, min_gap)


class ShuffledSourceCheck(TrainerCallback):
    """Run :func:`shuffled_source_check` after every evaluation of a (Seq2Seq)Trainer.

    Usage::

        trainer = Seq2SeqTrainer(..., callbacks=[ShuffledSourceCheck(min_gap=0.05)])
        metrics = trainer.evaluate()  # also eval_shuffled_source_loss, eval_source_gap, eval_source_collapsed

    ``on_evaluate`` takes the model and the evaluation's own dataloader from the Trainer (the callback
    keyword arguments ``model`` and ``eval_dataloader``), computes the loss with each target paired with
    another sentence's source (``seed``: the Trainer's ``args.seed`` unless given), and adds
    ``{prefix}_shuffled_source_loss``, ``{prefix}_source_gap`` and ``{prefix}_source_collapsed`` (1.0 when
    the gap is below ``min_gap``) to the metrics ``evaluate()`` returns, and as one record to
    ``state.log_history`` (``trainer_state.json``). A collapsed model gets a warning. A dataloader it
    cannot check (no batch of 2+ examples, not a seq2seq batch) gives a ``RuntimeWarning`` and no keys.

    A callback cannot call ``Trainer.log``: reporting integrations (TensorBoard, W&B) do not see the
    three values; ``evaluate()``'s metrics and ``trainer_state.json`` hold them.
    """

    def __init__(self, min_gap: float = 0.05, seed: int | None = None, max_batches: int | None = None):
        if not min_gap >= 0:
            raise ValueError(f"min_gap must be >= 0, got {min_gap}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        self.min_gap = min_gap
        self.seed = seed
        self.max_batches = max_batches

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):
        if model is None or eval_dataloader is None:
            warnings.warn("shuffled-source check skipped: the Trainer passed no model or eval dataloader",
                          RuntimeWarning, stacklevel=2)
            return
        seed = args.seed if self.seed is None else self.seed
        try:
            check = shuffled_source_check(model, eval_dataloader, min_gap=self.min_gap, seed=seed,
                                          max_batches=self.max_batches)
        except (ValueError, KeyError, TypeError) as error:  # e.g. no batch of 2+, or not a seq2seq batch
            warnings.warn(f"shuffled-source check skipped: {error}", RuntimeWarning, stacklevel=2)
            return
        prefix = metric_prefix(metrics or {})
        extra = {
            f"{prefix}_shuffled_source_loss": check["shuffled_source_loss"],
            f"{prefix}_source_gap": check["source_gap"],
            f"{prefix}_source_collapsed": float(check["source_collapsed"]),
        }
        if check["source_collapsed"]:
            logger.warning(
                "shuffled-source loss gap %.4f < %.4f: the model ignores its source (a target-side language model)",
                check["source_gap"], self.min_gap,
            )
        if metrics is not None:
            metrics.update(extra)  # the dict evaluate() returns
        # A record of its own, as Trainer.log writes one (a callback cannot call it).
        epoch = {} if state.epoch is None else {"epoch": state.epoch}
        state.log_history.append({**extra, **epoch, "step": state.global_step})


def metric_prefix(metrics: dict) -> str:
    """``eval`` (or ``eval_<name>`` for one of several eval datasets, or the ``metric_key_prefix`` given) from
    ``{prefix}_runtime``, the key ``Trainer.evaluate`` always writes (the shortest ``*_runtime`` key: a metric of
    ``compute_metrics`` named ``x_runtime`` arrives as ``{prefix}_x_runtime``)."""
    runtimes = [key[: -len("_runtime")] for key in metrics if key.endswith("_runtime")]
    return min(runtimes, key=len) if runtimes else "eval"
