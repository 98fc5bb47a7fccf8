#!/usr/bin/env bash
# Deletes the k3d cluster k3d/up.sh created (and everything in it).
# Knobs: CLUSTER=fieldgate
set -euo pipefail

cluster="${CLUSTER:-fieldgate}"
command -v k3d >/dev/null 2>&1 || { echo "k3d/down.sh: k3d is required" >&2; exit 1; }

if k3d cluster list "$cluster" >/dev/null 2>&1; then
  k3d cluster delete "$cluster"
else
  echo "k3d/down.sh: no cluster $cluster"
fi
