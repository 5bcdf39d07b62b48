#!/usr/bin/env bash
# Workload measurements (issue 12) on loopback: three members, three agents
# (node TTL 3 s), each agent a supervisor and a would-be controller.
#  1. placement throughput (measured last): a job of 1,000 `sleep` allocations over the 3
#     nodes, from `keel job run --detach` to 1,000 allocations in the store
#     (and to 1,000 reported running);
#  2. node kill → replacement passing, over N runs: three
#     `python3 -m http.server` instances (readiness check, lost_after 2 s);
#     an agent not running the controller is killed (-9) with its tasks;
#     time until 3 instances pass again, none on the killed node (what DNS
#     answers); the agent is restarted and the cluster settles between runs;
#  3. controller failover, over 3 runs: the agent running the controller is
#     killed (-9); time until another agent holds the election.
# Usage: bench/workloads.sh [path/to/keel] [runs]   (ports 31400-31479)
set -euo pipefail
keel=${1:-target/release/keel}
runs=${2:-10}
dir=$(mktemp -d)
declare -A agent_pid
member_pids=()
cleanup() {
  # Stopping the jobs first lets the supervisors end their tasks; the agents
  # and members are then killed by PID.
  for job in many web; do timeout 10 "$keel" job stop "$job" --agent-addr "$(addr "$(live_agent)")" >/dev/null 2>&1 || true; done
  sleep 5
  for pid in "${agent_pid[@]}" "${member_pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  if [ -n "${KEEP_LOGS_IN:-}" ]; then mkdir -p "$KEEP_LOGS_IN" && cp "$dir"/*.log "$KEEP_LOGS_IN/"; fi
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'echo "bench/workloads.sh: failed at line $LINENO" >&2' ERR
now() { date +%s.%N; }
endpoints=127.0.0.1:31400,127.0.0.1:31402,127.0.0.1:31404
initial=m1=http://127.0.0.1:31401,m2=http://127.0.0.1:31403,m3=http://127.0.0.1:31405
for index in 1 2 3; do
  client=$((31400 + 2 * (index - 1))); peer=$((client + 1))
  "$keel" server --name "m$index" --data-dir "$dir/m$index" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "$initial" 2>"$dir/m$index.log" &
  member_pids+=($!)
done
start_agent() { # index 1..3
  local index=$1 http=$((31410 + 3 * ($1 - 1)))
  local join=()
  for other in 1 2 3; do [ "$other" = "$index" ] || join+=("127.0.0.1:$((31412 + 3 * (other - 1)))"); done
  "$keel" agent --name "node$index" --endpoints "$endpoints" --data-dir "$dir/node$index" --node-ttl 3s \
    --http-addr "127.0.0.1:$http" --dns-addr "127.0.0.1:$((http + 1))" --gossip-addr "127.0.0.1:$((http + 2))" \
    --join "$(IFS=,; echo "${join[*]}")" --dynamic-ports "$((31420 + 20 * (index - 1)))-$((31439 + 20 * (index - 1)))" \
    2>>"$dir/node$index.log" >/dev/null &
  agent_pid[$index]=$!
  until curl -sf "http://127.0.0.1:$http/v1/agent/self" >/dev/null; do sleep 0.1; done
}
sleep 2
for index in 1 2 3; do start_agent "$index"; done
addr() { echo "127.0.0.1:$((31410 + 3 * ($1 - 1)))"; }
controller() { etcdctl --endpoints="$endpoints" get --prefix /keel/controller/ --sort-by=CREATE --order=ASCEND --print-value-only 2>/dev/null | head -1 || true; }
until [ -n "$(controller)" ]; do sleep 0.2; done
live_agent() { for index in 1 2 3; do if kill -0 "${agent_pid[$index]}" 2>/dev/null; then echo "$index"; return; fi; done; }
allocations() { curl -sf "http://$(addr "$(live_agent)")/v1/job/$1"; }
python_percentiles() { python3 -c 'import sys, statistics; v = sorted(float(x) for x in sys.argv[1:]); print(f"p50 {statistics.median(v):.2f} s, max {v[-1]:.2f} s over {len(v)} runs")' "$@"; }

# 2. Node kill → replacement passing.
sed -e 's/lost_after = "10s"/lost_after = "2s"/' -e 's/stop_on_client_after = "15s"/stop_on_client_after = "4s"/' \
  -e 's/interval = "2s"/interval = "300ms"/' -e 's/timeout = "1s"/timeout = "300ms"/' examples/jobs/web.toml >"$dir/web.toml"
"$keel" job run "$dir/web.toml" --detach --agent-addr "$(addr 1)" >/dev/null
passing_nodes() { curl -sf "http://$(addr "$(live_agent)")/v1/health/service/web?passing" | jq -r '.[].Node.Node' | sort | tr '\n' ' ' || true; }
count_words() { echo $#; }
samples=()
for run in $(seq "$runs"); do
  until [ "$(count_words $(passing_nodes))" = 3 ]; do sleep 0.1; done
  leader=$(controller)
  victim=""
  for index in 1 2 3; do
    if [ "node$index" != "$leader" ] && passing_nodes | grep -q "node$index"; then victim=$index; break; fi
  done
  pgids=$(allocations web | jq -r --arg node "node$victim" '.allocations[] | select(.node == $node and .desired_status.status == "run") | (.status.tasks // {})[] | .pid // empty' || true)
  killed=$(now)
  kill -9 "${agent_pid[$victim]}"; for pgid in $pgids; do kill -9 -- "-$pgid" 2>/dev/null || true; done
  while true; do
    nodes=$(passing_nodes)
    if [ "$(count_words $nodes)" = 3 ] && ! echo "$nodes" | grep -q "node$victim"; then break; fi
    sleep 0.05
  done
  replaced=$(now)
  samples+=("$(python3 -c "print($replaced - $killed)")")
  python3 -c "print(f'run $run: node$victim killed, 3 passing again after {$replaced - $killed:.2f} s')"
  start_agent "$victim"
  sleep 3
done
echo "node kill → replacement passing: $(python_percentiles "${samples[@]}")"

# 3. Controller failover.
failovers=()
for run in 1 2 3; do
  leader=$(controller); index=${leader#node}
  killed=$(now); kill -9 "${agent_pid[$index]}"
  until [ -n "$(controller)" ] && [ "$(controller)" != "$leader" ]; do sleep 0.05; done
  elected=$(now)
  failovers+=("$(python3 -c "print($elected - $killed)")")
  echo "failover $run: $leader killed, $(controller) elected after $(python3 -c "print(f'{$elected - $killed:.2f}')") s"
  start_agent "$index"
  sleep 5
done
echo "controller failover: $(python_percentiles "${failovers[@]}")"
"$keel" job stop web --agent-addr "$(addr "$(live_agent)")" >/dev/null

# 1. Placement throughput (last: 1,000 tasks starting load the machine).
cat >"$dir/many.toml" <<'JOB'
name = "many"
[group.many]
count = 1000
[group.many.disconnect]
lost_after = "1m"
[group.many.task.main]
config = { command = "sleep", args = ["3600"] }
resources = { cpu_millicores = 1, memory_mib = 16 }
JOB
started=$(now)
"$keel" job run "$dir/many.toml" --detach --agent-addr "$(addr 1)" >/dev/null
until [ "$(etcdctl --endpoints="$endpoints" get --prefix /keel/allocs/ --keys-only -w json | jq ".count // 0")" -ge 1000 ]; do sleep 0.05; done
placed=$(now)
python3 -c "print(f'placement: 1000 allocations in the store {$placed - $started:.2f} s after keel job run ({1000 / ($placed - $started):.0f} placements/s)')"
grep -h "plan written" "$dir"/node*.log | grep "placements=1000" | sed 's/^/  controller log: /' | cut -c1-220 || true
until [ "$(allocations many | jq '[.allocations[] | select(.client.status == "running")] | length' || echo 0)" -ge 1000 ]; do sleep 0.5; done
running=$(now)
python3 -c "print(f'placement: all 1000 running {$running - $started:.2f} s after keel job run')"
"$keel" job stop many --agent-addr "$(addr 1)" >/dev/null
until [ "$(allocations many | jq '[.allocations[] | select(.client.status == "running")] | length' || echo 1)" = 0 ]; do sleep 0.5; done

