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
from collections.abc import Callable, Iterator
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
from broker.secrets import SecretRef
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
    stored: Stored | None = None  # where the secret went, and what the user still has to do
    #: ``[server] default`` as the config has it after this addition, when it names
    #: another credential (the first kept serving ``GET /token``) or this one (--default).
    default: str | None = None
    default_written: bool = False  # this addition wrote ``[server] default``


def add(
    doc: ConfigDocument,
    name: str,
    table: dict[str, Any],
    new_secrets: list[str],
    *,
    check: bool = True,
    force: bool = False,
    make_default: bool = False,
) -> Added:
    """Add a credential and write its secret(s) where its ``secret`` reference points.

    When the config held exactly one credential and no ``[server] default``, that
    one is written as the default, so tools that asked ``GET /token`` keep getting
    the token they got before; ``make_default`` makes the new credential the default.
    """
    if not new_secrets or not all(new_secrets):
        raise SecretError(f"credential {name!r}: the secret is empty")
    before = list(doc.credentials())
    doc.add_credential(name, table)  # validates name, duplicates and the whole config
    written = _keep_default(doc, name, before, make_default)
    cred = credential_settings(doc, name)
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
    stored = write_secret(cred.secret, name, new_secrets[:2], force=force)
    try:
        doc.write()
    except BaseException:
        stored.undo()  # leave the secret store as it was
        raise
    return Added(
        name, doc.path, check, stored.count, stored, doc.default() if written else None, written
    )


def _keep_default(doc: ConfigDocument, name: str, before: list[str], make_default: bool) -> bool:
    """Write ``[server] default`` where it is needed; True if it was written."""
    if make_default:
        doc.set_default(name)
        return True
    if doc.default() is None and len(before) == 1:
        doc.set_default(before[0])  # GET /token served it: it still does
        return True
    return False


# -- writing a new credential's secret, one function per reference kind -----------------


@dataclass
class Stored:
    """Where ``add``/``import`` put a credential's secret(s), and how to take them back."""

    where: str  # in words, for the command's output
    count: int  # secrets written (0: the user writes them, see ``todo``)
    todo: list[str] = field(default_factory=list)  # commands the user still has to run
    undo: Callable[[], None] = field(default=lambda: None, repr=False)


SecretWriter = Callable[[SecretRef, str, list[str], bool], Stored]


def write_secret(ref: SecretRef, name: str, values: list[str], *, force: bool = False) -> Stored:
    """Write the secret(s) of a new credential ``name`` where ``ref`` points.

    ``values``: one secret, or two (a Console project may list two client secrets;
    the second goes where a rotation keeps the new one: ``NAME#next`` or ``PATH.next``).
    A writer checks before it writes, and never replaces a different secret unless
    ``force``. Adding a reference kind means adding its writer to ``SECRET_WRITERS``.
    """
    writer = SECRET_WRITERS.get(ref.kind)
    if writer is None:
        raise SecretError(
            f"credential {name!r}: token-broker cannot write a {ref.kind}: secret; store it "
            "there yourself, or use keyring, file:PATH or systemd:NAME"
        )
    return writer(ref, name, values, force)


def _write_keyring(ref: SecretRef, name: str, values: list[str], force: bool) -> Stored:
    service, user = ref.service, ref.user
    items = [user, user + secrets.NEXT_SUFFIX][: len(values)]
    try:
        secrets.keyring_backend(name)
    except SecretError as exc:  # a headless host: name the option that gets past it
        cause = str(exc).removesuffix(secrets.WAY_OUT).rstrip("; ")
        raise SecretError(
            f"{cause}; start a Secret Service (e.g. gnome-keyring), or pass --secret "
            "file:PATH (a 0600 file the daemon reads) or --secret systemd:NAME (for the "
            "system service)"
        ) from None
    for item in items:
        present = secrets.get_keyring(service, item, name)
        if present is not None and present != values[items.index(item)] and not force:
            raise SecretError(
                f"credential {name!r}: the keyring already holds service={service!r} "
                f"username={item!r}; remove it first (`token-broker remove {name}` or "
                "secret-tool), or pass --force to replace it"
            )
    stored: list[str] = []
    try:
        for item, value in zip(items, values, strict=True):
            secrets.store_keyring(service, item, value, name)
            stored.append(item)
    except BaseException:
        for item in stored:
            secrets.delete_keyring(service, item, name)
        raise

    def undo() -> None:
        for item in stored:
            secrets.delete_keyring(service, item, name)

    return Stored(f"the keyring (service {service!r}, username {user!r})", len(stored), [], undo)


