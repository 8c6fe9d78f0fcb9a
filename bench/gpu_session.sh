#!/usr/bin/env bash
# Everything a GPU session checks, in one call (results and logs under $OUT):
#   the CUDA tests (compiled Triton kernel, device-side statistics and ranking, accelerate placement), then
#   the Phase 1 benchmark at the Llama-3.1-8B shape in bf16 with 4×512 scoring tokens (Fisher: 8×512).
# Uses the machine's own python3 (torch, transformers, triton, accelerate) with this checkout on PYTHONPATH.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
MODEL=${MODEL:-llama-3.1-8b}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, triton, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'accelerate', accelerate.__version__)"
} > "$OUT/env.txt" 2>&1
timeout 110 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1
echo "test_cuda rc=$?" >> "$OUT/env.txt"
common=(--model "$MODEL" --dtype bf16 --batch 4 --seq-len 512 --fisher-batch 8 --timeout 100)
# BENCH_ARGS (e.g. "--seq-len 32 --warmup 0 --repeats 1") overrides, for a dry run on a CPU
timeout ${BENCH_TIMEOUT:-330} $PY bench/bench_phase1.py "${common[@]}" --warmup 1 --repeats 3 \
    --stages ${STAGES:-digest,plain,onepass,onepass_nokernel,onepass_lowmem,twopass,fisher} ${BENCH_ARGS:-} --out "$OUT/${MODEL}_bf16_gpu.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/env.txt"
timeout 130 $PY bench/bench_phase1.py "${common[@]}" --warmup 0 --repeats 1 \
    --stages ${PHASE1_STAGES:-phase1,phase1_lowmem} --timeout 60 ${BENCH_ARGS:-} --out "$OUT/${MODEL}_bf16_gpu_phase1.json" > "$OUT/bench_phase1.log" 2>&1
echo "phase1 rc=$? $(date -u)" >> "$OUT/env.txt"
