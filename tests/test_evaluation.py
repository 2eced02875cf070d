"""BLEU/chrF, the Seq2SeqTrainer compute_metrics, and the shuffled-source collapse check."""

import math
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from fngd_hf.translation.evaluation import (
    ShuffledSourceCheck,
    corpus_bleu,
    corpus_chrf,
    derangement,
    make_compute_metrics,
    metric_signatures,
    shuffled_source_check,
    source_gap_flag,
)
from fngd_hf.translation.tokenization import train_tokenizer

import tiny_models

REFS = ["Ein Hund läuft auf der Wiese.", "Zwei Männer spielen Fußball im Park."]


def test_identical_translations_score_100():
    assert corpus_bleu(REFS, REFS) == pytest.approx(100.0)
    assert corpus_chrf(REFS, REFS) == pytest.approx(100.0)
    assert corpus_bleu(["Katze"] * 2, REFS) < 5


def test_metric_input_errors():
    with pytest.raises(ValueError, match="1 hypotheses but 2"):
        corpus_bleu(REFS[:1], REFS)
    with pytest.raises(ValueError, match="no sentences"):
        corpus_chrf([], [])
    with pytest.raises(ValueError, match="lists of strings"):
        corpus_bleu("a", "a")


def test_signatures_name_the_settings():
    signatures = metric_signatures()
    assert "tok:13a" in signatures["bleu"] and "nc:6" in signatures["chrf"]


def test_compute_metrics_decodes_and_scores():
    train = datasets.Dataset.from_dict({"de": REFS * 5, "en": REFS * 5})
    tokenizer = train_tokenizer(train, ["de"], vocab_size=300)
    labels = tokenizer(text_target=REFS, padding=True, return_tensors="np").input_ids
    labels = np.where(labels == tokenizer.pad_token_id, -100, labels)  # what the collator produces
    predictions = np.where(labels == -100, tokenizer.pad_token_id, labels)
    metrics = make_compute_metrics(tokenizer)(EvalPrediction(predictions=predictions, label_ids=labels))
    assert metrics["bleu"] == pytest.approx(100.0) and metrics["chrf"] == pytest.approx(100.0)
    with_refs = make_compute_metrics(tokenizer, references=["Etwas ganz anderes.", "Noch etwas."])
    assert with_refs(EvalPrediction(predictions=(predictions,), label_ids=labels))["bleu"] < 10


@pytest.mark.parametrize("n", [2, 3, 5, 16])
def test_derangement_moves_every_row(n):
    generator = torch.Generator().manual_seed(n)
    for _ in range(20):
        perm = derangement(n, generator)
        assert sorted(perm.tolist()) == list(range(n))
        assert not (perm == torch.arange(n)).any()
    with pytest.raises(ValueError):
        derangement(1)


def test_gap_flag_logic():
    assert source_gap_flag(2.0, 2.01)["source_collapsed"] is True
    flag = source_gap_flag(2.0, 3.5, min_gap=0.05)
    assert flag["source_gap"] == pytest.approx(1.5) and flag["source_collapsed"] is False
    assert source_gap_flag(2.0, 1.9)["source_collapsed"] is True  # shuffling helps: certainly not using the source
    with pytest.raises(ValueError, match="min_gap"):
        source_gap_flag(1.0, 2.0, min_gap=-1)
    with pytest.raises(ValueError, match="finite"):
        source_gap_flag(math.nan, 2.0)


