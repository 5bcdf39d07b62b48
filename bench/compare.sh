#!/usr/bin/env bash
# Runs the same load against a three-member etcd, a three-member keel and a
# three-server ZooKeeper ensemble on loopback, one after the other, on this
# machine, and writes a side-by-side table to docs/BENCHMARKS.md. ZooKeeper
# (Debian's 3.8, forceSync on, its default tickTime) gets the operations it
# has: setData for put, sync + getData for a linearizable read, getData for a
# serializable one, driven by the same `keel bench --protocol zookeeper`. Both use fsync, heartbeat 100 ms and election
# timeout 1000 ms, snapshot count 100000 and separate data directories; both
# are started the same way (three server processes with the same flags).
#
# Besides throughput and latency it records, per system: server CPU seconds
# per workload (utime + stime of the three members, from /proc), the members'
# peak resident memory, failover time (kill -9 of the leader under write load
# until a write through the survivors succeeds), memory at one million keys and
# recovery time (kill -9 of a member holding them until it answers a read).
#
# The workloads run COMPARE_ROUNDS times (default 3), each round on fresh
# clusters of all three systems in turn, and the table shows the median round
# of each row (its ops/s, and the latency of that same round) with the range
# of ops/s over the rounds. Failover, memory and recovery are measured once.
# It also measures what bounds a single client's put: the disk's fdatasync
# latency (one 256-byte append and fdatasync, as a log append is) and a
# loopback TCP round trip.
#
# Usage: [COMPARE_ROUNDS=N] bench/compare.sh [REQUESTS_PER_RUN] [KEYS_FOR_MEMORY]
# Installs Debian's etcd-server and zookeeper when missing. Builds keel in release.
set -euo pipefail
cd "$(dirname "$0")/.."

