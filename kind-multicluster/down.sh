#!/usr/bin/env bash
# Tear down what up.sh made: the kind clusters c1..c3 and the work directory (the mesh CA).
# KEEP_CA=1 keeps the CA in kind-multicluster/.work for the next up.sh.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need kind
existing="$(kind get clusters 2>/dev/null || true)"
for c in c1 c2 c3; do
    if grep -qx "${c}" <<< "${existing}"; then
        log "deleting kind cluster ${c}"
        kind delete cluster --name "${c}"
    fi
done
if [ "${KEEP_CA:-0}" != 1 ] && [ -d "${WORK_DIR}" ]; then
    log "removing ${WORK_DIR}"
    rm -rf "${WORK_DIR}"
fi
log "done"
