#!/usr/bin/env bash
# Everything a GPU session measures (issue 14's figures), results and logs under $OUT:
#   tests   the CUDA tests: compiled Triton kernels (per-tensor and multi-tensor, each histogram mode), no wait
#           on the device inside a multi-tensor pass (torch's sync debug mode), device statistics and ranking,
#           accelerate placement
#   bench   Phase 1 at the Llama-3.1-8B shape, bf16, 4×512 scoring tokens (Fisher 8×512), each stage in a fresh
#           process: digest (one read of every weight and gradient, plain PyTorch per-tensor top-K + moments,
#           critlib's per-tensor fused path, the multi-tensor pass alone / with statistics and global top-K /
#           with pass 2, its launches and copies to the host, its histogram modes, analyze's batching budgets),
#           plain forward+backward, onepass, onepass_lowmem, twopass (pass 2), fisher and fisher_passes (its
#           8 forward+backward passes in plain PyTorch)
#   phase1  `critlib score` end to end: weights in memory (phase1, phase1_lowmem) and from safetensors on local
#           disk (phase1_disk, default settings; the preset is saved to $DISK_DIR once, not timed)
#   report  `critlib run` of all six phases with params/llama31_8b.yaml's settings: the real model when it is in
#           the Hugging Face cache, else the synthetic 8B shape (REPORT_SETS); each phase's time (report.log),
#           run.json, every manifest (peak memory) and the devices named in them under $OUT/report/
# PARTS picks them (default: all, ≈ 20 min). A device command runs at most 10 min and a session has 15 min in
# all, so split it: PARTS="tests bench" (≈ 7 min), then PARTS=phase1 (≈ 4 min); PARTS=report in its own session.
# Uses the machine's own python3 (torch, transformers, triton, accelerate) with this checkout on PYTHONPATH.
# A dry run on a CPU: PY=.venv/bin/python MODEL=tiny-llama BENCH_ARGS="--seq-len 16 --kernel-on-cpu" PARTS=bench
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_session}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
MODEL=${MODEL:-llama-3.1-8b}
PARTS=${PARTS:-tests bench phase1 report}
DISK_DIR=${DISK_DIR:-/tmp/critlib_bench_models}
{ date -u; echo "parts: $PARTS; commit $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, triton, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'accelerate', accelerate.__version__)"
  df -h "$(dirname "$DISK_DIR")" | tail -1
} >> "$OUT/env.txt" 2>&1
has() { [[ " $PARTS " == *" $1 "* ]]; }
common=(--model "$MODEL" --dtype bf16 --batch 4 --seq-len 512 --fisher-batch 8)

if has tests; then
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1
  echo "test_cuda rc=$? $(date -u)" >> "$OUT/env.txt"
fi

if has bench; then
  # BENCH_ARGS (e.g. "--seq-len 32 --warmup 0 --repeats 1") overrides, for a dry run
  timeout ${DIGEST_TIMEOUT:-200} $PY bench/bench_phase1.py "${common[@]}" --timeout 190 --warmup 1 --repeats 3 \
      --stages digest ${BENCH_ARGS:-} --out "$OUT/${MODEL}_bf16_gpu_digest.json" > "$OUT/bench_digest.log" 2>&1
  echo "digest rc=$? $(date -u)" >> "$OUT/env.txt"
  timeout ${BENCH_TIMEOUT:-330} $PY bench/bench_phase1.py "${common[@]}" --timeout 100 --warmup 1 --repeats 3 \
      --stages ${STAGES:-plain,onepass,onepass_lowmem,twopass,fisher,fisher_passes} ${BENCH_ARGS:-} \
      --out "$OUT/${MODEL}_bf16_gpu.json" > "$OUT/bench.log" 2>&1
  echo "bench rc=$? $(date -u)" >> "$OUT/env.txt"
fi

if has phase1; then
  drop=$(command -v nvidia-smi > /dev/null && echo --drop-page-cache)  # the lent machine only: a cold read
  timeout ${PHASE1_TIMEOUT:-250} $PY bench/bench_phase1.py "${common[@]}" --timeout 120 --warmup 0 --repeats 1 \
      --stages ${PHASE1_STAGES:-phase1_disk,phase1,phase1_lowmem} --disk-dir "$DISK_DIR" $drop \
      ${BENCH_ARGS:-} --out "$OUT/${MODEL}_bf16_gpu_phase1.json" > "$OUT/bench_phase1.log" 2>&1
  echo "phase1 rc=$? $(date -u)" >> "$OUT/env.txt"
fi

if has report; then
  RUN_DIR=${RUN_DIR:-/tmp/critlib_report_8b}
  if [ -d "${HF_HOME:-$HOME/.cache/huggingface}/hub/models--meta-llama--Llama-3.1-8B" ]; then
    sets=(${REPORT_SETS:-})
  else  # the study's settings on synthetic weights of the same shape (random token ids: no tokenizer)
    sets=(${REPORT_SETS:---set model=$MODEL --set data=random})
  fi
  echo "report: critlib run -p params/llama31_8b.yaml ${sets[*]} -o $RUN_DIR" >> "$OUT/env.txt"
  timeout ${REPORT_TIMEOUT:-570} $PY -m critlib.cli run -p params/llama31_8b.yaml "${sets[@]}" -o "$RUN_DIR" \
      > "$OUT/report.log" 2>&1
  echo "report rc=$? $(date -u)" >> "$OUT/env.txt"
  mkdir -p "$OUT/report"  # run.json and manifests (each phase's time, peak memory, device); not the pages
  for d in "$RUN_DIR" "$RUN_DIR.failed"; do
    [ -d "$d" ] && (cd "$d" && find . -name '*.json' -size -2M -exec cp --parents {} "$OUT/report/" \;)
  done
  grep -rhoE '"(device|peak_rss_bytes|cuda_peak_allocated_bytes)": *[^,}]*' "$OUT/report" | sort | uniq -c \
      > "$OUT/report/devices_and_peaks.txt" 2>/dev/null
fi
echo "done $(date -u)" >> "$OUT/env.txt"
