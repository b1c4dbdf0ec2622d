#!/usr/bin/env bash
# AN EXAMPLE, not run by the tests: the Vault / OpenBao side of ../vault-sidecar and
# ../vault-cluster, as `bao` commands (`vault` takes the same ones). Read it, adapt the
# names to your Vault, and run it with a token that may configure auth methods and
# policies (BAO_ADDR and BAO_TOKEN, or VAULT_ADDR and VAULT_TOKEN, in the environment).
# It is written to run once: a second run fails at the first secret (-cas=0 below).
#
#   AUTH=kubernetes NAMESPACES=token-broker bash vault-setup.example.sh <adobe.secret
set -euo pipefail

BAO=${BAO:-bao}                          # or vault
AUTH=${AUTH:-kubernetes}                 # or jwt: config.toml's [vault] auth
# Where the brokers run: the cluster mode's namespace (token-broker), and for the
# sidecar mode every app namespace it is applied in, comma-separated (token-broker,my-app).
NAMESPACES=${NAMESPACES:-token-broker}
SERVICE_ACCOUNT=token-broker             # serviceaccount.yaml
AUDIENCE=vault                           # the projected token's audience (pod.yaml)
ROLE=token-broker                        # config.toml: [vault] role
POLICY=token-broker
SECRET=secret/token-broker/adobe         # config.toml: secret = "vault:secret/token-broker/adobe#client_secret"
HERE=$(dirname "$0")

# 1. KV version 2 at secret/ (a dev server and many installs have it already).
$BAO read sys/mounts/secret >/dev/null 2>&1 || $BAO secrets enable -path=secret kv-v2

# 2. The brokers' policy: read the secret, report the version in use, and cycle.
$BAO policy write "$POLICY" "$HERE/vault-policy.hcl"

# 3. How a broker logs in: its projected service-account token, audience "vault",
#    bound to the ServiceAccount token-broker of the namespaces above. The tokens it gets
#    carry the policy above and Vault's `default` (renew-self): never set
#    token_no_default_policy. The broker renews its token and logs in again before
#    token_max_ttl, reading the (rotated) service-account token anew.
case $AUTH in
kubernetes)
    $BAO read sys/auth/kubernetes >/dev/null 2>&1 || $BAO auth enable kubernetes
    # Vault in this cluster asks the API server to review each broker's token with its
    # own service account (which needs the ClusterRole system:auth-delegator; the Vault
    # and OpenBao Helm charts grant it). Vault outside the cluster also needs
    # kubernetes_ca_cert=@ca.crt and token_reviewer_jwt=… (a reviewer's token).
    $BAO write auth/kubernetes/config kubernetes_host=https://kubernetes.default.svc:443
    $BAO write "auth/kubernetes/role/$ROLE" \
        bound_service_account_names="$SERVICE_ACCOUNT" \
        bound_service_account_namespaces="$NAMESPACES" \
        audience="$AUDIENCE" \
        token_policies="$POLICY" token_ttl=1h token_max_ttl=24h
    ;;
jwt)
    $BAO read sys/auth/jwt >/dev/null 2>&1 || $BAO auth enable jwt
    # Vault checks the token's signature itself, with the cluster's service-account
    # public key, and never calls the API server. SA_PUBKEY: that key in PEM (kubeadm:
    # /etc/kubernetes/pki/sa.pub on a control-plane node); ISSUER: the cluster's
    # issuer (`kubectl get --raw /.well-known/openid-configuration`, "issuer"). Or let
    # Vault fetch the keys: oidc_discovery_url="$ISSUER" (then Vault must be allowed to
    # read the cluster's discovery endpoints).
    : "${SA_PUBKEY:?set SA_PUBKEY to the PEM file of the service-account public key}"
    $BAO write auth/jwt/config jwt_validation_pubkeys=@"$SA_PUBKEY"
    subjects=$(printf '"system:serviceaccount:%s:'"$SERVICE_ACCOUNT"'",' ${NAMESPACES//,/ })
    $BAO write "auth/jwt/role/$ROLE" - <<JSON
{
  "role_type": "jwt",
  "bound_issuer": "${ISSUER:-https://kubernetes.default.svc.cluster.local}",
  "bound_audiences": ["$AUDIENCE"],
  "user_claim": "sub",
  "bound_claims": {"sub": [${subjects%,}]},
  "token_policies": ["$POLICY"],
  "token_ttl": "1h",
  "token_max_ttl": "24h"
}
JSON
    ;;
*)
    echo "AUTH must be kubernetes or jwt, not $AUTH" >&2
    exit 2
    ;;
esac

# 4. The first client secret (the Developer Console's), from stdin, so that it is in no
#    process list and no shell history (`bao kv put … field=-` would keep the file's
#    final newline: tr drops it); -cas=0 writes only if there is no secret yet. From
#    then on the brokers cycle it (rotate_every) and keep every change here.
tr -d '\r\n' | $BAO kv put -cas=0 "$SECRET" client_secret=-
