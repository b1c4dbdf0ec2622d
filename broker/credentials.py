"""Credential management behind ``add``, ``import``, ``remove``, ``rotate`` and ``doctor``.

Each operation checks everything it can before it changes anything, then
changes the keyring and the config file in the order that leaves nothing
half-written: a secret the issuer rejects is never stored, a config edit that
would not validate is never written, and a keyring item stored for a config
write that then fails is removed again.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import config, secrets
from broker.config import CredentialSettings
from broker.configedit import ConfigDocument
from broker.errors import BrokerError, ConfigError, IssuerError, SecretError
from broker.net import is_loopback
from broker.providers import fetch_token, issuer_client, token_request
from broker.tokens import Token


def verify(cred: CredentialSettings, secret: str) -> Token:
    """Ask the issuer for one token with ``secret``; raise IssuerError if it refuses."""

    async def once() -> Token:
        async with issuer_client(cred.policy.timeout, cred.ca_file) as client:
            async with asyncio.timeout(cred.policy.timeout):
                issued = await fetch_token(client, token_request(cred, secret), now=0.0)
        return issued.token

    try:
        return asyncio.run(once())
    except TimeoutError:
        raise IssuerError("timeout", f"no answer within {cred.policy.timeout:g}s") from None


def credential_settings(doc: ConfigDocument, name: str) -> CredentialSettings:
    settings = doc.validate()
    try:
        return settings.credentials[name]
    except KeyError:
        raise ConfigError(f"{doc.path}: no credential named {name!r}") from None


@dataclass
class Added:
    name: str
    config: Path
    verified: bool
    secrets_stored: int


def add(
    doc: ConfigDocument,
    name: str,
    table: dict[str, Any],
    new_secrets: list[str],
    *,
    check: bool = True,
) -> Added:
    """Add a credential whose secret(s) go to the keyring (``secret = "keyring"``)."""
    if not new_secrets or not all(new_secrets):
        raise SecretError(f"credential {name!r}: the secret is empty")
    doc.add_credential(name, table)  # validates name, duplicates and the whole config
    cred = credential_settings(doc, name)
    service, user = cred.secret.service, cred.secret.user
    if check:
        try:
            verify(cred, new_secrets[0])
        except IssuerError as exc:
            raise IssuerError(
                exc.error,
                f"{exc.description} — the secret was not stored"
                if exc.description
                else "the secret was not stored",
                status=exc.status,
                debug_id=exc.debug_id,
            ) from None
    if secrets.get_keyring(service, user, name) is not None:
        raise SecretError(
            f"credential {name!r}: the keyring already holds service={service!r} "
            f"username={user!r}; remove it first (`token-broker remove {name}` or secret-tool)"
        )
    stored: list[str] = []
    try:
        for i, secret in enumerate(new_secrets[:2]):
            item = user if i == 0 else user + secrets.NEXT_SUFFIX
            secrets.store_keyring(service, item, secret, name)
            stored.append(item)
        doc.write()
    except BaseException:
        for item in stored:  # leave the keyring as it was
            secrets.delete_keyring(service, item, name)
        raise
    return Added(name, doc.path, check, len(stored))


@dataclass
class Removed:
    name: str
    was_default: bool
    keyring_items: list[str] = field(default_factory=list)


def remove(doc: ConfigDocument, name: str) -> Removed:
    cred = credential_settings(doc, name)
    keyring_ref = cred.secret.kind == "keyring"
    if keyring_ref:
        secrets.keyring_backend(name)  # fail before touching the config if it is unusable
    was_default = doc.remove_credential(name)
    doc.write()
    result = Removed(name, was_default)
    if keyring_ref:
        service, user = cred.secret.service, cred.secret.user
        for item in (user, user + secrets.NEXT_SUFFIX):
            if secrets.delete_keyring(service, item, name):
                result.keyring_items.append(f"{service}/{item}")
    return result


@contextmanager
def _no_cycle(doc: ConfigDocument, name: str) -> Iterator[None]:
    """A rotation by hand holds the cycling lock, and never meets a cycle half done: both
    use the ``NAME#next`` item, and a cycle checks which secret is stored before it deletes."""
    from broker.console import StateFile
    from broker.errors import CycleError
    from broker.files import state_dir

    state = StateFile(state_dir(), name)
    if not state.directory.exists():  # this host never cycled a secret
        yield
        return
    cred = credential_settings(doc, name)
    try:
        with state.locked():
            step = state.load(getattr(cred, "credential_id", None) or "").step
            if step is not None:
                raise SecretError(
                    f"credential {name!r}: a secret cycle is in progress (step {step}); the "
                    f"daemon finishes it, or run `token-broker rotate {name} --auto`"
                )
            yield
    except CycleError as exc:
        raise SecretError(f"credential {name!r}: {exc}") from None


