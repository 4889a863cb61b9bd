#!/usr/bin/env bash
# TensorBoard over a run directory, or a sweep's parent directory to compare its runs (HParams tab).
#
#   launch/tensorboard.sh LOGDIR [PORT]
#
# Binds to 127.0.0.1 by default, so that a shared machine does not publish the runs to its network; reach it from
# elsewhere through an SSH tunnel (ssh -L 6006:127.0.0.1:6006 HOST), or set HOST=0.0.0.0 knowingly.
# PORT defaults to 6006 (or $PORT); PYTHON picks the interpreter (default: python3).
set -euo pipefail

usage() {
  echo "usage: $0 LOGDIR [PORT]   (env: HOST=127.0.0.1, PORT=6006, PYTHON=python3)" >&2
  exit 2
}

[[ $# -ge 1 && $# -le 2 ]] || usage
logdir=$1
port=${2:-${PORT:-6006}}
host=${HOST:-127.0.0.1}
[[ -d $logdir ]] || { echo "error: $logdir is not a directory" >&2; usage; }
[[ $port =~ ^[0-9]+$ && $port -ge 1 && $port -le 65535 ]] || { echo "error: port must be 1-65535, got $port" >&2; usage; }

exec "${PYTHON:-python3}" -m tensorboard.main --logdir "$logdir" --host "$host" --port "$port"
