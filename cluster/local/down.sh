#!/usr/bin/env bash
# Stop the two-node local cluster started by cluster/local/up.sh: terminate exactly its process groups
# (never `ray stop`, which would also end every other Ray instance on the machine).
set -uo pipefail
STATE_DIR=${STATE_DIR:-/tmp/scgpt-local}
[ -f "$STATE_DIR/pids" ] || { echo "no local cluster recorded in $STATE_DIR"; exit 0; }
while read -r pid; do kill -TERM -- "-$pid" 2>/dev/null || true; done <"$STATE_DIR/pids"
for _ in $(seq 30); do
  alive=0
  while read -r pid; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done <"$STATE_DIR/pids"
  [ $alive = 0 ] && break
  sleep 1
done
while read -r pid; do kill -KILL -- "-$pid" 2>/dev/null || true; done <"$STATE_DIR/pids"
rm -rf "$STATE_DIR"
