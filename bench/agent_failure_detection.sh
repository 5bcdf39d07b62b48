#!/usr/bin/env bash
# Kill-to-suspect and kill-to-down times of a keel agent, over N runs: a
# one-member cluster, two agents (node TTL 5 s); agent b is killed with
# SIGKILL, agent a is polled every 20 ms (/v1/keel/nodes) until it reports b
# suspect, then down; b is restarted and given time to become alive with a
# settled phi before the next run.
# Usage: bench/agent_failure_detection.sh [path/to/keel] [runs]  (ports 25950-25958)
set -euo pipefail
keel=${1:-target/release/keel}
runs=${2:-10}
dir=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
"$keel" server --name m1 --data-dir "$dir/m1" \
  --listen-client-urls http://127.0.0.1:25950 --advertise-client-urls http://127.0.0.1:25950 \
  --listen-peer-urls http://127.0.0.1:25951 --initial-advertise-peer-urls http://127.0.0.1:25951 \
  --initial-cluster m1=http://127.0.0.1:25951 2>"$dir/m1.log" & pids+=($!)
sleep 2
start_agent() { # name http dns gossip join
  "$keel" agent --name "$1" --endpoints 127.0.0.1:25950 --data-dir "$dir/$1" --node-ttl 5s \
    --http-addr "127.0.0.1:$2" --dns-addr "127.0.0.1:$3" --gossip-addr "127.0.0.1:$4" --join "$5" \
    2>>"$dir/$1.log" >/dev/null &
  echo $!
}
a=$(start_agent a 25952 25953 25954 127.0.0.1:25957); pids+=($a)
status_of_b() { curl -sf http://127.0.0.1:25952/v1/keel/nodes \
  | python3 -c 'import json,sys; print(next((n["Status"] for n in json.load(sys.stdin) if n["Node"]=="b"), "none"))'; }
for run in $(seq "$runs"); do
  b=$(start_agent b 25955 25956 25957 127.0.0.1:25954); pids+=($b)
  until [ "$(status_of_b)" = alive ]; do sleep 0.2; done
  sleep 8   # heartbeats for a settled phi mean
  killed=$(date +%s.%N); kill -9 "$b"; wait "$b" 2>/dev/null || true
  suspect=""
  while true; do
    status=$(status_of_b); now=$(date +%s.%N)
    if [ -z "$suspect" ] && [ "$status" != alive ]; then suspect=$now; fi
    if [ "$status" = down ]; then down=$now; break; fi
    sleep 0.02
  done
  python3 -c "print(f'run $run: suspect after {$suspect - $killed:.2f} s, down after {$down - $killed:.2f} s')"
done
