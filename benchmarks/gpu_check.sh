#!/usr/bin/env bash
# The GPU checks of one session, as one command (about 6-8 minutes on an H100/H200):
#   bash benchmarks/gpu_check.sh            # results under $OUT (device tool) or docs/step_time/gpu
# 1. tests/test_cuda.py: GPU steps equal CPU steps, backward adds no host sync (but the batched first
#    epoch's one read), bf16 statistics in float32, the first epoch batched by default;
# 2. step times at the size (d_model 512, 6+6 layers, batch 64), fp32 and bf16 autocast: the
#    first epoch as it runs by default (batched, padding dropped), batched with its padding kept, and
#    per layer; the shared phase; NGD.
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
methods=adamw,fngd_first,fngd_first_padded,fngd_first_unbatched,fngd_shared,ngd
for dtype in float32 bf16; do
    timeout 300 "$py" benchmarks/step_time.py --preset paper --device cuda --dtype "$dtype" --steps 25 --warmup 5 \
        --methods "$methods" --out "$out/step_time_gpu_$dtype.json" 2>&1 | tee "$out/step_time_$dtype.log" || status=1
done
exit $status
