#!/usr/bin/env bash
# The GPU checks of one session, as one command (about 6-8 minutes on an H100/H200):
#   bash benchmarks/gpu_check.sh            # results under $OUT (device tool) or docs/step_time/gpu
# 1. tests/test_cuda.py: GPU steps equal CPU steps, backward adds no host sync (but the batched first
#    epoch's one read), bf16 statistics in float32, the first epoch batched by default;
# 2. step times at the size (d_model 512, 6+6 layers), batch 64 and 128, fp32 and bf16 autocast:
#    FNGD's first epoch and shared phase, NGD, K-FAC, Muon and AdamW, then gpu_step_time.json in the
#    records of docs/results/gpu_step_time.json (copy it there).
# Assumes torch with CUDA and the other dependencies are installed (no download is attempted).
set -uo pipefail
out="${OUT:-docs/step_time/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
status=0
timeout 240 "$py" -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$out/test_cuda.log" || status=1
# The GPU issue's grid: batch 64 and 128, fp32 and bf16 autocast, FNGD's two phases (also grafted onto AdamW's
# step length), NGD, K-FAC, Muon and AdamW,
# each file one run (ratios to the AdamW of the same run). About 1.5 minutes per file on an H100.
methods=adamw,fngd_first,fngd_shared,fngd_first_graft,fngd_shared_graft,ngd,kfac,muon
for batch in 64 128; do
    for dtype in float32 bf16; do
        timeout 150 "$py" benchmarks/step_time.py --preset paper --device cuda --dtype "$dtype" --batch-size "$batch" \
            --steps 20 --warmup 5 --methods "$methods" --out "$out/step_time_gpu_${dtype}_b${batch}.json" \
            2>&1 | tee "$out/step_time_${dtype}_b${batch}.log" || status=1
    done
done
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
"$py" benchmarks/gpu_results.py "$out"/step_time_gpu_*_b*.json --commit "$commit" --out "$out/gpu_step_time.json" || status=1
exit $status
