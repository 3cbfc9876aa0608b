#!/usr/bin/env bash
# The GPU benchmark: a few minutes on one CUDA GPU (not run yet: the machine that wrote
# BENCHMARKS.md had none). From the repository root, after scripts/setup.sh:
#
#   bench/gpu.sh                 # writes BENCHMARKS-gpu.md and bench/results-gpu.json
#
# What it measures, with the same harness and the same real JPEGs as the CPU run:
# - ResNet-50 at 224 px served JPEG-in by our server on CUDA (TorchScript backend: the pinned
#   onnxruntime wheel is CPU-only), batching up to 32, closed loop at concurrency 1, 32 and 96:
#   throughput and p50/p95/p99; real TorchServe 0.12 on the same GPU with its batch 8 / 50 ms;
# - the raw backend on the GPU at batch 1 and 8, FP32 and FP16 (the module cast with .half();
#   the server itself computes in FP32);
# - finetune ResNet-50 with AMP (bf16 where supported, else fp16) and channels_last: images/s
#   and data-loading wait over ~1,400 training images (the demo JPEGs repeated), full and linear probe.
#
# Compare with the public anchors listed in BENCHMARKS.md (Triton A100 FP16 4,894 img/s at
# concurrency 96, p99 22.8 ms; ResNet-50 AMP training on A100 about 2,470 img/s); one Python
# load-generator process may itself limit the served figure at high concurrency: its CPU share
# is in results-gpu.json (client_cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate

if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
  echo "bench/gpu.sh: no NVIDIA GPU visible (nvidia-smi failed); this script is for a CUDA host" >&2
  exit 2
fi
python - <<'PY'
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))
PY

cores=$(nproc)
python -m bench \
  --device cuda \
  --backbone resnet50 \
  --configs ours-ts-b32 \
  --serve-args "--decode-workers $(( cores > 4 ? cores - 2 : 2 )) --max-queue-size 256" \
  --protocols v2-grpc,v2-http,ts-http \
  --concurrency 1,32,96 \
  --duration 5 --warmup 2 \
  --open-rate 0 \
  --raw-fp16 --raw-duration 3 \
  --train-backbones resnet50 \
  --train-copies 20 --train-batch-size 64 --train-workers "$(( cores > 8 ? 8 : cores ))" \
  --output-md BENCHMARKS-gpu.md \
  --output-json bench/results-gpu.json \
  --note "GPU run of bench/gpu.sh" \
  "$@"
