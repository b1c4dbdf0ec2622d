"""The operations behind ``add``, ``import``, ``remove`` and ``rotate``.

Each operation checks everything it can before it changes anything, then
changes the secret store and the config file in the order that leaves nothing
half-written: a secret the issuer rejects is never stored, a config edit that
would not validate is never written, and a secret stored for a config write
that then fails is removed again. Secrets are written through their store
(:mod:`broker.stores`): the keyring, a file, Vault alike; a rotation by hand
uses the same two-secret protocol as secret cycling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from broker.configedit import ConfigDocument
from broker.devconsole import ConsoleCredential
from broker.doctor import stores, verify_async
from broker.errors import CycleError, IssuerError, SecretError
from broker.files import atomic_write
from broker.schema import CredentialSettings
from broker.stores import SecretWriter, Stored


@dataclass
class Added:
    name: str
    stored: Stored  # where the secret went, and what the user still has to do
    #: ``[server] default`` when this addition wrote it, naming another credential (the
    #: first kept serving ``GET /token``) or this one (--default); None when it did not.
    default: str | None = None


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
    default = name if make_default else None
    if not make_default and doc.default() is None and len(before) == 1:
        default = before[0]  # GET /token served it: it still does
    if default is not None:
        doc.set_default(default)
    settings = doc.validate()
    cred = settings.credential(name)

    async def verify_and_store() -> Stored:
        if check:
            try:
                await verify_async(cred, new_secrets[0])
            except IssuerError as exc:
                note = "the secret was not stored"
                raise IssuerError(
                    exc.error,
                    f"{exc.description} — {note}" if exc.description else note,
                    status=exc.status,
                    debug_id=exc.debug_id,
                ) from None
        async with stores(settings) as ctx:
            return await cred.secret.store_new(name, new_secrets[:2], force=force, ctx=ctx)

    stored = asyncio.run(verify_and_store())
    try:
        doc.write()
    except BaseException:
        asyncio.run(stored.undo())  # leave the secret store as it was
        raise
    return Added(name, stored, default)


@dataclass
class Removed:
    was_default: bool
    keyring_items: list[str]
    left: str | None  # a secret outside the broker's own stores, left in place


def remove(doc: ConfigDocument, name: str) -> Removed:
    cred = doc.validate().credential(name)
    cred.secret.check_removal(name)  # fail before touching the config if it cannot be done
    was_default = doc.remove_credential(name)
    doc.write()
    # A file, a systemd credential, a Vault secret may be shared or managed elsewhere:
    # say, do not delete.
    left = None if cred.secret.owned else cred.secret.describe()
    deleted = asyncio.run(cred.secret.remove(name)) if cred.secret.owned else []
    return Removed(was_default, deleted, left)


async def _rotating(
    doc: ConfigDocument,
    name: str,
    step: Callable[[SecretWriter, CredentialSettings], Awaitable[None]],
) -> None:
    """Run one step of a rotation by hand on ``name``'s store, holding the cycling lock:
    a rotation by hand and a cycle use the same second secret, so never both at once,
    and never over a cycle left half done."""
    from broker.cycling import state_store
    from broker.files import state_dir
    from broker.providers.adobe import AdobeSettings

    settings = doc.validate()
    cred = settings.credential(name)
    async with stores(settings) as ctx:
        try:
            writer = cred.secret.writer(name, ctx)
        except SecretError:
            raise SecretError(
                f"credential {name!r}: rotate cannot write a second secret to "
                f"{cred.secret.describe()} ({cred.secret.unwritable()}); replace the secret "
                "there and run `token-broker reload`"
            ) from None
        if not isinstance(cred, AdobeSettings) or not cred.cycling:
            return await step(writer, cred)
        state = state_store(name, cred, directory=state_dir(), vault=ctx.vault)
        try:
            async with state.locked():
                found = (await state.load(cred.credential_id or "")).step
                if found is not None:
                    raise SecretError(
                        f"credential {name!r}: a secret cycle is in progress (step {found}); "
                        f"the daemon finishes it, or run `token-broker rotate {name} --auto`"
                    )
                return await step(writer, cred)
        except CycleError as exc:
            raise SecretError(f"credential {name!r}: {exc}") from None


def rotate_start(doc: ConfigDocument, name: str, new_secret: str, *, check: bool = True) -> None:
    """Store ``new_secret`` beside the current one after the issuer accepted it."""

    async def start(writer: SecretWriter, cred: CredentialSettings) -> None:
        if await writer.upcoming() is not None:
            raise SecretError(
                f"credential {name!r}: a rotation is in progress already; "
                f"run `token-broker rotate {name} --finish` or `--abort` first"
            )
        if not new_secret:
            raise SecretError(f"credential {name!r}: the new secret is empty")
        if await writer.current() == new_secret:
            raise SecretError(f"credential {name!r}: the new secret is the current one")
        if check:
            await verify_async(cred, new_secret)
        await writer.put_upcoming(new_secret)

    asyncio.run(_rotating(doc, name, start))


def rotate_finish(doc: ConfigDocument, name: str) -> None:
    """Make the new secret the only one (it replaces the old, which is forgotten)."""

    async def finish(writer: SecretWriter, cred: CredentialSettings) -> None:
        if await writer.upcoming() is None:
            raise SecretError(f"credential {name!r}: no rotation in progress")
        await writer.promote()  # never a moment without the new secret in the store
        await writer.finish()

    asyncio.run(_rotating(doc, name, finish))


def rotate_abort(doc: ConfigDocument, name: str) -> None:
    """Forget the new secret; the old one stays the only one."""

    async def abort(writer: SecretWriter, cred: CredentialSettings) -> None:
        if await writer.upcoming() is None:
            raise SecretError(f"credential {name!r}: no rotation in progress")
        await writer.drop_upcoming()

    asyncio.run(_rotating(doc, name, abort))


def import_console(
    doc: ConfigDocument,
    found: list[ConsoleCredential],
    names: list[str],
    *,
    check: bool = True,
    ims_url: str | None = None,
    secret_refs: list[str | None],
    force: bool = False,
    make_default: bool = False,
) -> list[Added]:
    """Add every credential; all are checked (names, config, issuer) before any is stored.

    ``secret_refs``: the ``secret = …`` of each credential (None: the keyring).
    ``make_default``: the first imported credential becomes ``[server] default``.
    If storing one fails, the config file and the secrets written so far are put
    back as they were: nothing is half-imported.
    """
    tables = []
    for cred, name, ref in zip(found, names, secret_refs, strict=True):
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
            asyncio.run(verify_async(doc.validate().credential(name), cred.client_secrets[0]))
    original = doc.path.read_bytes() if doc.path.exists() else None
    # Re-read the file: add() writes it once per credential from a clean document.
    fresh = ConfigDocument(doc.path)
    done: list[Added] = []
    try:
        for i, (name, table, cred) in enumerate(tables):
            done.append(add(fresh, name, table, cred.client_secrets, check=False, force=force,
                            make_default=make_default and i == 0))  # fmt: skip
    except BaseException:
        for added in done:  # nothing half-imported
            asyncio.run(added.stored.undo())
        if original is None:
            doc.path.unlink(missing_ok=True)
        else:
            atomic_write(doc.path, original, doc.path.stat().st_mode & 0o777)
        raise
    return done