def _write_file(ref: SecretRef, name: str, values: list[str], force: bool) -> Stored:
    """``file:PATH``: 0600, its directory made 0700 if missing; ``PATH.next`` for a second."""
    from broker.files import atomic_write, make_private_dir

    assert ref.path is not None
    paths = [ref.path, secrets.next_file(ref.path)][: len(values)]
    previous: dict[Path, bytes | None] = {}
    for path, value in zip(paths, values, strict=True):
        previous[path] = _existing(path, name, value, force)
    try:
        make_private_dir(ref.path.parent)
    except OSError as exc:
        raise SecretError(
            f"credential {name!r}: cannot create the directory {ref.path.parent}: "
            f"{exc.strerror or exc}"
        ) from None
    written: list[Path] = []

    def undo() -> None:
        for path in written:
            old = previous[path]
            if old is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write(path, old, 0o600)

    try:
        for path, value in zip(paths, values, strict=True):
            data = (value + "\n").encode()
            if previous[path] == data:
                continue  # the same secret is there already
            atomic_write(path, data, 0o600)
            written.append(path)
    except OSError as exc:
        undo()
        raise SecretError(
            f"credential {name!r}: cannot write the secret file {path}: {exc.strerror or exc}"
        ) from None
    except BaseException:
        undo()
        raise
    where = f"the file {ref.path} (mode 0600)"
    if len(paths) > 1:
        where += f" and {paths[1]} (the second client secret, used as a rotation's new one)"
    return Stored(where, len(paths), [], undo)


def _existing(path: Path, name: str, value: str, force: bool) -> bytes | None:
    """The bytes of a secret file that may be replaced (None: none there); else SecretError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SecretError(f"credential {name!r}: cannot read {path}: {exc.strerror}") from None
    if data.rstrip(b"\r\n") == value.encode() or force or not data.strip():
        return data
    raise SecretError(
        f"credential {name!r}: {path} exists and holds something else; pass --force to "
        "replace it, or name another file"
    )


def _write_systemd(ref: SecretRef, name: str, values: list[str], force: bool) -> Stored:
    """``systemd:NAME``: nothing is written here; systemd-creds encrypts it for the service."""
    target = f"/etc/credstore.encrypted/token-broker.{ref.name}"
    todo = [
        f"systemd-creds encrypt --name={ref.name} - {target}",
        f"LoadCredentialEncrypted={ref.name}:{target}",
    ]
    return Stored(f"systemd credential {ref.name!r} (not written yet: see below)", 0, todo)


def _refuse_env(ref: SecretRef, name: str, values: list[str], force: bool) -> Stored:
    raise SecretError(
        f"credential {name!r}: --secret env:{ref.variable} cannot be written: an "
        "environment variable belongs to whatever starts the daemon, not to token-broker; "
        "use keyring, file:PATH or systemd:NAME (or set the variable there yourself and "
        f'write secret = "env:{ref.variable}" in the config)'
    )


SECRET_WRITERS: dict[str, SecretWriter] = {
    "keyring": _write_keyring,
    "file": _write_file,
    "systemd": _write_systemd,
    "env": _refuse_env,
}


@dataclass
class Removed:
    name: str
    was_default: bool
    keyring_items: list[str] = field(default_factory=list)
    left: str | None = None  # a secret outside the keyring, left where it is (in words)


def remove(doc: ConfigDocument, name: str) -> Removed:
    cred = credential_settings(doc, name)
    keyring_ref = cred.secret.kind == "keyring"
    if keyring_ref:
        secrets.keyring_backend(name)  # fail before touching the config if it is unusable
    was_default = doc.remove_credential(name)
    doc.write()
    # A file or systemd credential may be shared or managed elsewhere: say, do not delete.
    left = None if keyring_ref else cred.secret.describe()
    result = Removed(name, was_default, left=left)
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
    credential_id: str | None = None  # for secret cycling (rotate --auto)
    console_org_id: str | None = None
    management_api: bool = False  # the project lists the I/O Management API
    project: str | None = None  # the project's name (project.name, else project.title)


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
    project_name = next(
        (v for v in (project.get("name"), project.get("title")) if isinstance(v, str) and v),
        None,
    )
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
                project_name,
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
    """A credential name from a Console label: 'My Project (S2S)' -> 'my-project-s2s'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.").lower()
    return name or "adobe"


