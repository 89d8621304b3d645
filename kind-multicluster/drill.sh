#!/usr/bin/env bash
# Failover drill against the kind mesh made by up.sh: new connections to the global service
# demo/echo from a node of the first cluster, then the local backends fail (scaled to zero), traffic
# must move to the other clusters, then the backends come back and traffic must return.
# Prints failover time, failback time and failed connects; exits non-zero past BUDGET_MS.
#
# Environment (besides lib.sh's): SERVICE (default demo/echo), PORT (7000), BUDGET_MS (1000),
# OUTPUT (table|json).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need kubectl
read -r -a clusters <<< "$(cluster_names)"
local_cluster="${clusters[0]}"
context="$(ctx "${local_cluster}")"
service="${SERVICE:-${DEMO_NAMESPACE}/echo}"
port="${PORT:-7000}"
budget="${BUDGET_MS:-1000}"
output="${OUTPUT:-table}"
deployment="deployment/echo-${local_cluster}"

kubectl --context "${context}" -n "${DEMO_NAMESPACE}" get "${deployment}" >/dev/null ||
    die "${DEMO_NAMESPACE}/echo-${local_cluster} not found in ${context}: run up.sh first"
replicas="$(kubectl --context "${context}" -n "${DEMO_NAMESPACE}" get "${deployment}" -o jsonpath='{.spec.replicas}')"

# The fault and the recovery are hook commands: the drill runs them and times traffic around them.
fail_cmd="kubectl --context ${context} -n ${DEMO_NAMESPACE} scale ${deployment} --replicas=0"
recover_cmd="kubectl --context ${context} -n ${DEMO_NAMESPACE} scale ${deployment} --replicas=${replicas}"

log "drill on ${service}:${port} from ${local_cluster}; local backends: echo-${local_cluster} (${replicas})"
status=0
# NOTE: `clustermesh drill` against a running mesh is still being built; these flags follow the
# shape of `clustermesh status` (--server, --tls-dir) and the drill's design (hooks, budget).
cm drill --server "$(grpc_addr "${local_cluster}")" --tls-dir "$(admin_dir "${local_cluster}")" \
    --service "${service}" --port "${port}" \
    --fail-hook "${fail_cmd}" --recover-hook "${recover_cmd}" \
    --local-backend-prefix "echo-${local_cluster}-" \
    --budget "${budget}ms" -o "${output}" || status=$?

# Whatever happened, leave the local backends running.
${recover_cmd} >/dev/null
exit "${status}"
