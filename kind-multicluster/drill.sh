#!/usr/bin/env bash
# Failover drill against the kind mesh made by up.sh, with `clustermesh drill`: from a node of the
# first cluster (inside its pod cgroups, where the socket load balancer is attached), new connections
# go to the global service demo/echo at a steady rate; the local backends are made to fail (scaled to
# zero) and brought back, and the drill reports failover time, failback time and failed connects.
# Exits non-zero past BUDGET_MS. The local backends are restored whatever happens.
#
# Environment (besides lib.sh's): PORT (7000), BUDGET_MS (1000), OUTPUT (text|json).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need docker kubectl
read -r -a clusters <<< "$(cluster_names)"
local_cluster="${clusters[0]}"
context="$(ctx "${local_cluster}")"
port="${PORT:-7000}"
budget="${BUDGET_MS:-1000}"
output="${OUTPUT:-text}"
deployment="deployment/echo-${local_cluster}"
node="${local_cluster}-control-plane"
cli_in_node=/usr/local/bin/clustermesh
probe_cgroup=/sys/fs/cgroup/kubelet.slice/clustermesh-drill

kubectl --context "${context}" -n "${DEMO_NAMESPACE}" get "${deployment}" >/dev/null ||
    die "${DEMO_NAMESPACE}/echo-${local_cluster} not found in ${context}: run up.sh first"
replicas="$(kubectl --context "${context}" -n "${DEMO_NAMESPACE}" get "${deployment}" -o jsonpath='{.spec.replicas}')"
vip="$(kubectl --context "${context}" -n "${DEMO_NAMESPACE}" get service echo -o jsonpath='{.spec.clusterIP}')"
[ -n "${vip}" ] || die "service ${DEMO_NAMESPACE}/echo has no ClusterIP in ${context}"

# The CLI runs inside the node: a local binary if CLUSTERMESH names one, else the one in the CLI image.
mkdir -p "${WORK_DIR}"
if [ -n "${CLUSTERMESH:-}" ]; then
    cp "${CLUSTERMESH}" "${WORK_DIR}/clustermesh-cli"
else
    ctr="$(docker create "clustermesh/clustermesh:${IMAGE_TAG}")"
    docker cp "${ctr}:/usr/local/bin/clustermesh" "${WORK_DIR}/clustermesh-cli"
    docker rm "${ctr}" >/dev/null
fi
docker cp "${WORK_DIR}/clustermesh-cli" "${node}:${cli_in_node}"
docker exec "${node}" mkdir -p "${probe_cgroup}"

# The fault and the recovery: hook commands the drill runs (inside the node, with its admin kubeconfig).
kube_in_node="kubectl --kubeconfig /etc/kubernetes/admin.conf -n ${DEMO_NAMESPACE}"
restore() {
    kubectl --context "${context}" -n "${DEMO_NAMESPACE}" scale "${deployment}" --replicas="${replicas}" >/dev/null
}
trap restore EXIT

log "drill on ${DEMO_NAMESPACE}/echo (${vip}:${port}) from ${node}; local backends: echo-${local_cluster} (${replicas})"
docker exec "${node}" "${cli_in_node}" drill \
    --service "${DEMO_NAMESPACE}/echo" --target "${vip}:${port}" \
    --local-prefix "echo-${local_cluster}-" \
    --fail "${kube_in_node} scale ${deployment} --replicas=0" \
    --recover "${kube_in_node} scale ${deployment} --replicas=${replicas}" \
    --cgroup "${probe_cgroup}" --budget "${budget}ms" -o "${output}"
