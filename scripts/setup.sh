#!/usr/bin/env bash
# Set up a virtual environment in .venv with the pinned dependencies and the test extras.
# torch/torchvision resolve to the CUDA builds of 2.14.1/0.29.1 (the same pins run on a GPU host).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
log=$(mktemp)
if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
.venv/bin/python -m service.protos  # gRPC modules from proto/ into service/_proto (generated, not committed)
.venv/bin/python -c "import finetune, service, torch, torchvision"
echo "set up in $SECONDS s: $(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')" >&2
