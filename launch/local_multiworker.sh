#!/usr/bin/env bash
# N research.train workers on this host under MultiWorkerMirroredStrategy: the multi-worker code path (collectives
# over gRPC, chief-only writes, failure detection) on one machine, for trying it out and for tests.
# Real clusters: launch/slurm.sbatch, or the same TF_CONFIG written by hand on each host (README).
set -uo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/local_multiworker.sh N --model_dir=DIR [research.train flags...]

Starts N workers on 127.0.0.1, each `$TRAIN_COMMAND FLAGS... --strategy=multi_worker_mirrored` with its own
TF_CONFIG (worker 0 is the chief; free ports are chosen here). The workers share --model_dir: the chief writes it.
Each worker's output goes to $LOG_DIR/worker<i>.log (appended; default DIR/logs); the chief's is also shown here.
If a worker fails, the others are stopped and the script exits with the failed worker's status. Ctrl-C or SIGTERM
is passed on to every worker (they save a checkpoint together and stop). Workers left after $STOP_GRACE_S seconds
are killed.

Environment: PYTHON (default python), TRAIN_COMMAND (default "$PYTHON -m research.train"),
             LOG_DIR (default DIR/logs), STOP_GRACE_S (default 60).
Note: TensorFlow's gRPC server listens on all interfaces, on the chosen ports, while the run lasts.
EOF
  exit 2
}

[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
num_workers=$1
shift
model_dir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --model_dir=*) model_dir=${args[i]#--model_dir=} ;;
    --model_dir) model_dir=${args[i + 1]:-} ;;
    -h | --help | --helpfull) usage ;;
  esac
done
[[ -n $model_dir || -n ${LOG_DIR:-} ]] || usage

# `-m research.train` from any directory; relative paths in FLAGS stay relative to this one.
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
read -r -a train_command <<<"${TRAIN_COMMAND:-$PYTHON -m research.train}"
log_dir=${LOG_DIR:-$model_dir/logs}
grace=${STOP_GRACE_S:-60}
mkdir -p "$log_dir" || exit 1

# Ports free on the loopback now, held open together so that they differ; the workers bind them moments later.
ports=$("$PYTHON" - "$num_workers" <<'EOF'
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(",".join(f'"127.0.0.1:{s.getsockname()[1]}"' for s in sockets))
EOF
) || { echo "error: could not choose ports with $PYTHON" >&2; exit 1; }

pids=()
statuses=()
failed=0

running() {  # The workers not yet collected.
  local i
  for i in "${!pids[@]}"; do [[ -n ${statuses[i]:-} ]] || echo "${pids[i]}"; done
}

alive() {
  local pid
  for pid in $(running); do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}

stop_all() {  # SIGTERM to every worker (each saves and stops), SIGKILL to those left after $1 seconds.
  local deadline=$((SECONDS + $1))
  kill -TERM $(running) 2>/dev/null
  while alive && ((SECONDS < deadline)); do sleep 0.5; done
  kill -KILL $(running) 2>/dev/null
}

on_signal() {
  echo "launcher: $1 received, stopping the workers (SIGKILL in ${grace}s)" >&"${console:-2}"
  trap '' INT TERM
  stop_all "$grace"
  [[ $1 == INT ]] && failed=130 || failed=143
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'kill -KILL $(running) ${tail_pid:-} 2>/dev/null' EXIT  # Never leave a worker behind.

for ((i = 0; i < num_workers && failed == 0; i++)); do
  log="$log_dir/worker$i.log"
  echo "=== $(date '+%F %T') worker $i of $num_workers: ${train_command[*]} $* --strategy=multi_worker_mirrored" >>"$log"
  ((i == 0)) && chief_lines=$(wc -l <"$log")
  TF_CONFIG="{\"cluster\": {\"worker\": [$ports]}, \"task\": {\"type\": \"worker\", \"index\": $i}}" \
    "${train_command[@]}" "$@" --strategy=multi_worker_mirrored >>"$log" 2>&1 </dev/null &
  pids+=($!)
  echo "worker $i: pid $! log $log" >&2
done
tail -n "+$((chief_lines + 1))" -f --pid="${pids[0]}" "$log_dir/worker0.log" &
tail_pid=$!
exec {console}>&2 2>/dev/null  # From here bash's own notices ("Killed" + the command line) are noise.

# Each time a child ends, collect the workers that did; the first failure stops the rest.
while alive; do
  wait -n
  for i in "${!pids[@]}"; do
    if [[ -z ${statuses[i]:-} ]] && ! kill -0 "${pids[i]}" 2>/dev/null; then
      wait "${pids[i]}"
      statuses[i]=$?
      if ((statuses[i] != 0 && failed == 0)); then
        failed=${statuses[i]}
        echo "launcher: worker $i exited with status $failed, stopping the others; its log: $log_dir/worker$i.log" \
          >&"$console"
        tail -n 5 "$log_dir/worker$i.log" >&"$console"
        stop_all "$grace"  # The others stop by themselves if it died, or save with it if it was preempted.
      fi
    fi
  done
done
wait "$tail_pid"
exit "$failed"
