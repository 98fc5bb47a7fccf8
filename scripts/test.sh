#!/usr/bin/env bash
# README command two: installs what the tests need, builds everything, runs every test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
# One build per run: incremental caches only cost disk here.
export CARGO_INCREMENTAL=0
export FIELDGATE_NATS_SERVER="$root/.venv/bin/nats-server"
export PATH="$root/.venv/bin:$PATH"

# The end-to-end tests run the gateway binary: build every binary first.
cargo build --workspace --bins --tests

if cargo nextest --version >/dev/null 2>&1; then
  # Real brokers and processes per test: keep the parallelism modest on small machines.
  cargo nextest run --workspace --no-fail-fast --test-threads 2 "$@"
else
  cargo test --workspace --no-fail-fast "$@" -- --test-threads 2
fi
