#!/usr/bin/env bash
# Stop the two-node local cluster started by cluster/local/up.sh: terminate exactly its process groups
# (never `ray stop`, which would also end every other Ray instance on the machine). SIGTERM first; what is
# still running after GRACE_S seconds (default 5) is SIGKILLed: on SIGTERM `ray start --block` waits for its
# GCS and raylet, which linger for 30 s and more, and a throwaway local cluster has no state worth that wait.
set -uo pipefail
STATE_DIR=${STATE_DIR:-/tmp/scgpt-local}
GRACE_S=${GRACE_S:-5}
[ -f "$STATE_DIR/pids" ] || { echo "no local cluster recorded in $STATE_DIR"; exit 0; }
while read -r pid; do kill -TERM -- "-$pid" 2>/dev/null || true; done <"$STATE_DIR/pids"
for _ in $(seq $((GRACE_S * 5))); do
  alive=0
  while read -r pid; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done <"$STATE_DIR/pids"
  [ $alive = 0 ] && break
  sleep 0.2
done
while read -r pid; do kill -KILL -- "-$pid" 2>/dev/null || true; done <"$STATE_DIR/pids"
rm -rf "$STATE_DIR"
