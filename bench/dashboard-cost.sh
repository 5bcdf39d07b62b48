#!/usr/bin/env bash
# Measures what the agents' observers (issue 13: each agent polls every
# member's Status, /readyz and the membership every second, scrapes every
# member's /metrics every 2 s and times a linearizable read, for the events
# log, the dashboard and its metrics) cost the members on the write path:
# `keel bench put` throughput against a three-member cluster without agents
# and with three agents, RUNS times each, alternating so that a change in the
# machine's load hits both alike. Prints each run (with the load average) and
# a Markdown table of medians: puts per second, the members' CPU time per put
# (user + system, from /proc), and the members' CPU use while idle (before
# the load: what the observers' polls alone cost them).
#
# Usage: [MEMBER=keel-binary] [AGENT=keel-binary] bench/dashboard-cost.sh [RUNS] [SECONDS] [CLIENTS...]
#   e.g. MEMBER=target/release/keel AGENT=target/debug/keel bench/dashboard-cost.sh 3 8 1 16
# Ports 31800-31849 (members 318x0-318x1, agents 31840-31848).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-3}
seconds=${2:-8}
shift $(($# < 2 ? $# : 2))
clients_list=("$@")
[ ${#clients_list[@]} -gt 0 ] || clients_list=(1 16)
member=${MEMBER:-target/release/keel}
agent=${AGENT:-$member}
# Seconds the members are watched idle (before each load) for their CPU use.
idle_seconds=${IDLE_SECONDS:-5}
work=$(mktemp -d)
member_pids=()
agent_pids=()
stop_cluster() {
  for pid in "${agent_pids[@]}" "${member_pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for pid in "${agent_pids[@]}" "${member_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  member_pids=()
  agent_pids=()
  rm -rf "${work:?}"/member* "${work:?}"/agent*
}
trap 'stop_cluster; rm -rf "$work"' EXIT

endpoints() { echo "127.0.0.1:31810,127.0.0.1:31820,127.0.0.1:31830"; }

# Starts three members (and three agents when WITH_AGENTS=1), waits until
# the cluster accepts a write and every agent is ready.
start_cluster() {
  local with_agents=$1 index cluster=""
  for index in 1 2 3; do
    cluster="$cluster${cluster:+,}member$index=http://127.0.0.1:$((31800 + index * 10 + 1))"
  done
  for index in 1 2 3; do
    local port=$((31800 + index * 10))
    "$member" server --name "member$index" --data-dir "$work/member$index" \
      --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
      --listen-peer-urls "http://127.0.0.1:$((port + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
      --initial-cluster "$cluster" --initial-cluster-token bench-dashboard \
      --heartbeat-interval 100 --election-timeout 1000 \
      >>"$work/member$index.log" 2>&1 &
    member_pids+=($!)
  done
  local ready=0
  for _ in $(seq 1 300); do
    if "$member" kv --endpoints "$(endpoints)" put bench-ready 1 >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.1
  done
  [ "$ready" = 1 ] || { echo "no leader; logs in $work" >&2; return 1; }
  [ "$with_agents" = 1 ] || return 0
  for index in 0 1 2; do
    local http=$((31840 + 3 * index)) join=""
    for other in 0 1 2; do
      [ "$other" = "$index" ] || join="$join${join:+,}127.0.0.1:$((31842 + 3 * other))"
    done
    "$agent" agent --name "agent$index" --endpoints "$(endpoints)" --data-dir "$work/agent$index" \
      --http-addr "127.0.0.1:$http" --dns-addr "127.0.0.1:$((http + 1))" \
      --gossip-addr "127.0.0.1:$((http + 2))" --join "$join" >>"$work/agent$index.log" 2>&1 &
    agent_pids+=($!)
  done
  for index in 0 1 2; do
    for _ in $(seq 1 300); do
      curl -sf -o /dev/null "http://127.0.0.1:$((31840 + 3 * index))/readyz" && break
      sleep 0.1
    done
  done
  # Let the observers open their connections and take their first samples.
  sleep 3
}

# CPU seconds (user + system) the running members have used so far.
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
    for variant in without with; do
      if [ "$variant" = without ]; then start_cluster 0; else start_cluster 1; fi
      # Idle first: the members' CPU with nothing but the observers' polls.
      cpu_idle_start=$(members_cpu_seconds)
      sleep "$idle_seconds"
      idle_millicores=$(python3 -c "print(round(($(members_cpu_seconds) - $cpu_idle_start) * 1000 / $idle_seconds))")
      cpu_before=$(members_cpu_seconds)
      report=$("$member" bench --endpoints "$(endpoints)" --clients "$clients" --duration "${seconds}s" -o json put)
      cpu_after=$(members_cpu_seconds)
      stop_cluster
      read -r rate cpu_per_put < <(python3 -c '
import json, sys
report = json.loads(sys.argv[1])
puts = max(report["operations"], 1)
print(round(report["operations_per_second"]), round((float(sys.argv[3]) - float(sys.argv[2])) * 1e6 / puts))
' "$report" "$cpu_before" "$cpu_after")
      echo "run $run clients $clients $variant agents: $rate puts/s, $cpu_per_put member CPU us/put, idle members $idle_millicores millicores (load $(cut -d' ' -f1 /proc/loadavg))" >&2
      echo "$clients $variant $rate $cpu_per_put $idle_millicores" >>"$results"
    done
  done
done

python3 - "$results" <<'PYEOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
print("| clients | without agents: puts/s, median (runs) | with three agents observing: puts/s, median (runs) | with / without | member CPU µs per put, without / with (medians) | idle members' CPU, millicores, without / with (medians) |")
print("|---|---|---|---|---|---|")
for clients in dict.fromkeys(row[0] for row in rows):
    def column(variant, field):
        return [int(r[field]) for r in rows if r[0] == clients and r[1] == variant]
    without, with_ = column("without", 2), column("with", 2)
    mw, ma = statistics.median(without), statistics.median(with_)
    cw, ca = statistics.median(column("without", 3)), statistics.median(column("with", 3))
    iw, ia = statistics.median(column("without", 4)), statistics.median(column("with", 4))
    print(f"| {clients} | {mw:.0f} ({', '.join(map(str, without))}) | {ma:.0f} ({', '.join(map(str, with_))}) | {ma / mw:.3f} | {cw:.0f} / {ca:.0f} | {iw:.0f} / {ia:.0f} |")
PYEOF
