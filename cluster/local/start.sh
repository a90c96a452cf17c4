#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for development: a head and N worker nodes, token auth on.
#
#   cluster/local/start.sh                       # head (2 CPUs) + 2 workers (1 CPU each) on the default ports
#   cluster/local/start.sh --workers 3 --head-cpus 0 --worker-cpus 2 --port 6390 --dashboard-port 8275
#   eval "$(cluster/local/start.sh --print-env)" # start, then export RAY_ADDRESS & co. into this shell
#   cluster/local/stop.sh                        # stops the nodes this script started (only those)
#
# Every node runs `ray start ... --block` in the background; its process id goes to STATE_DIR/pids so
# that stop.sh ends exactly these nodes (and the workers and actors they spawned), not any other Ray on
# the machine. Nodes get the repository on PYTHONPATH, as an installed image would have the project, so
# `serve deploy cluster/serve/local.yaml` finds `pipelines.serve.app`; `ray job submit --working-dir .`
# still ships (and prefers) the submitted copy.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

workers="${SORA_LOCAL_WORKERS:-2}"
head_cpus="${SORA_LOCAL_HEAD_CPUS:-2}"
worker_cpus="${SORA_LOCAL_WORKER_CPUS:-1}"
port="${SORA_LOCAL_PORT:-6379}"
dashboard_port="${SORA_LOCAL_DASHBOARD_PORT:-8265}"
object_store_mb="${SORA_LOCAL_OBJECT_STORE_MB:-1024}"
state_dir="${SORA_LOCAL_STATE_DIR:-${TMPDIR:-/tmp}/sora-local-cluster}"
temp_dir=""
timeout_s=90
print_env=0

usage() {
  cat <<USAGE
Usage: cluster/local/start.sh [options]

Start a Ray head and N worker nodes on this machine (token authentication on), then print the
cluster address, the dashboard URL and where the auth token is. Stop them with cluster/local/stop.sh.

Options (environment variable in brackets):
  --workers N             worker nodes besides the head (default 2) [SORA_LOCAL_WORKERS]
  --head-cpus N           CPUs the head offers to tasks (default 2) [SORA_LOCAL_HEAD_CPUS]
  --worker-cpus N         CPUs each worker node offers (default 1) [SORA_LOCAL_WORKER_CPUS]
  --port P                GCS port of the head (default 6379) [SORA_LOCAL_PORT]
  --dashboard-port P      dashboard / job API port (default 8265) [SORA_LOCAL_DASHBOARD_PORT]
  --object-store-mb MB    object store per node (default 1024) [SORA_LOCAL_OBJECT_STORE_MB]
  --state-dir DIR         pids and node logs (default \$TMPDIR/sora-local-cluster) [SORA_LOCAL_STATE_DIR]
  --temp-dir DIR          Ray's temp root (default STATE_DIR/ray); keep it short: socket paths live in it
  --timeout S             seconds to wait for the nodes to come up (default 90)
  --print-env             print only the export lines (for eval) once the cluster is up
  -h, --help              this help
USAGE
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) workers="$2"; shift 2 ;;
    --head-cpus) head_cpus="$2"; shift 2 ;;
    --worker-cpus) worker_cpus="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dashboard-port) dashboard_port="$2"; shift 2 ;;
    --object-store-mb) object_store_mb="$2"; shift 2 ;;
    --state-dir) state_dir="$2"; shift 2 ;;
    --temp-dir) temp_dir="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --print-env) print_env=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "start.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

for pair in "workers:$workers" "head-cpus:$head_cpus" "worker-cpus:$worker_cpus" "port:$port" \
            "dashboard-port:$dashboard_port" "object-store-mb:$object_store_mb" "timeout:$timeout_s"; do
  if ! [[ "${pair#*:}" =~ ^[0-9]+$ ]]; then
    echo "start.sh: --${pair%%:*} must be a non-negative integer, got '${pair#*:}'" >&2
    exit 2
  fi
done
command -v ray >/dev/null || { echo "start.sh: 'ray' is not on PATH (activate the project's virtualenv)" >&2; exit 2; }

temp_dir="${temp_dir:-$state_dir/ray}"
mkdir -p "$state_dir" "$temp_dir"
pids="$state_dir/pids"
address="127.0.0.1:$port"
dashboard="http://127.0.0.1:$dashboard_port"

# Token authentication stays on: make a token if this machine has none (~/.ray/auth_token, or the file
# RAY_AUTH_TOKEN_PATH names, or RAY_AUTH_TOKEN itself), and make every node and client require it.
export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
  ray get-auth-token --generate >/dev/null
fi
token_where="${RAY_AUTH_TOKEN:+the RAY_AUTH_TOKEN environment variable}"
token_where="${token_where:-${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}}"

alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

if [[ -f "$pids" ]]; then
  while read -r pid _; do
    if alive "$pid"; then
      echo "start.sh: a cluster from $state_dir is already running (pid $pid); stop it with cluster/local/stop.sh --state-dir $state_dir" >&2
      exit 1
    fi
  done <"$pids"
  rm -f "$pids"
