"""Fixtures shared by the test suite. The builders themselves live in ``tiny_models.py`` (importable by
test modules and helper scripts); here they are handed to tests by name.

    def test_something(bart_factory, copy_task, seq2seq_args):
        model = bart_factory(d_model=32)                 # tiny_models.tiny_bart(**kwargs)
        data = copy_task(16)                             # tiny_models.CopyTask(n, ...)
        args = seq2seq_args(num_train_epochs=2)          # stock Seq2SeqTrainingArguments under tmp_path
"""

import pytest
import torch

import tiny_models


@pytest.fixture
def one_thread():
    """Matrices this small gain nothing from threads, and on a loaded machine a second thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bart_factory():
    """``tiny_models.tiny_bart``: ``bart_factory(seed=0, vocab_size=40, d_model=16, ...)`` builds a tiny BART
    (call it twice with the same arguments for two bit-identical models)."""
    return tiny_models.tiny_bart


@pytest.fixture
def tiny_bart_model():
    """One tiny BART with the default shape (vocabulary 40, d_model 16, one layer per side)."""
    return tiny_models.tiny_bart()


@pytest.fixture
def mlp_factory():
    """``tiny_models.make_mlp``: Linear-Tanh-LayerNorm-Linear (two managed layers, one LayerNorm)."""
    return tiny_models.make_mlp


@pytest.fixture
def copy_task():
    """``tiny_models.CopyTask``: ``copy_task(n, length=6, vocab_size=40, seed=0)``, a fixed-length copy data set."""
    return tiny_models.CopyTask


@pytest.fixture
def seq2seq_args(tmp_path):
    """Stock ``Seq2SeqTrainingArguments`` writing under ``tmp_path``: ``seq2seq_args(**overrides)``."""

    def make(**overrides):
        return tiny_models.stock_seq2seq_args(tmp_path / "out", **overrides)

    return make


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons (mixed precision, the active dataloader): a bf16 Trainer test,
    or a training interrupted by an expected error, must not change how a later test's loop runs."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
