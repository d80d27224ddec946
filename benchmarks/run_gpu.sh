#!/usr/bin/env bash
# One device call for every GPU check and benchmark (see benchmarks/gpu.py).
#
# Before the call, on a machine with internet, fetch the peers as wheels into .whl/ (ignored by
# git, carried with the call):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       fla-core jax-linear-attention
# Then run, e.g. with the device tool: command "bash benchmarks/run_gpu.sh", carry [".whl"].
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu_name.txt"
python3 benchmarks/gpu.py --check 2>&1 | tee "$out/gpu_check.txt"
python3 benchmarks/gpu.py 2>&1 | tee "$out/gpu_bench.md"
