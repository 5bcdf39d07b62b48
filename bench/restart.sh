#!/usr/bin/env bash
# Restart time of a keel member holding many keys (issue 16's goal: a million
# keys to serving reads in under 2 s). Starts three members on loopback (fsync
# on, the default --snapshot-count of 100,000, as bench/compare.sh), loads KEYS
# distinct keys with 64-byte values, then RUNS times: kills a follower with -9,
# restarts it and times it until it answers a serializable read (as
# compare.sh's recovery figure). Prints one JSON line per restart with that
# time and the member's own account of it (its "recovered the snapshot and the
# log" line: reading the files, restoring the state machine, the snapshot's
# size and the log entries replayed), and the load average.
#
# Usage: bench/restart.sh [KEYS] [RUNS]
# With RESTART_COPY_DATA=DIRECTORY, the first killed member's data directory is
# copied there before its restart.
set -euo pipefail
cd "$(dirname "$0")/.."

keys=${1:-1000000}
runs=${2:-3}
work=$(mktemp -d)
declare -A member_pid=()
cleanup() {
  for pid in "${member_pid[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

if ! command -v etcdctl >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq etcd-client >/dev/null
fi
# RESTART_KEEL=PATH runs that keel binary instead of building this tree's.
keel=${RESTART_KEEL:-}
if [ -z "$keel" ]; then
  cargo build --release -p keel >/dev/null
  keel=target/release/keel
fi
export ETCDCTL_API=3

# Client port of member INDEX (peer port one above); below the ephemeral range
# and away from the other bench scripts' and the tests' ports.
client_port() { echo $((29600 + $1 * 10)); }
endpoints="127.0.0.1:$(client_port 1),127.0.0.1:$(client_port 2),127.0.0.1:$(client_port 3)"

start_member() {
  local index=$1 cluster="" other port
  for other in 1 2 3; do
    cluster="$cluster${cluster:+,}restart$other=http://127.0.0.1:$(($(client_port "$other") + 1))"
  done
  port=$(client_port "$index")
  "$keel" server --name "restart$index" --data-dir "$work/restart$index" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$((port + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-cluster "$cluster" --initial-cluster-token restart \
    --heartbeat-interval 100 --election-timeout 1000 >>"$work/restart$index.log" 2>&1 &
  member_pid[$index]=$!
}

for index in 1 2 3; do start_member "$index"; done
for _ in $(seq 1 300); do
  etcdctl --endpoints="$endpoints" --command-timeout=1s put restart-ready 1 >/dev/null 2>&1 && break
  sleep 0.1
done
echo "loading $keys keys" >&2
$keel bench --endpoints "$endpoints" --clients 256 --total "$keys" --key-space-size "$keys" \
  --sequential-keys --value-size 64 put >/dev/null

for run in $(seq 1 "$runs"); do
  # The follower: a member that does not lead.
  leader=$(etcdctl --endpoints="$endpoints" endpoint status -w json |
    python3 -c 'import json, sys
statuses = json.load(sys.stdin)
print(next(i + 1 for i, s in enumerate(statuses) if s["Status"]["leader"] == s["Status"]["header"]["member_id"]))')
  follower=$((leader % 3 + 1))
  kill -9 "${member_pid[$follower]}"
  wait "${member_pid[$follower]}" 2>/dev/null || true
  if [ "$run" = 1 ] && [ -n "${RESTART_COPY_DATA:-}" ]; then
    # A copy of the killed member's data directory, to profile its restart
    # (say, with `perf record keel server --data-dir ...`) apart from this run.
    rm -rf "$RESTART_COPY_DATA" && cp -r "$work/restart$follower" "$RESTART_COPY_DATA"
  fi
  lines=$(wc -l <"$work/restart$follower.log")
  load=$(cut -d' ' -f1 /proc/loadavg)
  started_at=$(date +%s%N)
  start_member "$follower"
  until etcdctl --endpoints="127.0.0.1:$(client_port "$follower")" --command-timeout=300ms \
    get --consistency=s restart-ready >/dev/null 2>&1; do
    sleep 0.01
  done
  answered_at=$(date +%s%N)
  account=$(tail -n +"$((lines + 1))" "$work/restart$follower.log" | grep "recovered the snapshot and the log" || true)
  python3 - "$run" "$keys" "$(((answered_at - started_at) / 1000000))" "$account" "$load" <<'PYEOF'
import json, re, sys
run, keys, milliseconds, account, load = sys.argv[1:]
fields = dict(re.findall(r"(\w+)=(\d+)", account))
print(json.dumps({
    "run": int(run), "keys": int(keys), "restart_to_serializable_read_ms": int(milliseconds),
    "read_ms": int(fields.get("read_milliseconds", -1)),
    "restore_ms": int(fields.get("restore_milliseconds", -1)),
    "snapshot_bytes": int(fields.get("snapshot_bytes", -1)),
    "log_entries": int(fields.get("entry_count", -1)),
    "load_average_1m": float(load),
}))
PYEOF
  # Let it catch up before the next kill.
  sleep 2
done
