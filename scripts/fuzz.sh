#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz on the nightly toolchain) for SECONDS each, one at a
# time, over its committed seed corpus (fuzz/corpus/<target>/, read only: new inputs go to a
# temporary directory) with its dictionary. Fails on the first crash, hang (-timeout) or OOM
# (-rss_limit_mb); the failing input is left in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 15 s, every target
#
# FUZZ_BUILD="--dev" (what scripts/test.sh uses) builds without optimisations, which compiles
# much faster; leave it empty for long campaigns (optimised, debug assertions on).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"

seconds="${1:-15}"
shift || true
build_flags=(${FUZZ_BUILD:-})
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

dict_of() {
  case "$1" in
    coap_listener) echo dict/coap.dict ;;
    modbus_tcp | modbus_rtu) echo dict/modbus.dict ;;
    config) echo dict/yaml.dict ;;
    traceparent) echo dict/traceparent.dict ;;
    command | mqtt_payload | tcp_frames | udp_datagram | management) echo dict/json.dict ;;
    *) echo "" ;;
  esac
}

echo "fuzz: building ${#targets[@]} targets (nightly, ${FUZZ_BUILD:-optimised})"
started=$(date +%s)
cargo +nightly fuzz build "${build_flags[@]}" -s none
echo "fuzz: built in $(($(date +%s) - started)) s; ${seconds} s per target"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "artifacts/$t"
  args=(-max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
    -artifact_prefix="artifacts/$t/")
  dict="$(dict_of "$t")"
  if [ -n "$dict" ]; then args+=(-dict="$dict"); fi
  echo "fuzz: $t"
  if ! cargo +nightly fuzz run "${build_flags[@]}" -s none "$t" "$work/$t" "corpus/$t" -- "${args[@]}" \
    >"$work/$t.log" 2>&1; then
    tail -n 60 "$work/$t.log"
    echo "fuzz: $t FAILED: the input is in fuzz/artifacts/$t/ (reproduce: cargo +nightly fuzz run $t <file>)"
    exit 1
  fi
  grep -E '^#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb' "$work/$t.log" | tr '\n' ' '
  echo
done
echo "fuzz: every target ran ${seconds} s without a crash, hang or OOM"
