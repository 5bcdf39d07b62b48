#!/usr/bin/env bash
# Measures one keel agent at steady state: a one-member cluster, one agent
# with 100 services × 1 HTTP check every 10 s (against a local HTTP server).
# After a warm-up, it counts store revisions over 60 s (every store write
# makes one revision and nothing else writes), samples the agent's CPU time
# and RSS, and measures DNS queries per second with one UDP client.
# Usage: bench/agent_steady_state.sh [path/to/keel]   (ports 25900-25905)
set -euo pipefail
keel=${1:-target/release/keel}
dir=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

"$keel" server --name m1 --data-dir "$dir/m1" \
  --listen-client-urls http://127.0.0.1:25900 --advertise-client-urls http://127.0.0.1:25900 \
  --listen-peer-urls http://127.0.0.1:25901 --initial-advertise-peer-urls http://127.0.0.1:25901 \
  --initial-cluster m1=http://127.0.0.1:25901 2>"$dir/m1.log" & pids+=($!)
python3 -m http.server 25902 --bind 127.0.0.1 --directory "$dir" >/dev/null 2>&1 & pids+=($!)
sleep 2
"$keel" agent --name bench --endpoints 127.0.0.1:25900 --data-dir "$dir/agent" \
  --http-addr 127.0.0.1:25903 --dns-addr 127.0.0.1:25904 --gossip-addr 127.0.0.1:25905 \
  2>"$dir/agent.log" >/dev/null & agent=$!; pids+=($agent)
for _ in $(seq 100); do curl -sf http://127.0.0.1:25903/v1/agent/self >/dev/null && break; sleep 0.1; done
for i in $(seq 1 100); do
  curl -sf -X PUT http://127.0.0.1:25903/v1/agent/service/register -d \
    "{\"Name\":\"svc$i\",\"Port\":25902,\"Check\":{\"HTTP\":\"http://127.0.0.1:25902/\",\"Interval\":\"10s\"}}"
done
revision() { curl -sf -X POST http://127.0.0.1:25900/v3/maintenance/status -d '{}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$agent/stat"; }
sleep 25   # warm-up: every check has run and passed, and that was written
revision_start=$(revision); cpu_start=$(cpu_ticks)
sleep 60
revision_end=$(revision); cpu_end=$(cpu_ticks)
ticks=$(getconf CLK_TCK)
echo "store writes in 60 s at steady state (100 services, 100 checks): $((revision_end - revision_start))"
echo "agent CPU over 60 s: $(python3 -c "print(f'{($cpu_end - $cpu_start) / $ticks / 60 * 100:.2f} %')")"
echo "agent RSS: $(awk '/VmRSS/ {print $2, $3}' /proc/$agent/status)"
python3 - <<'PY'
import socket, struct, time
def query(name, qtype=33, ident=1):
    header = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split(".")) + b"\0"
    return header + labels + struct.pack(">HH", qtype, 1)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(2)
packet = query("svc1.service.keel")
count, deadline = 0, time.time() + 5
while time.time() < deadline:
    sock.sendto(packet, ("127.0.0.1", 25904))
    answer = sock.recv(4096)
    assert struct.unpack(">H", answer[6:8])[0] >= 1, "no answer record"
    count += 1
print(f"DNS SRV queries per second, one client, sequential: {count / 5:.0f}")
PY
