#!/usr/bin/env bash
# Shared settings and helpers of up.sh, drill.sh and down.sh (sourced, not run).
#
# Environment:
#   CLUSTERS        how many kind clusters: 2 (default) or 3 (configs in kind/c1.yaml .. kind/c3.yaml)
#   IMAGE_TAG       tag of the locally built images (default dev)
#   WORK_DIR        where the shared CA and logs go (default kind-multicluster/.work)
#   CLUSTERMESH     the clustermesh CLI to run (default: `clustermesh` on PATH, else the CLI image via docker)
#   KUBECONFIG      kubeconfig kind writes its contexts to (default ~/.kube/config)

# shellcheck disable=SC2034 # variables are used by the scripts that source this file
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/.." && pwd)"
CLUSTERS="${CLUSTERS:-2}"
IMAGE_TAG="${IMAGE_TAG:-dev}"
WORK_DIR="${WORK_DIR:-${here}/.work}"
NAMESPACE=clustermesh
RELEASE=clustermesh
DEMO_NAMESPACE=demo
TRUST_DOMAIN=kind.clustermesh.local
# Fixed node ports of the apiserver Service (the chart's apiserver.service.*NodePort).
ETCD_NODE_PORT=32379
GRPC_NODE_PORT=32443
IMAGES=(clustermesh-apiserver node-sync clustermesh)
export KUBECONFIG="${KUBECONFIG:-${HOME}/.kube/config}"

log() { printf '\033[1m[%s]\033[0m %s\n' "$(basename "$0" .sh)" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$(basename "$0" .sh)" "$*" >&2; exit 1; }

# The names of the clusters in use: c1 c2 [c3].
cluster_names() {
    if [ "${CLUSTERS}" = 3 ]; then echo c1 c2 c3; else echo c1 c2; fi
}

# Checked here, at source time: a `die` inside "$(cluster_names)" would only end a subshell.
case "${CLUSTERS}" in
    2 | 3) ;;
    *) die "CLUSTERS must be 2 or 3 (got ${CLUSTERS})" ;;
esac

# kubectl context of a kind cluster.
ctx() { echo "kind-$1"; }

# Cluster id of c<N> is N.
cluster_id() { echo "${1#c}"; }

need() {
    local tool
    for tool in "$@"; do
        command -v "${tool}" >/dev/null 2>&1 || die "${tool} not found on PATH ($(hint "${tool}"))"
    done
}

hint() {
    case "$1" in
        helm) echo "run scripts/install-helm.sh" ;;
        kind) echo "see https://kind.sigs.k8s.io/docs/user/quick-start/#installation" ;;
        kubectl) echo "see https://kubernetes.io/docs/tasks/tools/" ;;
        docker) echo "install Docker and make sure your user may run it" ;;
        *) echo "install it" ;;
    esac
}

# Run the clustermesh CLI: a local binary if there is one, else the CLI image with the host network
# (kind's API servers listen on 127.0.0.1) and the kubeconfig and work dir mounted.
cm() {
    if [ -n "${CLUSTERMESH:-}" ]; then
        "${CLUSTERMESH}" "$@"
    elif command -v clustermesh >/dev/null 2>&1; then
        clustermesh "$@"
    else
        docker run --rm --network host \
            --user "$(id -u):$(id -g)" \
            -v "${KUBECONFIG}:/kubeconfig:ro" -e KUBECONFIG=/kubeconfig \
            -v "${WORK_DIR}:${WORK_DIR}" -w "${WORK_DIR}" \
            "clustermesh/clustermesh:${IMAGE_TAG}" "$@"
    fi
}

# Docker container names of a kind cluster's nodes.
kind_nodes() { kind get nodes --name "$1"; }

# The InternalIP of every node of a cluster, one per line.
node_ips() {
    kubectl --context "$(ctx "$1")" get nodes \
        -o jsonpath='{range .items[*]}{.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}'
}

# gRPC address (IP:PORT) of a cluster's clustermesh-apiserver, through its NodePort on the first node.
grpc_addr() { echo "$(node_ips "$1" | head -n1):${GRPC_NODE_PORT}"; }

# The cluster's admin certificate directory (admin.crt/.key, ca-bundle.pem, cluster.json), taken
# from the Secret the chart's certgen Job made; the CLI's --tls-dir for that cluster.
admin_dir() {
    local c="$1" dir="${WORK_DIR}/$1" key
    mkdir -p "${dir}"
    chmod 0700 "${dir}"
    for key in admin.crt admin.key ca-bundle.pem cluster.json; do
        kubectl --context "$(ctx "${c}")" -n "${NAMESPACE}" get secret "${RELEASE}-apiserver-tls" \
            -o "jsonpath={.data.${key//./\\.}}" | base64 -d > "${dir}/${key}"
    done
    chmod 0600 "${dir}/admin.key"
    echo "${dir}"
}
