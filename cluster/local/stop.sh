#!/usr/bin/env bash
# Stop the one-machine development cluster that cluster/local/start.sh started (and only it).
#
#   cluster/local/stop.sh                      # the nodes recorded in $TMPDIR/sora-local-cluster/pids
#   cluster/local/stop.sh --state-dir DIR      # a cluster started with --state-dir DIR
#   cluster/local/stop.sh --all                # `ray stop`: every Ray process of this user on the machine
#
# Each node's `ray start --block` ends its raylet, workers and (on the head) GCS and dashboard when it
# gets SIGTERM; whatever outlives the grace period is killed with its process group. Safe to run twice.
set -euo pipefail

state_dir="${SORA_LOCAL_STATE_DIR:-${TMPDIR:-/tmp}/sora-local-cluster}"
grace_s=20
all=0

usage() {
  cat <<USAGE
Usage: cluster/local/stop.sh [--state-dir DIR] [--grace S] [--all]

Stop the Ray nodes that cluster/local/start.sh started (their pids are in STATE_DIR/pids).
Does nothing, successfully, when none is running.

  --state-dir DIR   as given to start.sh (default \$TMPDIR/sora-local-cluster) [SORA_LOCAL_STATE_DIR]
  --grace S         seconds to wait for a clean shutdown before SIGKILL (default 20)
  --all             also run 'ray stop', which ends every Ray process of this user on this machine
  -h, --help        this help
USAGE
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --state-dir) state_dir="$2"; shift 2 ;;
    --grace) grace_s="$2"; shift 2 ;;
    --all) all=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "stop.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ "$grace_s" =~ ^[0-9]+$ ]]; then
  echo "stop.sh: --grace must be a non-negative integer, got '$grace_s'" >&2
  exit 2
fi

pids="$state_dir/pids"
alive() { kill -0 "$1" 2>/dev/null; }

stopped=0
if [[ -f "$pids" ]]; then
  # Workers first, the head last: worker raylets then leave the cluster instead of losing their GCS.
  entries=()
  while read -r line; do entries=("$line" ${entries[@]+"${entries[@]}"}); done <"$pids"
  for entry in ${entries[@]+"${entries[@]}"}; do
    read -r pid name <<<"$entry"
    if alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      deadline=$((SECONDS + grace_s))
      while alive "$pid" && (( SECONDS < deadline )); do sleep 0.5; done
      stopped=$((stopped + 1))
      echo "stopped $name (pid $pid)"
    fi
    # The node ran in its own session (setsid): its group id is its pid. Kill stragglers in that group.
    if pgrep -g "$pid" >/dev/null 2>&1; then
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  done
  rm -f "$pids"
fi

if [[ $all == 1 ]]; then
  ray stop
elif [[ $stopped == 0 ]]; then
  echo "no local cluster running from $state_dir"
fi
