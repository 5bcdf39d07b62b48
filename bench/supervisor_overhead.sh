#!/usr/bin/env bash
# Measures what supervising tasks costs a keel agent: a one-member cluster,
# one agent; the agent's CPU time and RSS over 30 s with no allocation, then
# with N allocations of one task each (`sleep`, no service), written into the
# store as the controller would. Also times N allocations placed → all
# running (status written), and N stopped → all processes gone.
# Usage: bench/supervisor_overhead.sh [path/to/keel] [N]   (ports 30450-30454)
set -euo pipefail
keel=${1:-target/release/keel}
count=${2:-50}
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  # The tasks' process groups, as the agent recorded them.
  cat "$dir"/agent/allocs/*/pids 2>/dev/null | python3 -c '
import json, os, signal, sys
for line in sys.stdin.read().replace("}{", "}\n{").splitlines():
    for task in json.loads(line).values():
        try: os.killpg(task["pid"], signal.SIGKILL)
        except OSError: pass' || true
  rm -rf "$dir"
}
trap cleanup EXIT
endpoint=127.0.0.1:30450
"$keel" server --name m1 --data-dir "$dir/m1" \
  --listen-client-urls http://$endpoint --advertise-client-urls http://$endpoint \
  --listen-peer-urls http://127.0.0.1:30451 --initial-advertise-peer-urls http://127.0.0.1:30451 \
  --initial-cluster m1=http://127.0.0.1:30451 2>"$dir/m1.log" & pids+=($!)
sleep 2
"$keel" agent --name bench --endpoints $endpoint --data-dir "$dir/agent" \
  --http-addr 127.0.0.1:30452 --dns-addr 127.0.0.1:30453 --gossip-addr 127.0.0.1:30454 \
  2>"$dir/agent.log" >/dev/null & agent=$!; pids+=($agent)
for _ in $(seq 100); do curl -sf http://127.0.0.1:30452/v1/agent/self >/dev/null && break; sleep 0.1; done
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$agent/stat"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$agent/status"; }
measure() {
  local start end
  start=$(cpu_ticks); sleep 30; end=$(cpu_ticks)
  echo "$1: agent CPU $(python3 -c "print(f'{($end - $start) / $ticks / 30 * 100:.2f} %')") of one core, RSS $(rss) KiB"
}
running() { curl -sf "http://127.0.0.1:30452/v1/allocations?job=many" | grep -o '"client_status":"running"' | wc -l; }
sleep 5
measure "no allocation"
"$keel" kv --endpoints $endpoint put /keel/jobs/many \
  '{"versions":[{"version":0,"stable":false,"job":{"name":"many","group":{"g":{"task":{"main":{"config":{"command":"sleep","args":["3001"]}}}}}}}]}' >/dev/null
start=$(date +%s.%N)
for i in $(seq 1 "$count"); do
  id=$(printf 'b0000000-0000-4000-8000-%012d' "$i")
  "$keel" kv --endpoints $endpoint put "/keel/allocs/bench/$id" \
    "{\"id\":\"$id\",\"job\":\"many\",\"job_version\":0,\"group\":\"g\",\"index\":$i,\"node\":\"bench\",\"resources\":{\"cpu_millicores\":100,\"memory_mib\":300},\"ports\":{},\"placement_reason\":\"new\",\"created_at\":0,\"desired_status\":{\"status\":\"run\"},\"client\":{\"status\":\"pending\"}}" >/dev/null
done
written=$(date +%s.%N)
until [ "$(running)" -eq "$count" ]; do sleep 0.1; done
echo "$count allocations written in $(python3 -c "print(f'{$written - $start:.1f}')") s; all running $(python3 -c "print(f'{$(date +%s.%N) - $written:.1f}')") s after the last write"
sleep 5
measure "$count allocations"
start=$(date +%s.%N)
"$keel" kv --endpoints $endpoint del --prefix /keel/allocs/bench/ >/dev/null
while pgrep -f "sleep 3001" >/dev/null; do sleep 0.1; done
echo "$count allocations deleted → every process gone in $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')") s"
