"""The checks of ``token-broker doctor``: the config, file modes, the keyring, the
listen addresses, the TLS files, every credential's secret and, unless offline, one
token request per credential.

:class:`Check` is the one check-result type: other modules' checks (the local CA's,
in :mod:`broker.tls`) return it too. This module imports only the standard library and
:mod:`broker.errors` at import time, so any module may import :class:`Check`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.errors import BrokerError, ConfigError, IssuerError, SecretError

if TYPE_CHECKING:
    from broker import config
    from broker.config import CredentialSettings
    from broker.tokens import Token


@dataclass(frozen=True)
class Check:
    """One line of ``doctor``: passed (True), failed (False) or a warning (None)."""

    ok: bool | None
    text: str

    @property
    def verdict(self) -> str:
        return {True: "ok", False: "FAIL", None: "warn"}[self.ok]


def run_checks(explicit: str | None, *, offline: bool) -> list[Check]:
    """The checklist of ``token-broker doctor`` for the config ``explicit`` names, or the one
    the search order finds (so that a missing file is reported as not found where looked)."""
    import asyncio

    from broker import config, secrets
    from broker.net import is_loopback

    checks: list[Check] = []
    try:
        settings = config.load(explicit, serving=True)
    except ConfigError as exc:
        return [Check(False, f"config: {exc}")]
    checks.append(Check(True, f"config {settings.path} found and valid"))
    checks += _mode_checks(settings)
    uses_keyring = any(c.secret.kind == "keyring" for c in settings.credentials.values())
    checks.append(_keyring_check(uses_keyring))
    for listen in settings.server.listen:
        if isinstance(listen, config.TcpListen) and not is_loopback(listen.host):
            text = f"listen {listen} is reachable from other hosts (allow_remote, client keys)"
            checks.append(Check(None, text))
        else:
            checks.append(Check(True, f"listen {listen} is loopback-only"))
    checks += _tls_checks(settings)
    for name, cred in settings.credentials.items():
        try:
            # The daemon's own path (keyring items via its child process): doctor
            # checks exactly what `serve` will do.
            found = asyncio.run(secrets.resolve(cred.secret, name))
        except SecretError as exc:
            checks.append(Check(False, f"secret of {name!r}: {exc}"))
            continue
        where = cred.secret.describe()
        checks.append(Check(True, f"secret of {name!r} resolvable ({where})"))
        if offline:
            continue
        try:
            verify(cred, found[0])
        except BrokerError as exc:
            checks.append(Check(False, f"issuer of {name!r} refused or failed: {exc}"))
        else:
            checks.append(Check(True, f"issuer of {name!r} reachable and the credential accepted"))
    return checks


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
        missing = info.missing(t.host for t in https)
        if missing:
            return [Check(False, f"TLS: {server.tls_cert} does not name {', '.join(missing)}")]
        return [Check(True, f"TLS: {server.tls_cert} is valid and names the HTTPS listeners")]
    files = tls.TlsFiles.default()
    return [Check(c.ok, f"TLS: {c.text}") for c in tls.doctor(files, [t.host for t in https])]


def _keyring_check(needed: bool) -> Check:
    import os

    from broker import secrets

    probe_user = f"doctor-probe-{os.getpid()}"
    # The secrets module names a credential in each message; this probe is none.
    label = "doctor-probe"
    try:
        backend = secrets.keyring_backend(label)
        name = f"{type(backend).__module__}.{type(backend).__name__}"
        secrets.store_keyring("token-broker-doctor", probe_user, "probe", label)
        got = secrets.get_keyring("token-broker-doctor", probe_user, label)
        secrets.delete_keyring("token-broker-doctor", probe_user, label)
        if got != "probe":
            raise SecretError(f"keyring backend {name} did not return what was stored")
    except SecretError as exc:
        text = str(exc).replace(f"credential {label!r}: ", "")
        if not needed:
            text += " (no credential uses the keyring: only add/import to it would fail)"
        return Check(False if needed else None, f"keyring: {text}")
    return Check(True, f"keyring backend {name} works (set/get/delete of a probe item)")


def _mode_checks(settings: config.Settings) -> list[Check]:
    from broker import secrets

    return [
        Check(f.problem is None, f.problem or f"{f.what} {f.path} has mode {f.mode:04o}")
        for f in secrets.file_modes(settings)
    ]


def verify(cred: CredentialSettings, secret: str) -> Token:
    """Ask the issuer for one token with ``secret``; raise IssuerError if it refuses.

    ``add``, ``import`` and ``rotate`` run it before they store a secret.
    """
    import asyncio

    from broker.providers import fetch_token, issuer_client, token_request

    async def once() -> Token:
        async with issuer_client(cred.policy.timeout, cred.ca_file) as client:
            async with asyncio.timeout(cred.policy.timeout):
                issued = await fetch_token(client, token_request(cred, secret), now=0.0)
        return issued.token

    try:
        return asyncio.run(once())
    except TimeoutError:
        raise IssuerError("timeout", f"no answer within {cred.policy.timeout:g}s") from None
