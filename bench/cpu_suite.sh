#!/usr/bin/env bash
# Every CPU benchmark behind docs/results.md, in one go (about 45 minutes on an idle 2-core machine).
# Output: $OUT (default runs/bench): all.log, one JSON per run, the loss curves.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench}
T="--threads ${THREADS:-2}"
mkdir -p "$OUT"
run() { echo "== $(date +%T) $*"; "$@" || echo "== failed: $*"; }
{
run python bench/train_throughput.py $T --config mini --batch 8 32 128 --windows 5 --warmup 2 --min-window 1.5 --json "$OUT/train_mini_fp32.json"
run python bench/train_throughput.py $T --config s2 b2 --batch 8 32 --windows 3 --warmup 1 --min-window 1.5 --json "$OUT/train_large_fp32.json"
run python bench/train_throughput.py $T --config mini --batch 8 32 128 --precision bf16 --diffusers-precision fp32 --windows 5 --warmup 2 --min-window 1.5 --json "$OUT/train_mini_bf16_vs_fp32.json"
run python bench/train_throughput.py $T --config s2 b2 --batch 8 32 --precision bf16 --diffusers-precision fp32 --windows 3 --warmup 1 --min-window 1.5 --json "$OUT/train_large_bf16_vs_fp32.json"
run python bench/train_throughput.py $T --config mini s2 --batch 8 32 --precision bf16 --windows 3 --warmup 1 --min-window 1.5 --json "$OUT/train_bf16_vs_bf16.json"
run python bench/sample_pipeline.py $T --config mini --batch 8 32 --json "$OUT/pipe_fp32.json"
run python bench/sample_pipeline.py $T --config mini --batch 8 32 --precision bf16 --diffusers-precision fp32 --json "$OUT/pipe_bf16_vs_fp32.json"
run python bench/sample_pipeline.py $T --config mini --batch 8 32 --precision bf16 --json "$OUT/pipe_bf16_vs_bf16.json"
run python bench/sample_pipeline.py $T --config s2 --batch 8 --windows 3 --json "$OUT/pipe_s2_fp32.json"
run python bench/sample_pipeline.py $T --config s2 --batch 8 --windows 3 --precision bf16 --diffusers-precision fp32 --json "$OUT/pipe_s2_bf16_vs_fp32.json"
run python bench/compile_time.py $T --config mini --batch 8 --precision fp32
run python bench/compile_time.py $T --config mini --batch 8 --precision bf16
run python bench/precision_curves.py $T --steps 300 --out "$OUT/curves"
run python bench/precision_curves.py $T --steps 150 --window 15 --skip 15 --tail 30 --set 'model.preset="DiT-S/2"' \
    --set train.batch_size=16 --set train.warmup_steps=20 --out "$OUT/curves_s2"
echo "== $(date +%T) done"
} 2>&1 | tee "$OUT/all.log"
