"""Two real gloo ranks on CPU (accelerate launch): parameters stay identical, loss falls, resume is exact."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("dist_train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_ddp_training(tmp_path):
    pytest.importorskip("accelerate")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(SCRIPT), str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(ranks):
        assert record["world_size"] == 2 and record["rank"] == rank and record["backend"] == "gloo"
        assert record["steps_per_epoch"] == 4 and record["global_step"] == 12  # 16 samples per rank, batch 2, GA 2
    # DDP averages the ranks' natural gradients: every rank applies the same update.
    assert ranks[0]["params"] == ranks[1]["params"]
    # Each rank computed beta from its own micro-batches: the banks differ.
    assert ranks[0]["bank_checksum"] != ranks[1]["bank_checksum"]
    losses = ranks[0]["losses"]
    assert losses[-1] < losses[0] - 0.1, losses
    assert ranks[0]["fresh_fraction"][-1] == 0.0  # the third epoch reuses the coefficients
    # Resuming from a checkpoint in the shared phase restores each rank's own bank: exactly the same run.
    assert ranks[0]["resumed_params"] == ranks[0]["params"] == ranks[1]["resumed_params"]
    # Sharing by sample: both ranks hold all 32 samples' coefficients (gathered), the same on both.
    assert ranks[0]["by_sample_params"] == ranks[1]["by_sample_params"]
    assert ranks[0]["by_sample_rows"] == ranks[1]["by_sample_rows"] == 32
    assert ranks[0]["by_sample_bank_checksum"] == ranks[1]["by_sample_bank_checksum"]
    assert ranks[0]["by_sample_fresh_fraction"][-1] == 0.0  # samples seen on the other rank are shared too