requests=${1:-30000}
memory_keys=${2:-1000000}
rounds=${COMPARE_ROUNDS:-3}
work=$(mktemp -d)
declare -A member_pid=()
cleanup() {
  local status=$?
  for pid in "${member_pid[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  if [ "$status" -ne 0 ]; then
    # Keep the members' logs of a failed run where they can be read.
    mkdir -p target/compare-logs && cp "$work"/*.log target/compare-logs/ 2>/dev/null || true
    echo "failed; member logs are in target/compare-logs/" >&2
  fi
  rm -rf "$work"
}
trap cleanup EXIT

if ! command -v etcd >/dev/null 2>&1 || [ ! -f /usr/share/java/zookeeper.jar ]; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq etcd-server etcd-client zookeeper >/dev/null
fi
cargo build --release -p keel >/dev/null
keel=target/release/keel
clock_ticks_per_second=$(getconf CLK_TCK)
export ETCDCTL_API=3

# Client port of member INDEX (1..3) of SYSTEM; its peer port is one above.
# Below the kernel's ephemeral range (32768 and up), so that no outgoing
# connection can hold a member's port when it restarts; away from the tests'.
client_port() {
  case $1 in
    etcd) echo $((25369 + $2 * 10)) ;;
    keel) echo $((26369 + $2 * 10)) ;;
    zookeeper) echo $((24369 + $2 * 10)) ;;
  esac
}
endpoints_of() {
  local system=$1 list="" index
  for index in 1 2 3; do list="$list${list:+,}127.0.0.1:$(client_port "$system" "$index")"; done
  echo "$list"
}

# Starts ZooKeeper server INDEX (quorum and election ports one and two above its
# client port), with Debian's configuration but its own data directory.
start_zookeeper() {
  local index=$1 other port
  port=$(client_port zookeeper "$index")
  mkdir -p "$work/zookeeper$index"
  echo "$index" >"$work/zookeeper$index/myid"
  {
    echo "tickTime=2000"
    echo "initLimit=10"
    echo "syncLimit=5"
    echo "dataDir=$work/zookeeper$index"
    echo "clientPort=$port"
    echo "clientPortAddress=127.0.0.1"
    echo "forceSync=yes"
    echo "admin.enableServer=false"
    echo "maxClientCnxns=0"
    for other in 1 2 3; do
      local other_port
      other_port=$(client_port zookeeper "$other")
      echo "server.$other=127.0.0.1:$((other_port + 1)):$((other_port + 2))"
    done
  } >"$work/zookeeper$index.cfg"
  java -Dzookeeper.log.dir="$work" -cp /etc/zookeeper/conf:/usr/share/java/zookeeper.jar \
    org.apache.zookeeper.server.quorum.QuorumPeerMain "$work/zookeeper$index.cfg" \
    >>"$work/zookeeper$index.log" 2>&1 &
  member_pid[zookeeper$index]=$!
}

# Waits until the ensemble has a leader (a server says "Mode: leader"), bounded.
wait_for_zookeeper() {
  local index
  for _ in $(seq 1 600); do
    for index in 1 2 3; do
      if (exec 3<>"/dev/tcp/127.0.0.1/$(client_port zookeeper "$index")" && echo srvr >&3 && cat <&3) 2>/dev/null | grep -q "Mode: leader"; then
        return 0
      fi
    done
    sleep 0.1
  done
  echo "ZooKeeper elected no leader" >&2
  return 1
}

# Starts (or restarts, keeping its data) member INDEX of SYSTEM in the background.
start_member() {
  local system=$1 index=$2 cluster="" other
  for other in 1 2 3; do
    cluster="$cluster${cluster:+,}$system$other=http://127.0.0.1:$(($(client_port "$system" "$other") + 1))"
  done
  local port
  port=$(client_port "$system" "$index")
  local command=(etcd)
  [ "$system" = keel ] && command=("$keel" server)
  "${command[@]}" --name "$system$index" --data-dir "$work/$system$index" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$((port + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-cluster "$cluster" --initial-cluster-token "bench-$system" \
    --heartbeat-interval 100 --election-timeout 1000 --snapshot-count 100000 \
    >>"$work/$system$index.log" 2>&1 &
  member_pid[$system$index]=$!
}

# Waits until ENDPOINTS accept a write, i.e. have a leader (bounded).
wait_for_leader() {
  for _ in $(seq 1 300); do
    if etcdctl --endpoints="$1" --command-timeout=1s put bench-ready 1 >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  echo "no leader at $1" >&2
  return 1
}

# Waits until the member at ENDPOINT answers a read itself (bounded).
wait_for_member() {
  for _ in $(seq 1 600); do
    if etcdctl --endpoints="$1" --command-timeout=1s get --consistency=s bench-ready >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  echo "$1 does not answer" >&2
  return 1
}

# CPU seconds (user + system) the members of SYSTEM have used so far.
cpu_seconds() {
  local system=$1 ticks=0 index stat
  for index in 1 2 3; do
    stat=$(cat "/proc/${member_pid[$system$index]}/stat")
    stat=${stat##*) }
    # After the command name: field 12 is utime and 13 is stime (0-based here).
    read -r -a fields <<<"$stat"
    ticks=$((ticks + fields[11] + fields[12]))
  done
  python3 -c "print($ticks / $clock_ticks_per_second)"
}

# Largest resident set (or peak, with VmHWM) among the members of SYSTEM, in MiB.
memory_mib() {
  local system=$1 field=$2 largest=0 index kilobytes
  for index in 1 2 3; do
    kilobytes=$(awk -v field="$field:" '$1 == field { print $2 }' "/proc/${member_pid[$system$index]}/status")
    [ "$kilobytes" -gt "$largest" ] && largest=$kilobytes
  done
  echo $((largest / 1024))
}

# Runs one `keel bench` against SYSTEM and prints "name clients cpu_seconds json".
bench() {
  local system=$1 name=$2 clients=$3
  shift 3
  local before after json
  echo "$system: $name with $clients clients" >&2
  before=$(cpu_seconds "$system")
  local protocol=etcd
  [ "$system" = zookeeper ] && protocol=zookeeper
  json=$($keel bench --protocol "$protocol" --endpoints "$(endpoints_of "$system")" --clients "$clients" -o json "$@")
  after=$(cpu_seconds "$system")
  echo "$name $clients $(python3 -c "print(round($after - $before, 2))") $json"
}

# Every workload against one running cluster.
run_workloads() {
  local system=$1 clients total
  for clients in 1 16 64 256; do
    total=$requests
    [ "$clients" -eq 1 ] && total=$((requests / 10))
    bench "$system" put "$clients" --total "$total" put
  done
  for clients in 1 64; do
    total=$((requests * 2))
    [ "$clients" -eq 1 ] && total=$((requests / 10))
    bench "$system" range-linearizable "$clients" --total "$total" range
    bench "$system" range-serializable "$clients" --total "$total" range --serializable
  done
  # ZooKeeper has no compare-and-swap txn, watch fan-out or lease rows.
  [ "$system" = zookeeper ] && return 0
  for clients in 1 64; do
    total=$requests
    [ "$clients" -eq 1 ] && total=$((requests / 10))
    bench "$system" txn-compare-and-swap "$clients" --total "$total" txn
  done
  # Four writers, 1000 watchers on 20 streams: the row shows event delivery.
  bench "$system" watch-fan-out-1000-watchers 4 --total $((requests / 30)) watch --watchers 1000 --streams 20
  bench "$system" lease-grant-keep-alive 64 --total "$requests" lease
}

# The member index (1..3) that leads SYSTEM.
leader_index() {
  etcdctl --endpoints="$(endpoints_of "$1")" endpoint status -w json | python3 -c '
import json, sys
statuses = json.load(sys.stdin)
for position, status in enumerate(statuses):
    if status["Status"]["header"]["member_id"] == status["Status"]["leader"]:
        print(position + 1)
        break'
}

# Appends "failover MILLISECONDS" to the summary: from kill -9 of the leader,
# under write load, until a write through the two survivors succeeds. (Not
# called in a command substitution: it restarts a member, whose pid the
# cleanup must see.)
measure_failover() {
  local system=$1 leader survivors="" index
  echo "$system: failover" >&2
  leader=$(leader_index "$system")
  for index in 1 2 3; do
    [ "$index" -ne "$leader" ] && survivors="$survivors${survivors:+,}127.0.0.1:$(client_port "$system" "$index")"
  done
  $keel bench --endpoints "$survivors" --clients 16 --total 100000000 put >/dev/null 2>&1 &
  local load=$!
  sleep 2
  local killed_at
  killed_at=$(date +%s%N)
  kill -9 "${member_pid[$system$leader]}"
  until etcdctl --endpoints="$survivors" --command-timeout=300ms put failover-probe x >/dev/null 2>&1; do :; done
  local recovered_at
  recovered_at=$(date +%s%N)
  kill "$load" 2>/dev/null || true
  wait "$load" 2>/dev/null || true
  start_member "$system" "$leader"
  wait_for_leader "$(endpoints_of "$system")"
  wait_for_member "127.0.0.1:$(client_port "$system" "$leader")"
  echo "failover $(((recovered_at - killed_at) / 1000000))" >>"$work/$system.summary"
}

# Loads MEMORY_KEYS distinct keys, appends "million RESIDENT_MIB MILLISECONDS"
# to the summary: the largest member's resident memory, then the time from
# restarting a follower killed with -9 until it answers a serializable read.
measure_memory_and_recovery() {
  local system=$1
  echo "$system: $memory_keys keys, then recovery" >&2
  $keel bench --endpoints "$(endpoints_of "$system")" --clients 256 --total "$memory_keys" \
    --key-space-size "$memory_keys" --sequential-keys --value-size 64 put >/dev/null
  local resident
  resident=$(memory_mib "$system" VmRSS)
  local leader follower
  leader=$(leader_index "$system")
  follower=$((leader % 3 + 1))
  kill -9 "${member_pid[$system$follower]}"
  wait "${member_pid[$system$follower]}" 2>/dev/null || true
  local started_at
  started_at=$(date +%s%N)
  start_member "$system" "$follower"
  local endpoint="127.0.0.1:$(client_port "$system" "$follower")"
  until etcdctl --endpoints="$endpoint" --command-timeout=300ms get --consistency=s bench-ready >/dev/null 2>&1; do
    sleep 0.01
  done
  local answered_at
  answered_at=$(date +%s%N)
  echo "million $resident $(((answered_at - started_at) / 1000000))" >>"$work/$system.summary"
}

# Starts SYSTEM's three members on empty data directories, waits for a leader.
start_fresh() {
  local system=$1 index
  for index in 1 2 3; do
    rm -rf "${work:?}/$system$index"
    if [ "$system" = zookeeper ]; then start_zookeeper "$index"; else start_member "$system" "$index"; fi
  done
  if [ "$system" = zookeeper ]; then wait_for_zookeeper; else wait_for_leader "$(endpoints_of "$system")"; fi
}

stop_system() {
  local system=$1 index
  for index in 1 2 3; do kill -9 "${member_pid[$system$index]}" 2>/dev/null || true; done
  for index in 1 2 3; do wait "${member_pid[$system$index]}" 2>/dev/null || true; done
}

# One round of every workload on fresh clusters, one system at a time; the
# first round also records each system's peak memory during the workloads.
measure_round() {
  local round=$1 system
  for system in etcd keel zookeeper; do
    echo "round $round of $rounds: $system" >&2
    start_fresh "$system"
    run_workloads "$system" >"$work/$system.results.$round"
    [ "$round" -eq 1 ] && echo "peak $(memory_mib "$system" VmHWM)" >"$work/$system.summary"
    stop_system "$system"
  done
}

# Failover, then memory and recovery at MEMORY_KEYS, on a fresh cluster.
measure_failover_and_recovery() {
  local system=$1
  start_fresh "$system"
  measure_failover "$system"
  measure_memory_and_recovery "$system"
  stop_system "$system"
}

# Prints the p50 of 1000 fdatasyncs of a 256-byte append in the directory the
# members' data lives in, and of 1000 loopback TCP round trips, in ms.
measure_single_client_bounds() {
  python3 - "$work" <<'PYEOF'
import os, socket, statistics, sys, threading, time
work = sys.argv[1]
def p50(samples):
    return statistics.median(samples) * 1000
with open(os.path.join(work, "fdatasync-probe"), "ab") as file:
    samples = []
    for _ in range(1000):
        started = time.perf_counter()
        file.write(b"x" * 256)
        file.flush()
        os.fdatasync(file.fileno())
        samples.append(time.perf_counter() - started)
fdatasync = p50(samples)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
def echo():
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := connection.recv(64):
        connection.sendall(data)
threading.Thread(target=echo, daemon=True).start()
client = socket.create_connection(listener.getsockname())
client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
samples = []
for _ in range(1000):
    started = time.perf_counter()
    client.sendall(b"ping")
    client.recv(64)
    samples.append(time.perf_counter() - started)
print(f"{fdatasync:.3f} {p50(samples):.3f}")
PYEOF
}

measure_single_client_bounds >"$work/bounds"
for round in $(seq 1 "$rounds"); do measure_round "$round"; done
measure_failover_and_recovery etcd
measure_failover_and_recovery keel

python3 - "$work" "$requests" "$memory_keys" "$rounds" <<'PYEOF'
import json, sys, platform, subprocess, datetime
work, requests, memory_keys, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def rate(report):
    # A watch row is about events delivered, not the puts that caused them.
    measured = report.get("watch") or report
    return measured.get("events_per_second", measured.get("operations_per_second"))
def results(system):
    """Per row: (name, clients, cpu, report) of the median round, and the
    lowest and highest rate over the rounds."""
    runs = []
    for round in range(1, rounds + 1):
        run = []
        for line in open(f"{work}/{system}.results.{round}").read().splitlines():
            name, clients, cpu, report = line.split(" ", 3)
            run.append((name, clients, float(cpu), json.loads(report)))
        runs.append(run)
    rows = []
    for row_runs in zip(*runs):
        ordered = sorted(row_runs, key=lambda row: rate(row[3]))
        rates = [rate(row[3]) for row in ordered]
        rows.append((*ordered[len(ordered) // 2], min(rates), max(rates)))
    return rows
def summary(system):
    return {line.split()[0]: line.split()[1:] for line in open(f"{work}/{system}.summary")}
etcd, keel = results("etcd"), results("keel")
zookeeper = {(name, clients): (cpu, report, low, high) for name, clients, cpu, report, low, high in results("zookeeper")}
etcd_summary, keel_summary, zookeeper_summary = summary("etcd"), summary("keel"), summary("zookeeper")
etcd_version = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
keel_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
zookeeper_version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "zookeeper"], capture_output=True, text=True).stdout.strip()
cpus = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
lines = [
    "# keel, etcd and ZooKeeper side by side",
    "",
    f"Written by `COMPARE_ROUNDS={rounds} bench/compare.sh {requests} {memory_keys}` on {datetime.date.today()}: {cpus} cores, {platform.platform()};",
    f"{etcd_version}; keel at commit {keel_commit}; ZooKeeper {zookeeper_version} (Debian). Three members each on loopback, fsync on,",
    "heartbeat 100 ms, election timeout 1000 ms, snapshot count 100000 (ZooKeeper: forceSync=yes, tickTime 2000),",
    "one cluster at a time, the same `keel bench` client (`--protocol zookeeper` for ZooKeeper: put is setData,",
    "range-linearizable is sync + getData, range-serializable is getData; ZooKeeper has no row where it has no",
    "such operation). CPU is the three servers' user + system seconds during the run",
    "(the client shares the machine's cores and is not counted). A txn operation is a read and a",
    "compare-and-swap txn; a lease operation is a grant and one keep-alive round trip; the watch",
    "row counts events delivered to watchers and their delivery latency.",
    f"Every row is the median of {rounds} rounds, each on fresh clusters of the three systems in turn:",
    "its ops/s (with the lowest and highest of the rounds), and the latency and CPU of that median round.",
    "",
    "| workload | clients | etcd ops/s | keel ops/s | ZooKeeper ops/s | keel / etcd | keel / ZooKeeper | etcd p50 / p99 ms | keel p50 / p99 ms | ZooKeeper p50 / p99 ms | server CPU s etcd / keel / ZooKeeper | errors etcd / keel / ZooKeeper |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]
def shown(report):
    measured = report.get("watch") or report
    return rate(report), measured["latency_milliseconds_p50"], measured["latency_milliseconds_p99"]
def spread(median, low, high):
    return f"{median:.0f} ({low:.0f}–{high:.0f})" if rounds > 1 else f"{median:.0f}"
single_client_put = None
for (name, clients, etcd_cpu, e, etcd_low, etcd_high), (_, _, keel_cpu, k, keel_low, keel_high) in zip(etcd, keel):
    (etcd_rate, etcd_p50, etcd_p99), (keel_rate, keel_p50, keel_p99) = shown(e), shown(k)
    if (name, clients) == ("put", "1"):
        single_client_put = (keel_p50, etcd_p50)
    ratio = keel_rate / etcd_rate if etcd_rate else float("inf")
    if (name, clients) in zookeeper:
        zookeeper_cpu, z, zookeeper_low, zookeeper_high = zookeeper[(name, clients)]
        zookeeper_rate, zookeeper_p50, zookeeper_p99 = shown(z)
        zookeeper_cells = (
            spread(zookeeper_rate, zookeeper_low, zookeeper_high),
            f"{keel_rate / zookeeper_rate:.2f}x" if zookeeper_rate else "-",
            f"{zookeeper_p50:.2f} / {zookeeper_p99:.2f}",
            f"{zookeeper_cpu:.1f}",
            f"{z['errors']}",
        )
    else:
        zookeeper_cells = ("-", "-", "-", "-", "-")
    lines.append(
        f"| {name} | {clients} | {spread(etcd_rate, etcd_low, etcd_high)} | {spread(keel_rate, keel_low, keel_high)} | {zookeeper_cells[0]} | {ratio:.2f}x | {zookeeper_cells[1]} "
        f"| {etcd_p50:.2f} / {etcd_p99:.2f} "
        f"| {keel_p50:.2f} / {keel_p99:.2f} "
        f"| {zookeeper_cells[2]} "
        f"| {etcd_cpu:.1f} / {keel_cpu:.1f} / {zookeeper_cells[3]} "
        f"| {e['errors']} / {k['errors']} / {zookeeper_cells[4]} |"
    )
def both(title, etcd_value, keel_value, unit):
    lines.append(f"| {title} | {etcd_value} {unit} | {keel_value} {unit} |")
fdatasync_p50, round_trip_p50 = (float(value) for value in open(f"{work}/bounds").read().split())
bound = fdatasync_p50 + round_trip_p50
keel_put_p50, etcd_put_p50 = single_client_put
lines += [
    "",
    f"What bounds one client's put on this machine: a 256-byte append and fdatasync takes {fdatasync_p50:.3f} ms",
    f"(p50 of 1000, in the members' data directory) and a loopback TCP round trip {round_trip_p50:.3f} ms (p50 of 1000,",
    f"Python), {bound:.3f} ms together. keel's single-client put p50 is {keel_put_p50:.2f} ms, {keel_put_p50 / bound:.2f}x that",
    f"(etcd's {etcd_put_p50:.2f} ms, {etcd_put_p50 / bound:.2f}x).",
]
lines += ["", "| measure | etcd | keel |", "|---|---|---|"]
both("peak resident memory of a member during the workloads above", etcd_summary["peak"][0], keel_summary["peak"][0], "MiB")
both("failover: kill -9 of the leader under 16 writers until a write succeeds", etcd_summary["failover"][0], keel_summary["failover"][0], "ms")
both(f"resident memory of a member at {memory_keys:,} keys (64-byte values)", etcd_summary["million"][0], keel_summary["million"][0], "MiB")
both(f"recovery: restart after kill -9 of a member holding {memory_keys:,} keys until it answers a read", etcd_summary["million"][1], keel_summary["million"][1], "ms")
lines += ["", f"The largest ZooKeeper server's peak resident memory during its workloads was {zookeeper_summary['peak'][0]} MiB (JVM defaults)."]
lines += [
    "",
    "Failover is measured with etcdctl probes in a tight loop (each a process start, so the",
    "resolution is a few tens of milliseconds). Recovery polls the restarted member every 10 ms.",
]
with open("docs/BENCHMARKS.md") as existing:
    text = existing.read()
# Only the top section (up to the first "## " heading) is this script's; the
# sections after it (micro-benchmarks, stalls, workloads, ...) are kept.
marker = "\n## "
kept = text[text.index(marker):] if marker in text else ""
open("docs/BENCHMARKS.md", "w").write("\n".join(lines) + "\n" + kept)
print("\n".join(lines))
PYEOF
