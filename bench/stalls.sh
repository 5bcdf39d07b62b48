#!/usr/bin/env bash
# Write stalls under snapshots and corruption checks (issue 16): keel and etcd
# side by side, started the same way (three members on loopback, fsync on,
# heartbeat 100 ms, election 1000 ms, the same --snapshot-count, the periodic
# corruption check every 60 s on both), loaded with KEYS keys of 256 bytes and
# then written by 256 clients for SECONDS seconds with `keel bench` (the same
# load generator for both). Prints one JSON line per run: throughput, p50, p99,
# p99.9 and max latency, errors, the snapshots made during the run and their
# sizes, and the Raft term before and after (an election in the run changes it).
#
# Usage: bench/stalls.sh [SECONDS] [KEYS] [SNAPSHOT_COUNT] [RUNS]
# STALLS_CLIENTS (default 256), STALLS_RATE (operations per second in all, open
# loop; default: as fast as the clients go) and STALLS_VALUE_BYTES (default 256)
# shape the run; the soak of issue 16 is a light load over a million keys:
#   STALLS_SYSTEMS=keel STALLS_CLIENTS=16 STALLS_RATE=250 STALLS_VALUE_BYTES=64 \
#     bench/stalls.sh 600 1000000 100000 1
# Each line also counts the corruption checks the members finished in the run.
# STALLS_SYSTEMS="keel" (or "etcd") runs one system only;
# With STALLS_LOGS=DIRECTORY, the members' logs of each run are kept there
# (keel logs every member loop batch over 100 ms with where its time went).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
keys=${2:-100000}
snapshot_count=${3:-50000}
runs=${4:-1}
clients=${STALLS_CLIENTS:-256}
value_bytes=${STALLS_VALUE_BYTES:-256}
work=$(mktemp -d)
declare -A member_pid=()
cleanup() {
  for pid in "${member_pid[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

if ! command -v etcd >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq etcd-server etcd-client >/dev/null
fi
# STALLS_KEEL=PATH runs that keel binary (say, a build of another commit)
# instead of building this tree's.
keel=${STALLS_KEEL:-}
if [ -z "$keel" ]; then
  cargo build --release -p keel >/dev/null
  keel=target/release/keel
fi
export ETCDCTL_API=3

# Client port of member INDEX of SYSTEM (peer port one above); below the
# ephemeral range and away from compare.sh's and the tests' ports.
client_port() { if [ "$1" = etcd ]; then echo $((29300 + $2 * 10)); else echo $((29200 + $2 * 10)); fi; }
endpoints_of() {
  local list="" index
  for index in 1 2 3; do list="$list${list:+,}127.0.0.1:$(client_port "$1" "$index")"; done
  echo "$list"
}

start_member() {
  local system=$1 index=$2 data=$3
  local cluster="" other port
  for other in 1 2 3; do
    cluster="$cluster${cluster:+,}$system$other=http://127.0.0.1:$(($(client_port "$system" "$other") + 1))"
  done
  port=$(client_port "$system" "$index")
  local command=(etcd --experimental-corrupt-check-time 60s)
  [ "$system" = keel ] && command=("$keel" server --experimental-corrupt-check-time 60s)
  "${command[@]}" --name "$system$index" --data-dir "$data/$system$index" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$((port + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-cluster "$cluster" --initial-cluster-token "stalls-$system" \
    --heartbeat-interval 100 --election-timeout 1000 --snapshot-count "$snapshot_count" \
    >>"$data/$system$index.log" 2>&1 &
  member_pid[$system$index]=$!
}

wait_for_leader() {
  for _ in $(seq 1 300); do
    etcdctl --endpoints="$1" --command-timeout=1s put stalls-ready 1 >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "no leader at $1" >&2
  return 1
}

# The highest Raft term any member reports.
raft_term() {
  etcdctl --endpoints="$1" endpoint status -w json 2>/dev/null |
    python3 -c 'import json, sys; print(max(s["Status"].get("raftTerm", s["Status"]["header"].get("raft_term", 0)) for s in json.load(sys.stdin)))'
}

run_once() {
  local system=$1 run=$2
  local data="$work/$system-$run" index endpoints
  mkdir -p "$data"
  for index in 1 2 3; do start_member "$system" "$index" "$data"; done
  endpoints=$(endpoints_of "$system")
  wait_for_leader "$endpoints"
  $keel bench --endpoints "$endpoints" --clients 64 --total "$keys" --key-space-size "$keys" \
    --sequential-keys --value-size "$value_bytes" put >/dev/null
  local term_before lines=() load_before
  term_before=$(raft_term "$endpoints")
  for index in 1 2 3; do lines+=("$(wc -l <"$data/$system$index.log")"); done
  load_before=$(cut -d' ' -f1 /proc/loadavg)
  local json
  local rate=()
  [ -n "${STALLS_RATE:-}" ] && rate=(--rate "$STALLS_RATE")
  json=$($keel bench --endpoints "$endpoints" --clients "$clients" "${rate[@]}" \
    --duration "${seconds}s" --key-space-size "$keys" --value-size "$value_bytes" -o json put)
  local term_after count sizes
  term_after=$(raft_term "$endpoints")
  # Snapshots logged during the run. keel logs each one's size; etcd's
  # snapshot file is small (its data lives in its backend), so etcd's sizes
  # are its members' backend sizes from `endpoint status`.
  local pattern="snapshot written off the member loop"
  [ "$system" = etcd ] && pattern="saved snapshot"
  local logged=""
  for index in 1 2 3; do
    logged="$logged$(tail -n +"$((lines[index - 1] + 1))" "$data/$system$index.log" | grep "$pattern" || true)"$'\n'
  done
  count=$(grep -c "$pattern" <<<"$logged" || true)
  local checks=0 check_pattern="finished the corruption check"
  [ "$system" = etcd ] && check_pattern="finished peer corruption check"
  for index in 1 2 3; do
    checks=$((checks + $(tail -n +"$((lines[index - 1] + 1))" "$data/$system$index.log" | grep -c "$check_pattern" || true)))
  done
  if [ "$system" = keel ]; then
    sizes=$(sed -n 's/.*bytes=\([0-9]*\).*/\1/p' <<<"$logged" | paste -sd, -)
  else
    sizes=$(etcdctl --endpoints="$endpoints" endpoint status -w json |
      python3 -c 'import json, sys; print(",".join(str(s["Status"].get("dbSize", 0)) for s in json.load(sys.stdin)))')
  fi
  python3 - "$system" "$run" "$json" "$term_before" "$term_after" "$count" "$sizes" "$load_before" \
    "$(cut -d' ' -f1 /proc/loadavg)" "$checks" <<'PYEOF'
import json, sys
system, run, report, term_before, term_after, count, sizes, load_before, load_after, checks = sys.argv[1:]
report = json.loads(report)
print(json.dumps({
    "system": system, "run": int(run),
    "ops_per_second": round(report["operations_per_second"]),
    "p50_ms": report["latency_milliseconds_p50"], "p99_ms": report["latency_milliseconds_p99"],
    "p999_ms": report["latency_milliseconds_p999"], "max_ms": report["latency_milliseconds_max"],
    "errors": report["errors"], "term_before": int(term_before), "term_after": int(term_after),
    "snapshots": int(count), "snapshot_bytes": sizes, "corruption_checks": int(checks),
    "load_average_1m": [float(load_before), float(load_after)],
}))
PYEOF
  for index in 1 2 3; do kill -9 "${member_pid[$system$index]}" 2>/dev/null || true; done
  if [ -n "${STALLS_LOGS:-}" ]; then
    mkdir -p "$STALLS_LOGS"
    for index in 1 2 3; do cp "$data/$system$index.log" "$STALLS_LOGS/$system-$run-$index.log"; done
  fi
  for index in 1 2 3; do
    wait "${member_pid[$system$index]}" 2>/dev/null || true
    unset "member_pid[$system$index]"
  done
  rm -rf "$data"
}

for run in $(seq 1 "$runs"); do
  for system in ${STALLS_SYSTEMS:-keel etcd}; do run_once "$system" "$run"; done
done
