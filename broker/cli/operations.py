"""The operations behind ``add``, ``import``, ``remove`` and ``rotate``.

Each operation checks everything it can before it changes anything, then
changes the keyring and the config file in the order that leaves nothing
half-written: a secret the issuer rejects is never stored, a config edit that
would not validate is never written, and a keyring item stored for a config
write that then fails is removed again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import secrets
from broker.cli.secretwrite import Stored, write_secret
from broker.config import CredentialSettings
from broker.configedit import ConfigDocument
from broker.devconsole import ConsoleCredential
from broker.doctor import verify
from broker.errors import ConfigError, IssuerError, SecretError


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
