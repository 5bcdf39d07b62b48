#!/usr/bin/env bash
# Runs the same load against a three-member etcd and a three-member keel on
# loopback, one after the other, on this machine, and writes a side-by-side
# table to docs/BENCHMARKS.md. Both use fsync, heartbeat 100 ms and election
# timeout 1000 ms, with separate data directories.
#
# Usage: bench/compare.sh [REQUESTS_PER_RUN]
# Installs Debian's etcd-server when etcd is missing. Builds keel in release.
set -euo pipefail
cd "$(dirname "$0")/.."

requests=${1:-30000}
work=$(mktemp -d)
keel_pid=""
etcd_pids=()
# Stops the etcd members this script started (by pid: other etcds on this
# machine are not ours to stop).
stop_etcd() {
  for pid in "${etcd_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  etcd_pids=()
}
cleanup() {
  stop_etcd
  if [ -n "$keel_pid" ]; then kill -TERM "$keel_pid" 2>/dev/null || true; wait "$keel_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

if ! command -v etcd >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq etcd-server >/dev/null
fi
cargo build --release -p keel >/dev/null
keel=target/release/keel

# Waits until a cluster accepts a write, i.e. has a leader (bounded).
wait_for_leader() {
  for _ in $(seq 1 300); do
    if ETCDCTL_API=3 etcdctl --endpoints="$1" --command-timeout=1s put bench-ready 1 >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  echo "no leader at $1" >&2
  return 1
}

# Runs every workload against one cluster; prints "workload clients json" lines.
run_workloads() {
  local endpoints=$1
  for clients in 1 16 64 256; do
    local total=$requests
    [ "$clients" -eq 1 ] && total=$((requests / 10))
    echo "put $clients $($keel bench --endpoints "$endpoints" --clients "$clients" --total "$total" -o json put)"
  done
  for clients in 1 64; do
    local total=$((requests * 2))
    [ "$clients" -eq 1 ] && total=$((requests / 10))
    echo "range-linearizable $clients $($keel bench --endpoints "$endpoints" --clients "$clients" --total "$total" -o json range)"
    echo "range-serializable $clients $($keel bench --endpoints "$endpoints" --clients "$clients" --total "$total" -o json range --serializable)"
  done
  # Compare-and-swap on 1,000 keys: conflicts are counted apart from errors.
  echo "txn 16 $($keel bench --endpoints "$endpoints" --clients 16 --total "$requests" --key-space-size 1000 -o json txn)"
  echo "lease 16 $($keel bench --endpoints "$endpoints" --clients 16 --total "$requests" -o json lease --keep-alives 1)"
  # One writer at 500 puts/s, 100 watchers on 10 streams: the row shows events.
  echo "watch 1 $($keel bench --endpoints "$endpoints" --total $((requests / 10)) --rate 500 -o json watch --watchers 100 --streams 10)"
}

# etcd: three members on loopback.
cluster="bench-etcd1=http://127.0.0.1:27380,bench-etcd2=http://127.0.0.1:37380,bench-etcd3=http://127.0.0.1:47380"
for index in 1 2 3; do
  port=$((17379 + index * 10000))
  etcd --name "bench-etcd$index" --data-dir "$work/etcd$index" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$((port + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-cluster "$cluster" --heartbeat-interval 100 --election-timeout 1000 \
    >"$work/etcd$index.log" 2>&1 &
  etcd_pids+=($!)
done
etcd_endpoints=127.0.0.1:27379,127.0.0.1:37379,127.0.0.1:47379
wait_for_leader "$etcd_endpoints"
run_workloads "$etcd_endpoints" >"$work/etcd.results"
stop_etcd

# keel: three members on loopback (keel dev).
$keel dev --data-dir "$work/keel" --base-port 28379 >"$work/keel-dev.log" 2>&1 &
keel_pid=$!
keel_endpoints=127.0.0.1:28379,127.0.0.1:38379,127.0.0.1:48379
wait_for_leader "$keel_endpoints"
run_workloads "$keel_endpoints" >"$work/keel.results"

python3 - "$work/etcd.results" "$work/keel.results" "$requests" <<'PYEOF'
import json, sys, platform, subprocess, datetime
etcd = [line.split(" ", 2) for line in open(sys.argv[1]).read().splitlines()]
keel = [line.split(" ", 2) for line in open(sys.argv[2]).read().splitlines()]
etcd_version = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
keel_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpus = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
lines = [
    "# keel and etcd side by side",
    "",
    f"Written by `bench/compare.sh {sys.argv[3]}` on {datetime.date.today()}: {cpus} cores, {platform.platform()};",
    f"{etcd_version}; keel at commit {keel_commit}. Three members each on loopback, fsync on,",
    "heartbeat 100 ms, election timeout 1000 ms, one cluster at a time, the same `keel bench` client.",
    "",
    "| workload | clients | etcd ops/s | keel ops/s | ratio | etcd p50 / p99 ms | keel p50 / p99 ms | errors etcd / keel |",
    "|---|---|---|---|---|---|---|---|",
]
def figures(report):
    """Rate and latency of a row: a watch row shows delivered events, not puts."""
    if "watch" in report:
        watch = report["watch"]
        return watch["events_per_second"], watch["latency_milliseconds_p50"], watch["latency_milliseconds_p99"]
    return report["operations_per_second"], report["latency_milliseconds_p50"], report["latency_milliseconds_p99"]
for (workload, clients, etcd_json), (_, _, keel_json) in zip(etcd, keel):
    e, k = json.loads(etcd_json), json.loads(keel_json)
    (e_rate, e_p50, e_p99), (k_rate, k_p50, k_p99) = figures(e), figures(k)
    if workload == "watch":
        workload = "watch events (100 watchers)"
    lines.append(
        f"| {workload} | {clients} | {e_rate:.0f} | {k_rate:.0f} | {k_rate / e_rate:.2f}x "
        f"| {e_p50:.2f} / {e_p99:.2f} | {k_p50:.2f} / {k_p99:.2f} "
        f"| {e['errors']} / {k['errors']} |"
    )
lines += [
    "",
    "txn is a compare-and-swap (a read, then a txn on its mod revision); lease is a grant and one",
    "keep-alive; watch is one writer at 500 puts/s and delivery latency from each put's send time.",
    "Not yet measured here: failover and recovery time, memory at one million keys (issue 6).",
]
open("docs/BENCHMARKS.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
