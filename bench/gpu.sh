#!/usr/bin/env bash
# One command for a lent GPU: DiT-XL/2 bf16 training throughput + MFU and 50-step sampling latency.
# Under 8 minutes on one H100 (timeouts 300 + 150 s) (installs nothing if torch and patchflow are present).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import patchflow" 2>/dev/null || pip install -q -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 300 python bench/gpu_bench.py --batch 32 64 --json "${OUT:-.}/gpu_bench.json"
timeout 150 python bench/gpu_bench.py --batch 64 --compile --json "${OUT:-.}/gpu_bench_compile.json" || echo "compile run failed or timed out"
