#!/usr/bin/env bash
# All GPUs of one host in one process under MirroredStrategy: the simplest way to use a multi-GPU machine, with no
# network involved (replicas all-reduce inside the process).
set -uo pipefail

usage() {
  cat >&2 <<'EOF_USAGE'
usage: launch/multi_gpu.sh [--num_gpus=K] --model_dir=DIR [research.train flags...]

Runs `$PYTHON -m research.train FLAGS... --strategy=mirrored`: one replica per visible GPU, or on the first K with
--num_gpus=K (CUDA_VISIBLE_DEVICES=... also selects which). --batch_size is the global batch, split evenly over the
replicas. On a host without GPUs it mirrors over the CPU. A --strategy in FLAGS (or in a --flagfile) is overridden.
Environment: PYTHON (default python).
EOF_USAGE
  exit 2
}

[[ $# -ge 1 ]] || usage
for arg in "$@"; do
  case $arg in -h | --help | --helpfull) usage ;; esac
done
# `-m research.train` from any directory; relative paths in FLAGS stay relative to this one.
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m research.train "$@" --strategy=mirrored