def rotate_start(doc: ConfigDocument, name: str, new_secret: str, *, check: bool = True) -> None:
    """Store ``new_secret`` beside the current one after the issuer accepted it."""
    with _no_cycle(doc, name):
        _rotate_start(doc, name, new_secret, check=check)


def _rotate_start(doc: ConfigDocument, name: str, new_secret: str, *, check: bool) -> None:
    service, user = _rotatable(doc, name)
    if secrets.get_keyring(service, user + secrets.NEXT_SUFFIX, name) is not None:
        raise SecretError(
            f"credential {name!r}: a rotation is in progress already; "
            f"run `token-broker rotate {name} --finish` or `--abort` first"
        )
    if not new_secret:
        raise SecretError(f"credential {name!r}: the new secret is empty")
    if secrets.get_keyring(service, user, name) == new_secret:
        raise SecretError(f"credential {name!r}: the new secret is the current one")
    if check:
        verify(credential_settings(doc, name), new_secret)
    secrets.store_keyring(service, user + secrets.NEXT_SUFFIX, new_secret, name)


def rotate_finish(doc: ConfigDocument, name: str) -> None:
    """Make the new secret the only one: copy it over the old item, then drop ``#next``."""
    with _no_cycle(doc, name):
        service, user = _rotatable(doc, name)
        upcoming = secrets.get_keyring(service, user + secrets.NEXT_SUFFIX, name)
        if upcoming is None:
            raise SecretError(f"credential {name!r}: no rotation in progress")
        # Both items hold the new secret between these two steps: never a moment without it.
        secrets.store_keyring(service, user, upcoming, name)
        secrets.delete_keyring(service, user + secrets.NEXT_SUFFIX, name)


def rotate_abort(doc: ConfigDocument, name: str) -> None:
    with _no_cycle(doc, name):
        service, user = _rotatable(doc, name)
        if not secrets.delete_keyring(service, user + secrets.NEXT_SUFFIX, name):
            raise SecretError(f"credential {name!r}: no rotation in progress")


def _rotatable(doc: ConfigDocument, name: str) -> tuple[str, str]:
    cred = credential_settings(doc, name)
    if cred.secret.kind != "keyring":
        raise SecretError(
            f"credential {name!r}: rotate works on keyring secrets; its secret is "
            f"{cred.secret.describe()}: replace that and run `token-broker reload`"
        )
    return cred.secret.service, cred.secret.user


# -- Adobe Developer Console import -----------------------------------------------------


@dataclass
class ConsoleCredential:
    name: str
    client_id: str
    client_secrets: list[str] = field(repr=False)
    scopes: list[str]
    org_id: str | None
    credential_id: str | None = None  # for secret cycling (DESIGN §11)
    console_org_id: str | None = None
    management_api: bool = False  # the project lists the I/O Management API


#: The I/O Management API's service code in a project JSON: secret cycling needs it.
MANAGEMENT_SERVICE = "AdobeIOManagementAPISDK"


