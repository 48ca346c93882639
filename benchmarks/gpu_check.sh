#!/usr/bin/env bash
# Blueberry Zoo GPU check: bf16 matmul TFLOP/s, flash attention on our attention blocks, grouped-GEMM
# MoE dispatch vs the per-expert loop, our CPU tests under this torch, the train-step benchmark at
# ~0.5B parameters against transformers (tokens/s, MFU), and the real DeepSpeed trainer at the same
# size. Needs one NVIDIA GPU. With --compile it took 457 s on an H200 (trainstep 273 s,
# trainer 153 s at its cap; benchmarks/results/gpu_check_h200.txt). Caps:
# pytest 60 s, trainstep 300 s, trainer 100 s, overhead 120 s (the trainer beside the bare step: with
# it a full run may take 10 minutes; `--sections overhead` runs it alone).
# --compile: benchmark and train with torch.compile.
#
#   bash benchmarks/gpu_check.sh                        # everything
#   bash benchmarks/gpu_check.sh --sections matmul,flash  # a subset (env,matmul,flash,grouped,pytest,trainstep,train,overhead)
#   bash benchmarks/gpu_check.sh --help
#
# Python: $PYTHON if set, else the repo's .venv if it has one, else python3 (needs torch with CUDA and
# the project's dependencies). Exit status 0 with a CUDA GPU (read the report), 2 without one.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT" PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /'
else
  echo "nvidia-smi: not found"
fi
exec "$PYTHON" -m benchmarks.gpu_check "$@"
