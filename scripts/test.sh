#!/usr/bin/env bash
# README command two: installs what the tests need, builds everything, runs every test, then
# every fuzz target briefly.
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

# Tests that need what this machine may lack (a cluster: KUBECONFIG, and images for the
# whole-chart test) are `#[ignore]`d at build time without it (tests/build.rs,
# operator/build.rs): the runner counts them as skipped and lists them at the end; where the
# prerequisite exists they are built to run. Everything else is installed by scripts/setup.sh:
# a missing tool fails its tests.
if [ -n "${KUBECONFIG:-}" ]; then
  echo "test: KUBECONFIG is set: the cluster tests run too"
else
  echo "test: KUBECONFIG is not set: the cluster tests are skipped (listed at the end)"
fi

if cargo nextest --version >/dev/null 2>&1; then
  # Real brokers and processes per test: keep the parallelism modest on small machines.
  # The final summary lists every skipped (ignored) test next to the failures.
  cargo nextest run --workspace --no-fail-fast --test-threads 2 --final-status-level skip "$@"
else
  cargo test --workspace --no-fail-fast "$@" -- --test-threads 2
fi

# Every fuzz target briefly over its seed corpus (docs/fuzzing.md): a decoder that panics,
# hangs or runs out of memory fails the run. An unoptimised build: it compiles in a fraction
# of the time, and 12 s a target is about the corpus and its neighbourhood, not a campaign.
FUZZ_BUILD="--dev" bash scripts/fuzz.sh 12