def read_console_json(path: Path) -> tuple[list[ConsoleCredential], list[str]]:
    """Parse a Developer Console project/workspace JSON.

    Returns the OAuth Server-to-Server credentials and a sentence for each
    credential of another type that was refused.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{path}: not JSON (expected the Developer Console export)") from None
    try:
        project = data["project"]
        creds = project["workspace"]["details"]["credentials"]
        org_id = project.get("org", {}).get("ims_org_id")
        console_org = project.get("org", {}).get("id")
        if not isinstance(creds, list):
            raise TypeError
    except (KeyError, TypeError):
        raise ConfigError(
            f"{path}: not an Adobe Developer Console project JSON "
            "(no project.workspace.details.credentials list)"
        ) from None
    console_org_id = _id_text(console_org)
    services = project["workspace"]["details"].get("services")
    management = isinstance(services, list) and any(
        isinstance(x, dict) and x.get("code") == MANAGEMENT_SERVICE for x in services
    )
    found: list[ConsoleCredential] = []
    refused: list[str] = []
    for item in creds:
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: a credential entry is not an object")
        label = str(item.get("name") or item.get("id") or "unnamed")
        kind = item.get("integration_type")
        if kind != "oauth_server_to_server":
            why = " (Service Account/JWT credentials are retired by Adobe: convert it to "
            why += "OAuth Server-to-Server in the Developer Console)" if kind == "service" else ""
            refused.append(f"{label!r}: integration_type {kind!r} is not supported{why}")
            continue
        s2s = item.get("oauth_server_to_server")
        try:
            client_id = s2s["client_id"]
            client_secrets = s2s["client_secrets"]
            scopes = s2s.get("scopes", [])
            ok = isinstance(client_id, str) and client_id and isinstance(client_secrets, list)
            ok = ok and all(isinstance(x, str) and x for x in client_secrets) and client_secrets
            ok = ok and isinstance(scopes, list) and all(isinstance(x, str) for x in scopes)
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ConfigError(
                f"{path}: credential {label!r}: oauth_server_to_server needs client_id, "
                "a non-empty client_secrets list and a scopes list"
            )
        found.append(
            ConsoleCredential(
                label,
                client_id,
                client_secrets,
                scopes,
                org_id,
                _id_text(item.get("id"), digits=False),
                console_org_id,
                management,
            )  # fmt: skip
        )
    return found, refused


def _id_text(value: object, *, digits: bool = True) -> str | None:
    """A Developer Console id as the config keeps it: a string (JSON may say 123)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or "/" in value or not value.isprintable():
        return None
    return value if value.isdigit() or not digits else None


def console_name(label: str) -> str:
    """A credential name from a Console label: 'My Credential (S2S)' -> 'my-credential-s2s'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.").lower()
    return name or "adobe"


def import_console(
    doc: ConfigDocument,
    found: list[ConsoleCredential],
    names: list[str],
    *,
    check: bool = True,
    ims_url: str | None = None,
) -> list[Added]:
    """Add every credential; all are checked (names, config, issuer) before any is stored."""
    tables = []
    for cred, name in zip(found, names, strict=True):
        table: dict[str, Any] = {
            "provider": "adobe",
            "client_id": cred.client_id,
            "org_id": cred.org_id,
            "scopes": cred.scopes,
            "ims_url": ims_url,
            # Recorded whenever known: secret cycling needs them (and rotate_every).
            "credential_id": cred.credential_id if cred.console_org_id else None,
            "console_org_id": cred.console_org_id if cred.credential_id else None,
        }
        doc.add_credential(name, table)  # in memory: validates before anything is stored
        tables.append((name, table, cred))
    if check:
        for name, _, cred in tables:
            verify(credential_settings(doc, name), cred.client_secrets[0])
    # Re-read the file: add() writes it once per credential from a clean document.
    fresh = ConfigDocument(doc.path)
    done: list[Added] = []
    try:
        for name, table, cred in tables:
            done.append(add(fresh, name, table, cred.client_secrets, check=False))
    except BaseException:
        for added in done:  # nothing half-imported
            remove(ConfigDocument(doc.path), added.name)
        raise
    for added in done:
        added.verified = check
    return done


# -- doctor -----------------------------------------------------------------------------


@dataclass
class Check:
    ok: bool | None  # None: a warning
    text: str

    @property
    def verdict(self) -> str:
        return {True: "ok", False: "FAIL", None: "warn"}[self.ok]


def doctor(path: Path, *, offline: bool) -> list[Check]:
    checks: list[Check] = []
    try:
        settings = config.load(path, serving=True)
    except ConfigError as exc:
        return [Check(False, f"config: {exc}")]
    checks.append(Check(True, f"config {path} found and valid"))
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
    probe_user = f"doctor-probe-{os.getpid()}"
    try:
        backend = secrets.keyring_backend("doctor")
        name = f"{type(backend).__module__}.{type(backend).__name__}"
        secrets.store_keyring("token-broker-doctor", probe_user, "probe", "doctor")
        got = secrets.get_keyring("token-broker-doctor", probe_user, "doctor")
        secrets.delete_keyring("token-broker-doctor", probe_user, "doctor")
        if got != "probe":
            raise SecretError(f"keyring backend {name} did not return what was stored")
    except SecretError as exc:
        return Check(False if needed else None, f"keyring: {exc}")
    return Check(True, f"keyring backend {name} works (set/get/delete of a probe item)")


def _mode_checks(settings: config.Settings) -> list[Check]:
    return [
        Check(f.problem is None, f.problem or f"{f.what} {f.path} has mode {f.mode:04o}")
        for f in secrets.file_modes(settings)
    ]