def default_names(found: list[ConsoleCredential]) -> list[str]:
    """Names for imported credentials: the project's name, which tells projects apart.

    Adobe labels a project's OAuth Server-to-Server credential "Credential in
    Production" or "OAuth Server-to-Server" in every project, so names made from
    labels collide as soon as a second project is imported. With several such
    credentials in one project the first gets the project's name and the next ones
    ``-2``, ``-3``...; without a project name the credential's label is used.
    """
    names: list[str] = []
    for i, cred in enumerate(found):
        base = console_name(cred.project) if cred.project else console_name(cred.name)
        names.append(base if i == 0 or not cred.project else f"{base}-{i + 1}")
    return names


def import_console(
    doc: ConfigDocument,
    found: list[ConsoleCredential],
    names: list[str],
    *,
    check: bool = True,
    ims_url: str | None = None,
    secret_refs: list[str | None] | None = None,
    force: bool = False,
    make_default: bool = False,
) -> list[Added]:
    """Add every credential; all are checked (names, config, issuer) before any is stored.

    ``secret_refs``: the ``secret = …`` of each credential (None: the keyring).
    ``make_default``: the first imported credential becomes ``[server] default``.
    If storing one fails, the config file and the secrets written so far are put
    back as they were: nothing is half-imported.
    """
    refs = secret_refs or [None] * len(found)
    tables = []
    for cred, name, ref in zip(found, names, refs, strict=True):
        table: dict[str, Any] = {
            "provider": "adobe",
            "client_id": cred.client_id,
            "org_id": cred.org_id,
            "scopes": cred.scopes,
            "ims_url": ims_url,
            "secret": ref,
            # Recorded whenever known: secret cycling needs them (and rotate_every).
            "credential_id": cred.credential_id if cred.console_org_id else None,
            "console_org_id": cred.console_org_id if cred.credential_id else None,
        }
        doc.add_credential(name, table)  # in memory: validates before anything is stored
        tables.append((name, table, cred))
    if check:
        for name, _, cred in tables:
            verify(credential_settings(doc, name), cred.client_secrets[0])
    original = doc.path.read_bytes() if doc.path.exists() else None
    # Re-read the file: add() writes it once per credential from a clean document.
    fresh = ConfigDocument(doc.path)
    done: list[Added] = []
    try:
        for i, (name, table, cred) in enumerate(tables):
            first = make_default and i == 0
            done.append(
                add(
                    fresh,
                    name,
                    table,
                    cred.client_secrets,
                    check=False,
                    force=force,
                    make_default=first,
                )  # fmt: skip
            )
    except BaseException:
        for added in done:  # nothing half-imported
            if added.stored is not None:
                added.stored.undo()
        _restore(doc.path, original)
        raise
    for added in done:
        added.verified = check
    return done


def _restore(path: Path, original: bytes | None) -> None:
    from broker.files import atomic_write

    if original is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write(path, original, path.stat().st_mode & 0o777)


# -- doctor -----------------------------------------------------------------------------


@dataclass
class Check:
    ok: bool | None  # None: a warning
    text: str

    @property
    def verdict(self) -> str:
        return {True: "ok", False: "FAIL", None: "warn"}[self.ok]


def doctor(explicit: str | None, *, offline: bool) -> list[Check]:
    """The checklist of ``token-broker doctor`` for the config ``explicit`` names, or the one
    the search order finds (so that a missing file is reported as not found where looked)."""
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
    return [
        Check(f.problem is None, f.problem or f"{f.what} {f.path} has mode {f.mode:04o}")
        for f in secrets.file_modes(settings)
    ]
