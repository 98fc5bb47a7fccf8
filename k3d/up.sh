#!/usr/bin/env bash
# From nothing to a local k3s cluster running Fieldgate with a simulated device and a
# mosquitto "cloud":
#   create the cluster -> build and import the images -> helm install -> apply the examples.
#
# Needs: docker, k3d, kubectl, helm. Idempotent: re-running rebuilds the images and upgrades.
# Knobs: CLUSTER=fieldgate AGENTS=2 NAMESPACE=fieldgate-system EXAMPLES=demo TAG=dev SKIP_BUILD=1
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="${CLUSTER:-fieldgate}"
agents="${AGENTS:-2}"
namespace="${NAMESPACE:-fieldgate-system}"
examples="${EXAMPLES:-demo}"
tag="${TAG:-dev}"

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "k3d/up.sh: $1 is required ($2)" >&2; exit 1; }
}
need docker "https://docs.docker.com/engine/install/"
need k3d "https://k3d.io"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need helm "https://helm.sh/docs/intro/install/"

if k3d cluster list "$cluster" >/dev/null 2>&1; then
  echo "k3d/up.sh: cluster $cluster exists"
else
  echo "k3d/up.sh: creating cluster $cluster with $agents agents"
  k3d cluster create "$cluster" --agents "$agents" --wait
fi
kubectl config use-context "k3d-$cluster" >/dev/null

if [ -z "${SKIP_BUILD:-}" ]; then
  echo "k3d/up.sh: building images (first build takes several minutes)"
  docker build -f "$root/Dockerfile.operator" -t "fieldgate-operator:$tag" "$root"
  docker build -f "$root/Dockerfile.gateway" -t "fieldgate-gateway:$tag" "$root"
fi
k3d image import -c "$cluster" "fieldgate-operator:$tag" "fieldgate-gateway:$tag"

# Every agent is a gateway node; the server node runs the operator and the examples.
for node in $(kubectl get nodes -o name -l '!node-role.kubernetes.io/control-plane'); do
  kubectl label --overwrite "$node" fieldgate.io/gateway=true >/dev/null
done

kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# The gateway keeps its JetStream buffer on the node's disk (hostPath).
kubectl label --overwrite namespace "$namespace" pod-security.kubernetes.io/enforce=privileged >/dev/null

echo "k3d/up.sh: installing the chart"
helm upgrade --install fieldgate "$root/charts/fieldgate" \
  --namespace "$namespace" \
  --set "operator.image.tag=$tag" --set "gateway.image.tag=$tag" \
  --set operator.logFormat=text --set gateway.logFormat=text \
  --wait --timeout 5m

echo "k3d/up.sh: applying the examples to namespace $examples"
kubectl create namespace "$examples" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label --overwrite namespace "$examples" pod-security.kubernetes.io/enforce=restricted >/dev/null
kubectl apply -n "$examples" -f "$root/examples/" -R
kubectl -n "$examples" rollout status deployment/mosquitto --timeout 3m
kubectl -n "$examples" rollout status deployment/fieldgate-sim --timeout 3m

cat <<MSG

Fieldgate is up on k3d cluster "$cluster".
  kubectl get fieldgate -n $examples -o wide              # devices, profiles, uplinks; why not Ready
  kubectl -n $namespace get configmaps -l fieldgate.io/role=gateway-config
  kubectl -n $examples exec deploy/mosquitto -- mosquitto_sub -u fieldgate -P change-me -t 'fieldgate/#' -v
Tear down with k3d/down.sh.
MSG
