# The Vault / OpenBao policy "token-broker" of the brokers of ../vault-sidecar and
# ../vault-cluster: the least a broker that cycles the secret (rotate_every) needs, for
# the secret `secret = "vault:secret/token-broker/adobe#client_secret"` (KV version 2
# mounted at secret/; KV v2 guards a secret's data/ and metadata/ paths apart).
# Written by vault-setup.example.sh (`bao policy write token-broker vault-policy.hcl`).
# Every token needs Vault's `default` policy as well, for auth/token/renew-self: the
# roles there keep it (never set token_no_default_policy).
#
# A broker without rotate_every needs only: read on the secret's data and metadata
# paths (it reads the secret and polls its current version) and create, update on
# brokers/* (it reports the version it uses, every poll).

# The secret: read it; a cycling broker writes the new version (check-and-set).
path "secret/data/token-broker/adobe" {
  capabilities = ["read", "create", "update"]
}
# Its current version and Vault's time stamps, polled by every broker.
path "secret/metadata/token-broker/adobe" {
  capabilities = ["read"]
}
# The lease and the state of the cycle under way, beside the secret (check-and-set).
path "secret/data/token-broker/adobe/cycle" {
  capabilities = ["read", "create", "update"]
}
# Each broker's report of the version it uses; the cycling broker reads them all...
path "secret/data/token-broker/adobe/brokers/*" {
  capabilities = ["read", "create", "update"]
}
path "secret/metadata/token-broker/adobe/brokers/" {
  capabilities = ["list"]
}
# ...and removes the reports of brokers that are gone (older than rotate_grace).
path "secret/metadata/token-broker/adobe/brokers/*" {
  capabilities = ["delete"]
}
