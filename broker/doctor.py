"""The checks of ``token-broker doctor``: the config, file modes, the keyring, the
listen addresses, the TLS files, Vault (the login, what its policy allows, the
secret's fields), every credential's secret and, unless offline, one token
request per credential.

Each check is a :class:`~broker.checks.Check`; doctor reads every secret the way the
daemon does (a keyring item through the child process, a Vault secret through the
``[vault]`` login), so it checks exactly what ``serve`` will do.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from broker.checks import Check
from broker.errors import BrokerError, ConfigError, SecretError

if TYPE_CHECKING:
    from broker import config
    from broker.schema import CredentialSettings
    from broker.stores import Context, VaultRef, VaultSession
    from broker.tokens import Token


def run_checks(explicit: str | None, *, offline: bool) -> list[Check]:
    """The checklist of ``token-broker doctor`` for the config ``explicit`` names, or the one
    the search order finds (so that a missing file is reported as not found where looked)."""
    from broker import config

    try:
        settings = config.load(explicit, serving=True)
    except ConfigError as exc:
        return [Check(False, f"config: {exc}")]
    return asyncio.run(_checks(settings, offline=offline))


@asynccontextmanager
async def stores(
    settings: config.Settings, on_token: Callable[[str], None] = lambda token: None
) -> AsyncIterator[Context]:
    """What the secret stores of ``settings`` need, for doctor and the commands: its
    Vault login when it has a ``[vault]`` table (``on_token``: see ``session_for``)."""
    from broker.stores import Context
    from broker.stores.vault import session_for

    vault = session_for(settings.vault, on_token) if settings.vault is not None else None
    try:
        yield Context(vault=vault)
    finally:
        if vault is not None:
            await vault.vault.aclose()


async def _checks(settings: config.Settings, *, offline: bool) -> list[Check]:
    from broker import config
    from broker.net import is_loopback
    from broker.stores import KeyringRef

    checks = [Check(True, f"config {settings.path} found and valid")]
    checks += [
        Check(f.problem is None, f.problem or f"{f.what} {f.path} has mode {f.mode:04o}")
        for f in settings.file_modes()
    ]
    uses_keyring = any(isinstance(c.secret, KeyringRef) for c in settings.credentials.values())
    checks.append(_keyring_check(uses_keyring))
    for listen in settings.server.listen:
        if isinstance(listen, config.TcpListen) and not is_loopback(listen.host):
            text = f"listen {listen} is reachable from other hosts (allow_remote, client keys)"
            checks.append(Check(None, text))
        else:
            checks.append(Check(True, f"listen {listen} is loopback-only"))
    checks += _tls_checks(settings)
    async with stores(settings) as ctx:
        if ctx.vault is not None:  # stores() logs in for [vault]
            checks += await _vault_checks(settings, ctx.vault)
        for name, cred in settings.credentials.items():
            checks += await _credential_checks(name, cred, ctx, offline)
    return checks


async def _credential_checks(
    name: str, cred: CredentialSettings, ctx: Context, offline: bool
) -> list[Check]:
    try:
        found = await cred.secret.read(name, ctx)
    except SecretError as exc:
        return [Check(False, f"secret of {name!r}: {exc}")]
    checks = [Check(True, f"secret of {name!r} resolvable ({cred.secret.describe()})")]
    if offline:
        return checks
    try:
        await verify_async(cred, found[0])
    except BrokerError as exc:
        checks.append(Check(False, f"issuer of {name!r} refused or failed: {exc}"))
    else:
        checks.append(Check(True, f"issuer of {name!r} reachable and the credential accepted"))
    return checks


#: What a broker needs on the KV v2 paths of its secret (every broker: read the
#: secret and its version, write its report); a broker that cycles, as well: write
#: the secret and the cycle's lease, list and remove the reports of brokers gone.
_READER = {"data": {"read"}, "metadata": {"read"}, "report": {"create", "update"}}
_CYCLER = {
    **_READER,
    "data": {"read", "create", "update"},
    "report": {"read", "create", "update"},
    "cycle": {"read", "create", "update"},
    "reports": {"list"},
    "report-metadata": {"delete"},
}


async def _vault_checks(settings: config.Settings, vault: VaultSession) -> list[Check]:
    """The login, and per ``vault:`` secret what the policy allows against what is needed."""
    from broker.stores import VaultRef

    paths = {
        name: _kv_paths(cred.secret)
        for name, cred in settings.credentials.items()
        if isinstance(cred.secret, VaultRef)
    }
    try:
        allowed = await vault.vault.capabilities(
            sorted({p for by_role in paths.values() for p in by_role.values()})
        )
    except SecretError as exc:
        return [Check(False, f"Vault: {exc}")]
    checks = [Check(True, f"Vault {vault.vault.address}: logged in ({vault.vault.login.method})")]
    for name, path_of in paths.items():
        cred = settings.credentials[name]
        missing = []
        for role, caps in (_CYCLER if cred.cycles_secret else _READER).items():
            have = set(allowed.get(path_of[role], ()))
            if "root" not in have and not caps <= have:
                missing.append(f"{', '.join(sorted(caps - have))} on {path_of[role]}")
        what = "cycle it" if cred.cycles_secret else "read it and report"
        if missing:
            checks.append(Check(False, f"Vault policy of {name!r} does not let this broker "
                                       f"{what}: needs {'; '.join(missing)}"))  # fmt: skip
        else:
            checks.append(Check(True, f"Vault policy of {name!r} lets this broker {what}"))
    return checks


def _kv_paths(ref: VaultRef) -> dict[str, str]:
    """The API paths (KV v2) of a secret, its lease and one report, by their role."""
    mount, report = ref.mount, ref.report_path("doctor")
    return {
        "data": f"{mount}/data/{ref.path}",
        "metadata": f"{mount}/metadata/{ref.path}",
        "cycle": f"{mount}/data/{ref.cycle_path}",
        "report": f"{mount}/data/{report}",
        "reports": f"{mount}/metadata/{ref.reports_path}/",
        "report-metadata": f"{mount}/metadata/{report}",
    }


def _tls_checks(settings: config.Settings) -> list[Check]:
    """The local CA and leaf of the HTTPS listeners, or the tls_cert/tls_key files."""
    server = settings.server
    https = (*server.ims_listen, *server.tls_listen)
    if not https:
        return []
    from broker import tls

    if server.tls_cert and server.tls_key:
        try:
            info = tls.load_cert_files(server.tls_cert, server.tls_key)
        except BrokerError as exc:
            return [Check(False, f"TLS: {exc}")]
        if missing := info.missing(t.host for t in https):
            return [Check(False, f"TLS: {server.tls_cert} does not name {', '.join(missing)}")]
        return [Check(True, f"TLS: {server.tls_cert} is valid and names the HTTPS listeners")]
    files = tls.TlsFiles.default()
    return [Check(c.ok, f"TLS: {c.text}") for c in tls.doctor(files, [t.host for t in https])]


def _keyring_check(needed: bool) -> Check:
    from broker.stores import keyring

    probe_user = f"doctor-probe-{os.getpid()}"
    # The keyring functions name a credential in each message; this probe is none.
    label = "doctor-probe"
    try:
        backend = keyring.backend(label)
        name = f"{type(backend).__module__}.{type(backend).__name__}"
        keyring.store("token-broker-doctor", probe_user, "probe", label)
        got = keyring.get("token-broker-doctor", probe_user, label)
        keyring.delete("token-broker-doctor", probe_user, label)
        if got != "probe":
            raise SecretError(f"keyring backend {name} did not return what was stored")
    except SecretError as exc:
        text = str(exc).replace(f"credential {label!r}: ", "")
        if not needed:
            text += " (no credential uses the keyring: only add/import to it would fail)"
        return Check(False if needed else None, f"keyring: {text}")
    return Check(True, f"keyring backend {name} works (set/get/delete of a probe item)")


async def verify_async(cred: CredentialSettings, secret: str) -> Token:
    """Ask the issuer for one token with ``secret``; IssuerError if it refuses (``add``,
    ``import`` and ``rotate`` ask it before they store a secret)."""
    from broker.providers import request_token
    from broker.upstream import client as issuer_client

    async with issuer_client(cred.policy.timeout, cred.ca_file) as client:
        request = cred.token_request(secret)
        return (await request_token(client, request, now=0.0, timeout=cred.policy.timeout)).token