class SourceAware(torch.nn.Module):
    """Loss 0.1 when the first source token equals the first label, else 2.1 (uses its source)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, labels, **_):
        match = (input_ids[:, 0] == labels[:, 0]).float()
        return SimpleNamespace(loss=(0.1 + 2.0 * (1 - match)).mean() + self.weight)


class TargetOnly(SourceAware):
    """Loss that never looks at the source: a collapsed target-side language model."""

    def forward(self, input_ids, attention_mask, labels, **_):
        return SimpleNamespace(loss=labels.float().mean() * 0 + 1.7 + self.weight)


def batches(sizes):
    for size in sizes:
        ids = torch.arange(10, 10 + size).unsqueeze(1).repeat(1, 3)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_shuffled_source_check_separates_models():
    aware = SourceAware().train()
    result = shuffled_source_check(aware, batches([4, 1, 6]))
    assert result["loss"] == pytest.approx(0.1) and result["shuffled_source_loss"] == pytest.approx(2.1)
    assert result["source_collapsed"] is False
    assert aware.training  # mode restored
    collapsed = shuffled_source_check(TargetOnly(), batches([4, 6]))
    assert collapsed["source_gap"] == pytest.approx(0.0) and collapsed["source_collapsed"] is True
    with pytest.raises(ValueError, match="at least 2"):
        shuffled_source_check(aware, batches([1, 1]))


class CopyPairs(torch.utils.data.Dataset):
    """Fixed-length pairs whose target is the source: the default collator stacks them."""

    def __init__(self, n, seed=0):
        self.rows = torch.randint(3, 40, (n, 5), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "attention_mask": torch.ones_like(self.rows[i]), "labels": self.rows[i].clone()}


def test_shuffled_source_check_callback_on_a_stock_trainer(tmp_path):
    """ShuffledSourceCheck needs no FNGDTrainer: after each evaluation it adds the check to the metrics evaluate()
    returns and to log_history, under the evaluation's own prefix, with the Trainer's model, eval dataloader and seed."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                                    disable_tqdm=True, seed=3)
    model = tiny_models.tiny_bart()
    trainer = Seq2SeqTrainer(model=model, args=args, eval_dataset=CopyPairs(8), callbacks=[ShuffledSourceCheck(min_gap=0.5)])
    metrics = trainer.evaluate(metric_key_prefix="val")
    expected = shuffled_source_check(model, trainer.get_eval_dataloader(), min_gap=0.5, seed=3)
    assert metrics["val_shuffled_source_loss"] == pytest.approx(expected["shuffled_source_loss"])
    assert metrics["val_source_gap"] == pytest.approx(expected["source_gap"])
    assert metrics["val_source_collapsed"] == float(expected["source_collapsed"])
    assert expected["loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)  # the same batches as the evaluation
    record = trainer.state.log_history[-1]
    assert {k: record[k] for k in ("val_shuffled_source_loss", "val_source_gap", "val_source_collapsed")} == {
        k: metrics[k] for k in ("val_shuffled_source_loss", "val_source_gap", "val_source_collapsed")}
    # Several eval datasets: one check each, under each dataset's prefix.
    metrics = trainer.evaluate(eval_dataset={"x": CopyPairs(8), "y": CopyPairs(6, seed=1)})
    assert {"eval_x_source_gap", "eval_y_source_gap"} <= set(metrics)
    records = [r for r in trainer.state.log_history if "eval_x_source_gap" in r or "eval_y_source_gap" in r]
    assert len(records) == 2 and records[0]["eval_x_source_gap"] == metrics["eval_x_source_gap"]


def test_shuffled_source_check_callback_skips_what_it_cannot_check(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=1, report_to=[], use_cpu=True,
                                    disable_tqdm=True)
    trainer = Seq2SeqTrainer(model=tiny_models.tiny_bart(), args=args, eval_dataset=CopyPairs(3),
                             callbacks=[ShuffledSourceCheck()])
    with pytest.warns(RuntimeWarning, match="shuffled-source check skipped: no batch with at least 2"):
        metrics = trainer.evaluate()  # batches of one cannot be shuffled
    assert "eval_loss" in metrics and not [k for k in metrics if "source" in k]
    with pytest.raises(ValueError, match="min_gap"):
        ShuffledSourceCheck(min_gap=-0.1)


def test_every_declared_dependency_is_used():
    """A dependency users must install is one the code imports (``evaluate`` was declared and never
    imported: BLEU/chrF come from sacreBLEU directly, which needs no Hub download)."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    block = re.search(r"^dependencies = \[(.*?)^\]", (repo / "pyproject.toml").read_text(), flags=re.M | re.S).group(1)
    declared = re.findall(r'"([^"]+)"', block)  # (tomllib needs Python 3.11; the project supports 3.10)
    assert len(declared) >= 5
    names = {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower() for spec in declared}
    # transformers reads and writes model.safetensors through it; nothing here imports it by name.
    indirect = {"safetensors"}
    sources = "\n".join(p.read_text(encoding="utf-8") for folder in ("fngd_hf", "recipes") for p in (repo / folder).rglob("*.py"))
    imported = set(re.findall(r"^\s*(?:from|import)\s+(\w+)", sources, flags=re.M))
    assert "evaluate" not in names
    assert names - indirect <= imported, names - indirect - imported
