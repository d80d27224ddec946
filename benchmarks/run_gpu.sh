#!/usr/bin/env bash
# One device call for every GPU check and benchmark: tests/test_gpu.py (pytest -m gpu), then
# benchmarks/gpu.py, then benchmarks/gpu.py --features.
#
# Before the call, on a machine with internet, fetch the peers and pytest as wheels into .whl/
# (ignored by git, carried with the call):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       fla-core jax-linear-attention
#   python3 -m pip download --only-binary=:all: --python-version 3.12 -d .whl pytest
# Then run, e.g. with the device tool: command "bash benchmarks/run_gpu.sh", carry [".whl"].
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# python -m puts the repository root (the working directory) first on the import path.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu_name.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py 2>&1 | tee "$out/gpu_check.txt"
python3 -m benchmarks.gpu 2>&1 | tee "$out/gpu_bench.md"
# The DPFPAttention training step with the feature map on chip in the kernels or given to them.
python3 -m benchmarks.gpu --features 2>&1 | tee "$out/gpu_features.md"