fi

# A port free now and outside the kernel's ephemeral range: a port from bind(0) is one that any outgoing
# connection (Ray makes dozens while a node starts) may take before the node binds it, and the node then dies.
free_port() {
  python3 - <<'PY'
import random, socket
try:
    low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
except (OSError, ValueError):
    low, high = 32768, 60999
ports = [p for p in range(10000, 65536) if not low <= p <= high]
for port in random.sample(ports, min(200, len(ports))) + [0]:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
PY
}

# One node: `ray start --block` in its own session, so stop.sh can end its whole process group.
launch() {
  local name="$1"; shift
  local log="$state_dir/$name.log"
  local launcher=()
  if command -v setsid >/dev/null; then launcher=(setsid); fi
  PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" nohup "${launcher[@]}" ray start --block \
    --object-store-memory=$((object_store_mb * 1024 * 1024)) \
    --dashboard-agent-listen-port="$(free_port)" \
    --min-worker-port=0 --max-worker-port=0 \
    "$@" >"$log" 2>&1 </dev/null &
  echo "$! $name" >>"$pids"
}

# Alive nodes, as `ray status` counts them (0 while the head is not reachable).
node_count() {
  ray status --address="$address" 2>/dev/null | awk '/^Active:/{a=1; next} /^(Idle|Pending):/{a=0} a && /node_/{n++} END{print n+0}'
}

wait_for_nodes() {
  local want="$1" deadline=$((SECONDS + timeout_s))
  while (( $(node_count) < want )); do
    while read -r pid name; do
      if ! alive "$pid"; then
        echo "start.sh: node '$name' exited; its log ($state_dir/$name.log) ends with:" >&2
        tail -n 20 "$state_dir/$name.log" >&2 || true
        "$here/stop.sh" --state-dir "$state_dir" >/dev/null || true
        exit 1
      fi
    done <"$pids"
    if (( SECONDS > deadline )); then
      echo "start.sh: $want node(s) not up after ${timeout_s}s; logs in $state_dir" >&2
      "$here/stop.sh" --state-dir "$state_dir" >/dev/null || true
      exit 1
    fi
    sleep 1
  done
}

# `ray start` returns once the dashboard has registered, but on the port it found free: Ray moves to the next
# port when the one asked for is taken. The job API must answer where this script says it is.
wait_for_dashboard() {
  local deadline=$((SECONDS + timeout_s)) head_pid
  head_pid="$(awk '$2 == "head" {print $1}' "$pids")"
  until python3 -c 'import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1] + "/api/version", timeout=5)
except urllib.error.HTTPError:
    pass  # it answered (401 without the token)
except OSError:
    sys.exit(1)' "$dashboard"; do
    if ! alive "$head_pid" || (( SECONDS > deadline )); then
      echo "start.sh: the dashboard / job API is not answering at $dashboard (port taken by another process?); the head's log ($state_dir/head.log) ends with:" >&2
      tail -n 20 "$state_dir/head.log" >&2 || true
      "$here/stop.sh" --state-dir "$state_dir" >/dev/null || true
      exit 1
    fi
    sleep 1
  done
}

[[ $print_env == 1 ]] || echo "starting head at $address (dashboard $dashboard), $workers worker node(s); logs in $state_dir" >&2
launch head --head --port="$port" --num-cpus="$head_cpus" --temp-dir="$temp_dir" \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" \
  --ray-client-server-port="$(free_port)" --disable-usage-stats
wait_for_nodes 1
wait_for_dashboard
# One at a time: nodes sharing a machine (and a session folder) pick their socket names on start-up.
for i in $(seq 1 "$workers"); do
  launch "worker$i" --address="$address" --num-cpus="$worker_cpus"
  wait_for_nodes $((i + 1))
done

if [[ $print_env == 1 ]]; then
  printf 'export RAY_ADDRESS=%s RAY_API_SERVER_ADDRESS=%s RAY_DASHBOARD_ADDRESS=%s RAY_AUTH_MODE=token\n' \
    "$address" "$dashboard" "$dashboard"
  exit 0
fi
cat <<DONE
Ray cluster up: head + $workers worker node(s) ($((head_cpus + workers * worker_cpus)) CPUs)
  address (ray.init / ray start --address):  $address
  dashboard and job API:                      $dashboard
  auth token:                                 $token_where   (ray get-auth-token prints it)
Use it (RAY_ADDRESS: drivers and sora; RAY_API_SERVER_ADDRESS: ray job; RAY_DASHBOARD_ADDRESS: serve deploy):
  export RAY_ADDRESS=$address RAY_API_SERVER_ADDRESS=$dashboard RAY_DASHBOARD_ADDRESS=$dashboard RAY_AUTH_MODE=token
  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m pipelines.train.trainer --help
Stop it:
  cluster/local/stop.sh${state_dir:+ --state-dir $state_dir}
DONE
