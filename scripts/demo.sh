#!/usr/bin/env bash
# README command one: the whole data path live on one machine, no configuration needed.
#
#   simulated Modbus devices -> fieldgate-gateway -> nats-server (JetStream, on disk)
#     -> mosquitto (standing in for the cloud) -> a view that decodes what the cloud receives
#        with the published schema and checks it against what the devices served
#
# Keys: d stops the cloud broker for OUTAGE (the buffer fills, then drains: nothing lost),
# q (or Ctrl-C) ends the demo with a final check. Settings (all optional):
#   DEVICES=10  POLL_INTERVAL=1s  ENCODING=json|protobuf  MQTT_VERSION=5|3  OUTAGE=20s
# Extra arguments go to fieldgate-demo (see `target/debug/fieldgate-demo --help`), such as
# `--run-for 60s --outage-at 10s` for a run without a keyboard.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
if [ ! -x target/debug/fieldgate-gateway ] || [ ! -x target/debug/fieldgate-demo ]; then
  echo "demo: first build of the gateway and the demo: about 330 crates, several minutes on 2 cores"
fi
# Cargo's own progress (crate by crate, and a bar on a terminal).
cargo build --bins -p fieldgate-gateway -p fieldgate-demo

# Keys are read one at a time without echo; the terminal is restored however the demo ends.
if [ -t 0 ]; then
  saved_tty="$(stty -g)"
  trap 'stty "$saved_tty"' EXIT
  stty -icanon -echo min 1
fi

set +e
target/debug/fieldgate-demo \
  --devices "${DEVICES:-10}" \
  --poll-interval "${POLL_INTERVAL:-1s}" \
  --encoding "${ENCODING:-json}" \
  --mqtt-version "${MQTT_VERSION:-5}" \
  --outage "${OUTAGE:-20s}" \
  --gateway target/debug/fieldgate-gateway \
  --nats-server "$root/.venv/bin/nats-server" \
  --mosquitto "$(command -v mosquitto || echo /usr/sbin/mosquitto)" \
  --work-dir "$root/.demo" \
  "$@"
status=$?
set -e
exit "$status"
