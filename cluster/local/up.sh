#!/usr/bin/env bash
# Start a two-node Ray cluster on this machine, on 127.0.0.1 only: a head node and a second node, each its own
# `ray start --block` process group with CPUS_PER_NODE logical CPUs. For trying multi-node behaviour (worker
# placement, cross-node data and checkpoints) without a cloud. Stop it with cluster/local/down.sh.
#
#   STATE_DIR=/tmp/scgpt-local cluster/local/up.sh      # prints the job-submission address
#   RAY_AUTH_MODE=token .venv/bin/ray job submit --address http://127.0.0.1:8265 -- python -m jobs.pretrain ...
#
# PYTHON=/path/to/python picks the environment the nodes run in (default: the one the project is installed
# in: the repository's .venv, else python3 on PATH); `ray` is the CLI next to it. See cluster/python-env.sh.
set -euo pipefail
NEEDS="ray, scgpt_dist"
source "$(dirname "$0")/../python-env.sh"

STATE_DIR=${STATE_DIR:-/tmp/scgpt-local}
HEAD_PORT=${HEAD_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
CPUS_PER_NODE=${CPUS_PER_NODE:-1}
# Each node's agents need their own ports; two blocks of five, well away from Ray's defaults.
PORT_BASE=${PORT_BASE:-46100}

export RAY_AUTH_MODE=token
mkdir -p "$STATE_DIR"
if [ -f "$STATE_DIR/pids" ]; then
  echo "error: $STATE_DIR/pids exists; a local cluster may be running (run cluster/local/down.sh first)" >&2
  exit 2
fi
"$RAY" get-auth-token --generate >/dev/null

start_node() {  # name, extra args...
  local name=$1 base=$2
  shift 2
  setsid "$RAY" start --block --node-ip-address=127.0.0.1 --num-cpus="$CPUS_PER_NODE" \
    --temp-dir="$STATE_DIR/ray" --disable-usage-stats \
    --dashboard-agent-listen-port=$((base)) --dashboard-agent-grpc-port=$((base + 1)) \
    --metrics-export-port=$((base + 2)) --runtime-env-agent-port=$((base + 3)) \
    --node-manager-port=$((base + 4)) --object-manager-port=$((base + 5)) \
    "$@" >"$STATE_DIR/$name.log" 2>&1 &
  echo $! >>"$STATE_DIR/pids"
}

start_node head "$PORT_BASE" --head --port="$HEAD_PORT" --include-dashboard=true \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
  --ray-client-server-port=$((PORT_BASE + 20))

address="http://127.0.0.1:$DASHBOARD_PORT"
for _ in $(seq 60); do
  if "$RAY" job list --address "$address" >/dev/null 2>&1; then break; fi
  sleep 2
done
"$RAY" job list --address "$address" >/dev/null || { echo "error: head did not start; see $STATE_DIR/head.log" >&2; exit 1; }

start_node worker $((PORT_BASE + 10)) --address="127.0.0.1:$HEAD_PORT"
for _ in $(seq 60); do
  nodes=$("$PYTHON" -c "import ray; ray.init(address='127.0.0.1:$HEAD_PORT', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null || echo 0)
  if [ "$nodes" = "2" ]; then break; fi
  sleep 2
done
[ "$nodes" = "2" ] || { echo "error: second node did not join; see $STATE_DIR/worker.log" >&2; exit 1; }
echo "$address"
