#!/usr/bin/env bash
# Measures what metrics cost on the write path: `keel bench put` throughput
# against a three-member cluster of a keel built before metrics existed
# (BEFORE, a `keel` binary) and of this tree's release build with every
# member's /metrics scraped once a second (fifteen times Prometheus's default
# rate), RUNS times each, alternating so that a change in the machine's load
# hits both alike. Prints each run and a table of medians in Markdown: puts per
# second, and the members' CPU time per put (user + system, from /proc), which
# a busy machine disturbs less than throughput.
#
# Usage: [AFTER=keel-binary] bench/metrics-cost.sh BEFORE [RUNS] [SECONDS] [CLIENTS...]
#   e.g. bench/metrics-cost.sh /tmp/keel-before 3 10 1 64
# Each run starts a fresh cluster (fsync on, heartbeat 100 ms, election
# timeout 1000 ms) on ports 27600-27629 and removes it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

before=${1:?usage: bench/metrics-cost.sh BEFORE [RUNS] [SECONDS] [CLIENTS...]}
runs=${2:-3}
seconds=${3:-10}
shift $(($# < 3 ? $# : 3))
clients_list=("$@")
[ ${#clients_list[@]} -gt 0 ] || clients_list=(1 64)
# AFTER names an already built binary of this tree; otherwise it is built.
after=${AFTER:-target/release/keel}
[ -n "${AFTER:-}" ] || cargo build --release -p keel >/dev/null
work=$(mktemp -d)
member_pids=()
scraper_pid=""
stop_cluster() {
  [ -n "$scraper_pid" ] && kill "$scraper_pid" 2>/dev/null && wait "$scraper_pid" 2>/dev/null || true
  scraper_pid=""
  for pid in "${member_pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for pid in "${member_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  member_pids=()
  rm -rf "${work:?}"/member*
}
trap 'stop_cluster; rm -rf "$work"' EXIT

# Starts three members of BINARY (with metrics listeners when WITH_METRICS=1)
# and waits until they accept a write.
start_cluster() {
  local binary=$1 with_metrics=$2 index cluster=""
  for index in 1 2 3; do
    cluster="$cluster${cluster:+,}member$index=http://127.0.0.1:$((27600 + index * 10 + 1))"
  done
  for index in 1 2 3; do
    local port=$((27600 + index * 10)) extra=()
    [ "$with_metrics" = 1 ] && extra=(--listen-metrics-urls "http://127.0.0.1:$((port + 2))")
    "$binary" server --name "member$index" --data-dir "$work/member$index" \
      --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
      --listen-peer-urls "http://127.0.0.1:$((port + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
      --initial-cluster "$cluster" --initial-cluster-token bench-metrics \
      --heartbeat-interval 100 --election-timeout 1000 "${extra[@]}" \
      >>"$work/member$index.log" 2>&1 &
    member_pids+=($!)
  done
  for _ in $(seq 1 300); do
    if "$after" kv --endpoints "$(endpoints)" put bench-ready 1 >/dev/null 2>&1; then
      if [ "$with_metrics" = 1 ]; then
        (while true; do
          for index in 1 2 3; do
            curl -s -o /dev/null "http://127.0.0.1:$((27600 + index * 10 + 2))/metrics" || true
          done
          sleep 1
        done) &
        scraper_pid=$!
      fi
      return 0
    fi
    sleep 0.1
  done
  echo "no leader; logs in $work" >&2
  return 1
}
endpoints() { echo "127.0.0.1:27610,127.0.0.1:27620,127.0.0.1:27630"; }

# CPU seconds (user + system) the running members have used so far: on a
# shared machine a steadier measure of cost than throughput.
members_cpu_seconds() {
  local ticks=0 pid stat
  for pid in "${member_pids[@]}"; do
    stat=$(cat "/proc/$pid/stat")
    stat=${stat##*) }
    read -r -a fields <<<"$stat"
    ticks=$((ticks + fields[11] + fields[12]))
  done
  python3 -c "print($ticks / $(getconf CLK_TCK))"
}

results="$work/results"
: >"$results"
for run in $(seq 1 "$runs"); do
  for clients in "${clients_list[@]}"; do
    for variant in before after; do
      if [ "$variant" = before ]; then start_cluster "$before" 0; else start_cluster "$after" 1; fi
      cpu_before=$(members_cpu_seconds)
      report=$("$after" bench --endpoints "$(endpoints)" --clients "$clients" --duration "${seconds}s" -o json put)
      cpu_after=$(members_cpu_seconds)
      stop_cluster
      read -r rate cpu_per_put < <(python3 -c '
import json, sys
report = json.loads(sys.argv[1])
puts = max(report["operations"], 1)
print(round(report["operations_per_second"]), round((float(sys.argv[3]) - float(sys.argv[2])) * 1e6 / puts))
' "$report" "$cpu_before" "$cpu_after")
      echo "run $run clients $clients $variant: $rate puts/s, $cpu_per_put server CPU us/put (load $(cut -d' ' -f1 /proc/loadavg))" >&2
      echo "$clients $variant $rate $cpu_per_put" >>"$results"
    done
  done
done

python3 - "$results" "$runs" "$seconds" <<'PYEOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
runs, seconds = sys.argv[2], sys.argv[3]
print("| clients | before: puts/s, median (runs) | after, scraped every 1 s: puts/s, median (runs) | after / before | server CPU µs per put, before / after (medians) |")
print("|---|---|---|---|---|")
for clients in dict.fromkeys(row[0] for row in rows):
    def column(variant, field):
        return [int(r[field]) for r in rows if r[0] == clients and r[1] == variant]
    before, after = column("before", 2), column("after", 2)
    mb, ma = statistics.median(before), statistics.median(after)
    cb, ca = statistics.median(column("before", 3)), statistics.median(column("after", 3))
    print(f"| {clients} | {mb:.0f} ({', '.join(map(str, before))}) | {ma:.0f} ({', '.join(map(str, after))}) | {ma / mb:.3f} | {cb:.0f} / {ca:.0f} |")
PYEOF
