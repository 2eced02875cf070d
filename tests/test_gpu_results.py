"""benchmarks/gpu_results.py: step_time.py JSONs as the GPU issue's records (ratios within one run)."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_results  # noqa: E402


def test_records_of_a_recorded_h100_run():
    run = json.loads((REPO / "docs" / "step_time" / "step_time_gpu_bf16.json").read_text())
    rows = {(r["method"], r["phase"]): r for r in gpu_results.records(run, "abc123")}
    assert all(list(r) == list(gpu_results.RECORD_FIELDS) for r in rows.values())
    adamw, first, shared = rows["adamw", "-"], rows["fngd", "first"], rows["fngd", "shared"]
    assert adamw["ratio_to_adamw"] == 1.0 and adamw["peak_memory_ratio_to_adamw"] == 1.0
    assert adamw["device"].startswith("NVIDIA H100") and adamw["dtype"] == "bf16" and adamw["batch"] == 64
    # The README's H100 figures: first epoch 3.30x, shared phase 1.51x AdamW (bf16).
    assert first["ratio_to_adamw"] == pytest.approx(3.30, abs=0.01)
    assert shared["ratio_to_adamw"] == pytest.approx(1.51, abs=0.01)
    assert first["commit"] == "abc123" and rows["ngd", "-"]["step_ms"] > adamw["step_ms"]


def test_a_run_without_adamw_or_memory_gives_null_ratios():
    run = {"info": {"device": "cpu", "batch_size": 8}, "results": {"muon": {"median_ms": 5.0}}}
    (row,) = gpu_results.records(run, "c")
    assert row["method"] == "muon" and row["phase"] == "-" and row["dtype"] == "float32"
    assert row["ratio_to_adamw"] is None and row["peak_memory_ratio_to_adamw"] is None


@pytest.mark.parametrize("name, expected", [
    ("fngd_first", ("fngd", "first")), ("fngd_shared", ("fngd", "shared")),
    ("fngd_shared_graft", ("fngd_graft", "shared")), ("fngd_first_graft", ("fngd_graft", "first")),
    ("ngd", ("ngd", "-")), ("fngd_firstly", ("fngd_firstly", "-")),
])
def test_method_and_phase_names(name, expected):
    assert gpu_results.method_and_phase(name) == expected
