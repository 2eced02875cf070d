"""Step-time JSONs of ``benchmarks/step_time.py`` as the records of ``docs/results/gpu_step_time.json``.

    python benchmarks/gpu_results.py OUT/step_time_*.json --commit "$(git rev-parse --short HEAD)" \
        --out docs/results/gpu_step_time.json

One record per (file, method): ``{"device", "dtype", "batch", "method", "phase", "step_ms",
"ratio_to_adamw", "peak_memory_ratio_to_adamw", "commit"}``. ``fngd_first``/``fngd_shared`` become method
``fngd`` with phase ``first``/``shared`` (other variants keep their name); methods without phases get
``"-"``. Ratios are to the AdamW measured in the same file (the same run), and ``null`` where that run has
no AdamW or no memory figure (CPU runs report no peak memory).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RECORD_FIELDS = ("device", "dtype", "batch", "method", "phase", "step_ms", "ratio_to_adamw",
                 "peak_memory_ratio_to_adamw", "commit")


def method_and_phase(name: str) -> tuple[str, str]:
    """``fngd_first`` -> ``("fngd", "first")``; ``fngd_shared_graft`` -> ``("fngd_graft", "shared")``."""
    for phase in ("first", "shared"):
        if name == f"fngd_{phase}" or name.startswith(f"fngd_{phase}_"):
            return "fngd" + name[len(f"fngd_{phase}"):], phase
    return name, "-"


def records(run: dict, commit: str) -> list[dict]:
    """The records of one step_time.py JSON (``{"info": ..., "results": {method: {...}}}``)."""
    info, results = run["info"], run["results"]
    adamw = results.get("adamw", {})
    out = []
    for name, result in results.items():
        if "median_ms" not in result:
            continue
        method, phase = method_and_phase(name)
        peak, adamw_peak = result.get("step_peak_mb"), adamw.get("step_peak_mb")
        out.append(dict(zip(RECORD_FIELDS, (
            info.get("device", "cpu"),
            "bf16" if info.get("autocast_bf16") else "float32",
            info.get("batch_size"),
            method,
            phase,
            round(result["median_ms"], 3),
            round(result["median_ms"] / adamw["median_ms"], 4) if adamw.get("median_ms") else None,
            round(peak / adamw_peak, 4) if peak and adamw_peak else None,
            commit,
        ))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--commit", required=True, help="the commit the timings ran on")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [row for path in args.files for row in records(json.loads(path.read_text()), args.commit)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    for row in rows:
        print(" ".join(f"{key}={row[key]}" for key in RECORD_FIELDS))


if __name__ == "__main__":
    main()
