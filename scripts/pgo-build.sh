#!/usr/bin/env bash
# A profile-guided release build of the gateway (optional; the plain release build is what the
# tests and the image use). Its code for the paths a gateway runs all day (polling, buffering,
# delivering) ends up together, away from what runs rarely, which keeps fewer code pages
# resident and spends less CPU on them; see the README's "Edge scenarios".
#
#   scripts/pgo-build.sh          -> target/pgo/release/fieldgate-gateway
#
# Steps: an instrumented gateway (target/pgo-gen), the edge-1k and mqtt-ingest scenarios of
# fieldgate-bench run with it (real nats-server, mosquitto and simulated Modbus devices, as
# installed by scripts/setup.sh), the profiles merged with the toolchain's llvm-profdata
# (rustup component llvm-tools), then the gateway built again with them. Three release builds:
# 15-25 minutes on two cores.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh"
export FIELDGATE_NATS_SERVER="$root/.venv/bin/nats-server"
export PATH="$root/.venv/bin:$PATH"

if ! rustup component list --installed 2>/dev/null | grep -q '^llvm-tools'; then
  echo "pgo: installing the llvm-tools component (llvm-profdata)"
  rustup component add llvm-tools
fi
profdata="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"

profiles="$root/target/pgo-profiles"
rm -rf "$profiles"
mkdir -p "$profiles"

echo "pgo: 1/4 the bench, the simulator and an instrumented gateway (release builds)"
cargo build --release --locked -p fieldgate-tests -p fieldgate-sim --bins
RUSTFLAGS="-Cprofile-generate=$profiles/raw" \
  cargo build --release --locked -p fieldgate-gateway --bin fieldgate-gateway --target-dir "$root/target/pgo-gen"

echo "pgo: 2/4 the workload (edge-1k, then mqtt-ingest)"
export FIELDGATE_GATEWAY_BIN="$root/target/pgo-gen/release/fieldgate-gateway"
export LLVM_PROFILE_FILE="$profiles/gateway-%p-%m.profraw"
"$root/target/release/fieldgate-bench" --scenario edge-1k --seconds 30
"$root/target/release/fieldgate-bench" --scenario mqtt-ingest --seconds 15
unset FIELDGATE_GATEWAY_BIN LLVM_PROFILE_FILE

echo "pgo: 3/4 merging the profiles"
shopt -s nullglob
raw=("$profiles"/gateway-*.profraw)
if [ "${#raw[@]}" -eq 0 ]; then
  echo "pgo: the instrumented gateway wrote no profile" >&2
  exit 1
fi
"$profdata" merge -o "$profiles/gateway.profdata" "${raw[@]}"

echo "pgo: 4/4 the gateway built with the profile"
RUSTFLAGS="-Cprofile-use=$profiles/gateway.profdata" \
  cargo build --release --locked -p fieldgate-gateway --bin fieldgate-gateway --target-dir "$root/target/pgo"
echo "pgo: built $root/target/pgo/release/fieldgate-gateway"
echo "pgo: compare with FIELDGATE_GATEWAY_BIN=$root/target/pgo/release/fieldgate-gateway target/release/fieldgate-bench --scenario edge-1k"
