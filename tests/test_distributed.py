"""Two real gloo ranks on CPU (accelerate launch): parameters stay identical, loss falls, resume is exact."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    # Muon's step length (the default): every rank orthogonalises the same averaged direction.
    assert ranks[0]["muon_params"] == ranks[1]["muon_params"] != ranks[0]["params"]
    assert ranks[0]["muon_losses"][-1] < ranks[0]["muon_losses"][0], ranks[0]["muon_losses"]
    # Grafted onto AdamW's length: the plain gradients are averaged over ranks too, so the ranks stay equal.
    assert ranks[0]["graft_params"] == ranks[1]["graft_params"] != ranks[0]["params"]
    assert ranks[0]["graft_losses"][-1] < ranks[0]["graft_losses"][0], ranks[0]["graft_losses"]
    # Sharing by sample: both ranks hold all 32 samples' coefficients (gathered), the same on both.
    assert ranks[0]["by_sample_params"] == ranks[1]["by_sample_params"]
    assert ranks[0]["by_sample_rows"] == ranks[1]["by_sample_rows"] == 32
    assert ranks[0]["by_sample_bank_checksum"] == ranks[1]["by_sample_bank_checksum"]
    assert ranks[0]["by_sample_fresh_fraction"][-1] == 0.0  # samples seen on the other rank are shared too
    # A plain accelerate loop: accelerator.save_state() writes the optimizer from the main rank only. With
    # attach_accelerator each rank also writes and restores its own bank, and resuming is exact...
    assert ranks[0]["accelerate_rank_files"] == ["fngd_coefficients_rank0.pt", "fngd_coefficients_rank1.pt"]
    for record in ranks:
        assert record["accelerate_resumed_params"] == record["accelerate_params"] == ranks[0]["accelerate_params"]
        assert not [w for w in record["accelerate_resumed_warnings"] if "rank" in w]
    # ... without it rank 1 continues with rank 0's bank: a different run, and rank 1 says so.
    assert ranks[0]["accelerate_unkept_params"] == ranks[1]["accelerate_unkept_params"] != ranks[0]["accelerate_params"]
    assert not [w for w in ranks[0]["accelerate_unkept_warnings"] if "loaded the optimizer state saved by" in w]
    assert [w for w in ranks[1]["accelerate_unkept_warnings"] if "loaded the optimizer state saved by rank 0" in w]


SAMPLE_WORKER = r"""
import sys, torch, torch.distributed as dist
from torch import nn
from fngd_hf import FNGD
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
opt = FNGD(model, lr=1e-2, share_by="sample", stat_dtype=torch.float64)
# Step 2: rank 0 sees only samples it has seen (nothing new), rank 1 sees new ones: both must
# still meet in the gather. Step 3: rank 1 gets samples only rank 0 had in step 1.
plan = {0: [[0, 1], [1, 0], [4, 2]], 1: [[2, 3], [4, 5], [0, 1]]}[rank]
fresh = []
for ids in plan:
    g = torch.Generator().manual_seed(100 * rank + ids[0])
    x, y = torch.randn(2, 6, generator=g).double(), torch.randint(0, 3, (2,), generator=g)
    opt.set_sample_ids(ids)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    fresh.append(opt.diagnostics()["fngd/fresh_fraction"])
state = opt.state[model[0].weight]
torch.save({"ids": opt._sample_index.to_tensor(), "bank": state["coef_sample"][: len(opt._sample_index)],
            "fresh": torch.tensor(fresh)}, out)
dist.destroy_process_group()
"""


def test_sharing_by_sample_gathers_every_rank_even_without_new_samples(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SAMPLE_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1])}
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), port, str(tmp_path / f"rank{r}.pt")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]  # a missed collective would hang here
    assert all(p.returncode == 0 for p in procs), outputs
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["ids"].tolist() == ranks[1]["ids"].tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(ranks[0]["bank"], ranks[1]["bank"])
    assert ranks[0]["fresh"].tolist() == [1.0, 0.0, 0.0]  # [4, 2]: both seen, on rank 1
    assert ranks[1]["fresh"].tolist() == [1.0, 1.0, 0.0]  # [0, 1]: seen on rank 0 only
