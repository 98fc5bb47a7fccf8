#!/usr/bin/env bash
# README command one: the whole data path live on one machine, no configuration needed.
#
#   simulated Modbus devices -> fieldgate-gateway -> nats-server (JetStream, on disk)
#     -> mosquitto (standing in for the cloud) -> a live view of what the cloud receives
#
# Ctrl-C stops everything this script started. Settings (all optional):
#   DEVICES=10  POLL_INTERVAL=1s  ENCODING=json|protobuf  MQTT_VERSION=5|3
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

devices="${DEVICES:-10}"
poll="${POLL_INTERVAL:-1s}"
encoding="${ENCODING:-json}"
mqtt_version="${MQTT_VERSION:-5}"

bash scripts/setup.sh
echo "demo: building (first run takes a few minutes)"
cargo build --quiet --bins -p fieldgate-gateway -p fieldgate-sim

py="$root/.venv/bin/python"
work="$root/.demo"
rm -rf "$work"
mkdir -p "$work/nats" "$work/mosquitto" "$work/secrets"

free_ports() { # free_ports N CONSECUTIVE(0|1): prints N free loopback ports
  "$py" - "$1" "$2" <<'PY'
import random, socket, sys
n, consecutive = int(sys.argv[1]), sys.argv[2] == "1"
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
if consecutive:
    while True:
        base = random.randint(20000, 40000)
        if all(free(base + i) for i in range(n)):
            print(base); break
else:
    ports = set()
    while len(ports) < n:
        p = random.randint(41000, 60000)
        if free(p): ports.add(p)
    print(" ".join(map(str, ports)))
PY
}

pids=()
gateway_pid=""
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "demo: stopping"
  # The gateway first, so it can finish its in-flight deliveries while the brokers still run.
  if [ -n "$gateway_pid" ]; then
    kill -TERM "$gateway_pid" 2>/dev/null || true
    wait "$gateway_pid" 2>/dev/null || true
  fi
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "demo: stopped everything it started (logs in .demo/)"
}
trap cleanup INT TERM EXIT

read -r nats_port mqtt_port mgmt_port <<<"$(free_ports 3 0)"
sim_port="$(free_ports "$devices" 1)"

# nats-server with JetStream on disk, fsync on every write.
cat >"$work/nats/nats.conf" <<CONF
listen: 127.0.0.1:$nats_port
jetstream { store_dir: "$work/nats/store", sync_interval: always }
CONF
"$root/.venv/bin/nats-server" -c "$work/nats/nats.conf" >"$work/nats/log" 2>&1 &
pids+=($!)

# mosquitto standing in for the cloud broker.
mosquitto_bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
{
  echo "listener $mqtt_port 127.0.0.1"
  echo "allow_anonymous true"
  echo "max_inflight_messages 0"
  [ "$(id -u)" -eq 0 ] && echo "user root"
} >"$work/mosquitto/mosquitto.conf"
"$mosquitto_bin" -c "$work/mosquitto/mosquitto.conf" >"$work/mosquitto/log" 2>&1 &
pids+=($!)

# Simulated Modbus TCP devices.
sim="$root/target/debug/fieldgate-sim"
"$sim" --devices "$devices" --base-port "$sim_port" >"$work/sim.log" 2>&1 &
pids+=($!)

# The gateway's configuration: the simulated devices and one MQTT uplink.
{
  echo "apiVersion: fieldgate.io/v1alpha1"
  echo "kind: GatewayConfig"
  "$sim" --devices "$devices" --base-port "$sim_port" --poll-interval "$poll" --print-devices
  echo "uplinks:"
  echo "- name: cloud"
  echo "  encoding: $encoding"
  echo "  mqtt: {url: \"mqtt://127.0.0.1:$mqtt_port\", protocolVersion: $mqtt_version}"
  echo "  buffer: {maxBytes: 256Mi, maxAge: 24h, onFull: dropOldest}"
} >"$work/gateway.yaml"

"$py" - "$nats_port" "$mqtt_port" <<'PY'
import socket, sys, time
for port in map(int, sys.argv[1:]):
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close(); break
        except OSError:
            if time.time() > deadline: sys.exit(f"demo: nothing listens on port {port}; see .demo/*/log")
            time.sleep(0.1)
PY

"$root/target/debug/fieldgate-gateway" --config "$work/gateway.yaml" \
  --nats-url "nats://127.0.0.1:$nats_port" --listen "127.0.0.1:$mgmt_port" \
  --secrets-dir "$work/secrets" --node demo-node >"$work/gateway.log" 2>&1 &
gateway_pid=$!
pids+=("$gateway_pid")

echo "demo: $devices simulated devices on 127.0.0.1:$sim_port.. polled every $poll"
echo "demo: nats-server :$nats_port, cloud mosquitto :$mqtt_port, gateway metrics http://127.0.0.1:$mgmt_port/metrics"
echo "demo: config .demo/gateway.yaml, logs .demo/. Ctrl-C to stop."
echo

# The cloud side: count what arrives and show a sample value, live.
mosquitto_sub -h 127.0.0.1 -p "$mqtt_port" -q 1 -v -t 'fieldgate/#' 2>/dev/null \
  | "$py" -u "$root/scripts/cloud_watch.py" &
pids+=($!)
wait "${pids[-1]}"
