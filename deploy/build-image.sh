#!/usr/bin/env bash
# Build the sidecar image without a registry and show it serving a token.
#
#   sudo deploy/build-image.sh
#
# Where `docker build` works, that is all you need. This script is for hosts
# like our CI machines that reach only the Debian and PyPI package mirrors:
#   1. the base image is made locally: debootstrap Debian bookworm (python3,
#      python3-venv) and `podman import` it, standing in for python:3.11-slim;
#   2. `podman build` builds the Dockerfile unchanged (chroot isolation; the
#      host's CA bundle and a one-line pip.conf are mounted for the build, for
#      hosts whose HTTPS goes through an intercepting proxy);
#   3. the image is run from its own root filesystem (`podman image mount`) in
#      a private mount namespace with the root read-only, as the image's user
#      10001, with a mounted config and secret file, against an issuer on
#      loopback: the same process a container runtime would start. (Where an
#      OCI runtime works, `podman run --read-only` does this; on our CI machines
#      crun refuses: hybrid cgroups, and no CAP_SYS_RESOURCE for its rlimits.)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=localhost/token-broker-base:bookworm
IMAGE=${IMAGE:-localhost/token-broker:dev}
ROOTFS=${ROOTFS:-/var/tmp/token-broker-base}
PORT=${PORT:-18765}
work=$(mktemp -d)
mounted=""
cleanup() {
    [ -n "${issuer_pid:-}" ] && kill "$issuer_pid" 2>/dev/null || true
    [ -n "$mounted" ] && podman image unmount "$IMAGE" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

if ! podman image exists "$BASE"; then
    if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$ROOTFS" http://deb.debian.org/debian >/dev/null
    fi
    tar -C "$ROOTFS" -c . | podman import - "$BASE" >/dev/null
fi

printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$work/pip.conf"
podman build -q --format docker --isolation chroot --network host \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    -v "$work/pip.conf:/etc/pip.conf:ro" \
    --build-arg PYTHON_IMAGE="$BASE" -t "$IMAGE" "$ROOT" >/dev/null
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
base_size=$(podman image inspect "$BASE" --format '{{.Size}}')
user=$(podman image inspect "$IMAGE" --format '{{.Config.User}}')
health=$(podman image inspect "$IMAGE" --format '{{.Config.Healthcheck.Test}}')
echo "image $IMAGE: $((size / 1000000)) MB (base $((base_size / 1000000)) MB, so the" \
    "broker adds $(((size - base_size) / 1000000)) MB); user $user; healthcheck $health"

# An issuer on loopback that knows the sidecar's client, from this checkout.
secret="sidecar-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
PYTHONPATH="$ROOT" SECRET="$secret" PORT="$PORT" python3 -c '
import asyncio, os
from broker.demo import DemoIssuer, issuer_server, loopback_socket
issuer = DemoIssuer(lifetime=3600)
issuer.add_client("sidecar", os.environ.pop("SECRET"))
sock = loopback_socket(int(os.environ["PORT"]) + 1)
asyncio.run(issuer_server(issuer).serve(sockets=[sock]))
' &
issuer_pid=$!
until curl -s -o /dev/null "http://127.0.0.1:$((PORT + 1))/"; do sleep 0.1; done

mkdir -p "$work/run/secrets"
printf '%s\n' "$secret" >"$work/run/secrets/adobe"
chown -R 10001:10001 "$work/run/secrets"
chmod 0400 "$work/run/secrets/adobe"
cat >"$work/config.toml" <<EOF
[server]
listen = ["127.0.0.1:$PORT"]
[credentials.adobe]
provider = "oauth2"
client_id = "sidecar"
token_url = "http://127.0.0.1:$((PORT + 1))/oauth2/token"
secret = "file:/run/secrets/adobe"
EOF
chmod 0644 "$work/config.toml"

rootfs=$(podman image mount "$IMAGE")
mounted=yes
in_image() {  # exec a command from the image, as the image's user, root read-only
    exec unshare --mount sh -c "
        mount --bind '$rootfs' '$rootfs' && mount -o remount,bind,ro '$rootfs' &&
        mount --bind '$work/run' '$rootfs/run' &&
        mount --bind '$work/config.toml' '$rootfs/etc/token-broker/config.toml' &&
        mount -t proc proc '$rootfs/proc' &&
        exec chroot --userspec=$user '$rootfs' env -i PATH=/opt/token-broker/bin:/usr/bin \
            HOME=/nonexistent PYTHONDONTWRITEBYTECODE=1 $*"
}
ms() { echo $(($(date +%s%N) / 1000000)); }
started=$(ms)
in_image token-broker serve &  # exec all the way down: $! is the broker itself
broker_pid=$!
until (in_image token-broker health --ready 2>/dev/null); do
    kill -0 "$broker_pid" || { echo "the image's broker exited" >&2; exit 1; }
    sleep 0.1
done
healthy=$(ms)
token=$(curl -s -H 'X-Token-Broker: 1' "http://127.0.0.1:$PORT/token")
echo "start to healthy (the HEALTHCHECK command on /readyz): $((healthy - started)) ms"
echo "token served by the image: ${token:0:12}... (${#token} bytes)"
echo "broker process: $(grep -E '^(Uid|CapEff)' "/proc/$broker_pid/status" | tr '\n\t' '  ')"
stop=$(ms)
kill -TERM "$broker_pid"
wait "$broker_pid" && code=0 || code=$?
echo "SIGTERM to exit: $(($(ms) - stop)) ms, exit code $code"
[ -n "$token" ] && [ "$code" = 0 ]
