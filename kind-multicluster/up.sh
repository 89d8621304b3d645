#!/usr/bin/env bash
# Bring up a ClusterMesh of two (or three: CLUSTERS=3) kind clusters on this machine:
#   1. create the kind clusters (distinct pod and service CIDRs, kind/cN.yaml)
#   2. build the three images and load them into every cluster (SKIP_BUILD=1 to reuse built ones)
#   3. create one mesh CA and install the chart in every cluster with certificates issued from it, with
#      node-sync routing the other clusters' pod CIDRs (nodeSync.routing.mode=native: kind clusters share
#      one Docker network, so every node reaches every other node directly)
#   4. `clustermesh connect` every pair of clusters and wait until every node is synced
#   5. deploy a demo global service (demo/echo, backends in every cluster) and a client
# Re-running it is safe: existing clusters, the CA and releases are kept and updated.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need docker kind kubectl helm
helm version --short | grep -q '^v4\.' || die "helm v4 is needed: run scripts/install-helm.sh"
mkdir -p "${WORK_DIR}"
read -r -a clusters <<< "$(cluster_names)"

# --- 1. clusters --------------------------------------------------------------------------------
for c in "${clusters[@]}"; do
    if kind get clusters 2>/dev/null | grep -qx "${c}"; then
        log "kind cluster ${c} exists"
    else
        log "creating kind cluster ${c}"
        kind create cluster --name "${c}" --config "${here}/kind/${c}.yaml" --wait 120s
    fi
done

# --- 2. images ----------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    for image in "${IMAGES[@]}"; do
        log "building clustermesh/${image}:${IMAGE_TAG}"
        docker build -f "${repo}/images/${image}.Dockerfile" -t "clustermesh/${image}:${IMAGE_TAG}" "${repo}"
    done
fi
for c in "${clusters[@]}"; do
    for image in "${IMAGES[@]}"; do
        log "loading clustermesh/${image}:${IMAGE_TAG} into ${c}"
        kind load docker-image --name "${c}" "clustermesh/${image}:${IMAGE_TAG}"
    done
done

# --- 3. one mesh CA, the chart in every cluster ----------------------------------------------------
ca="${WORK_DIR}/ca"
if [ -f "${ca}/root.crt" ]; then
    log "mesh CA exists: ${ca}"
else
    log "creating the mesh CA (trust domain ${TRUST_DOMAIN})"
    cm ca init --trust-domain "${TRUST_DOMAIN}" --out "${ca}"
fi
for c in "${clusters[@]}"; do
    context="$(ctx "${c}")"
    kubectl --context "${context}" create namespace "${NAMESPACE}" --dry-run=client -o yaml |
        kubectl --context "${context}" apply -f - >/dev/null
    kubectl --context "${context}" -n "${NAMESPACE}" create secret generic clustermesh-ca \
        --from-file="${ca}/trust-domain" --from-file="${ca}/root.crt" \
        --from-file="${ca}/root.key" --from-file="${ca}/ca-bundle.pem" \
        --dry-run=client -o yaml | kubectl --context "${context}" apply -f - >/dev/null
    # Remote clusters reach the managed etcd on any node's address: all of them go into the SANs.
    sans="$(node_ips "${c}" | paste -sd, -)"
    # The other clusters as static remotes of node-sync, at their etcd NodePort on every node
    # (`clustermesh connect` below adds the etcd users and the registrations; these files give
    # node-sync addresses it can reach from this cluster).
    peers=()
    i=0
    for other in "${clusters[@]}"; do
        [ "${other}" = "${c}" ] && continue
        peers+=(--set "clustermesh.config.clusters[${i}].name=${other}")
        peers+=(--set "clustermesh.config.clusters[${i}].id=$(cluster_id "${other}")")
        j=0
        while read -r ip; do
            peers+=(--set "clustermesh.config.clusters[${i}].endpoints[${j}]=https://${ip}:${ETCD_NODE_PORT}")
            j=$((j + 1))
        done < <(node_ips "${other}")
        i=$((i + 1))
    done
    # node-sync routes every other cluster's pod CIDRs via that cluster's nodes (--routing native; the
    # apiserver publishes each node's spec.podCIDRs), so a pod here reaches a backend pod there.
    log "installing the chart in ${c} (id $(cluster_id "${c}"), server SANs ${sans})"
    helm upgrade --install "${RELEASE}" "${repo}/helm/clustermesh" \
        --kube-context "${context}" --namespace "${NAMESPACE}" \
        --set cluster.name="${c}" --set cluster.id="$(cluster_id "${c}")" \
        --set certs.mode=job --set certs.trustDomain="${TRUST_DOMAIN}" \
        --set certs.job.caSecret=clustermesh-ca --set "certs.extraSans={${sans}}" \
        --set apiserver.service.type=NodePort \
        --set apiserver.service.etcdNodePort="${ETCD_NODE_PORT}" \
        --set apiserver.service.grpcNodePort="${GRPC_NODE_PORT}" \
        --set image.apiserver.tag="${IMAGE_TAG}" --set image.nodeSync.tag="${IMAGE_TAG}" \
        --set image.cli.tag="${IMAGE_TAG}" --set image.pullPolicy=Never \
        --set apiserver.logFormat=plain --set nodeSync.logFormat=plain \
        --set nodeSync.cgroup.attachPath=kubelet.slice \
        --set nodeSync.routing.mode=native \
        "${peers[@]}" \
        --wait --timeout 5m
done

# --- 4. connect every pair ------------------------------------------------------------------------
for ((i = 0; i < ${#clusters[@]}; i++)); do
    for ((j = i + 1; j < ${#clusters[@]}; j++)); do
        a="${clusters[i]}"
        b="${clusters[j]}"
        log "connecting ${a} ($(grpc_addr "${a}")) <-> ${b} ($(grpc_addr "${b}"))"
        cm connect "$(grpc_addr "${a}")" "$(grpc_addr "${b}")" \
            --tls-dir "$(admin_dir "${a}")" --destination-tls-dir "$(admin_dir "${b}")" --wait
    done
done

# --- 5. demo global service -----------------------------------------------------------------------
for c in "${clusters[@]}"; do
    log "deploying the demo global service ${DEMO_NAMESPACE}/echo in ${c}"
    sed "s/__CLUSTER__/${c}/g" "${here}/demo/echo.yaml" |
        kubectl --context "$(ctx "${c}")" apply -f - >/dev/null
    kubectl --context "$(ctx "${c}")" -n "${DEMO_NAMESPACE}" rollout status deployment/echo-"${c}" --timeout 3m
done

log "mesh status from ${clusters[0]}:"
cm status --server "$(grpc_addr "${clusters[0]}")" --tls-dir "$(admin_dir "${clusters[0]}")" --wait
cat >&2 <<MSG

ClusterMesh is up: ${clusters[*]}.
  Try it:   kubectl --context $(ctx "${clusters[0]}") -n ${DEMO_NAMESPACE} exec deploy/client -- \\
              sh -c 'for i in 1 2 3 4 5; do nc -w1 echo 7000; echo; done'
  Drill:    ${here}/drill.sh
  Tear down: ${here}/down.sh
MSG
