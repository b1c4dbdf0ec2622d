"""``vault:MOUNT/PATH#FIELD``: a field of a KV version 2 secret in HashiCorp Vault or
OpenBao, shared by every broker of a fleet (docs/vault.md).

The secret document keeps a cycle's staging, as AWS Secrets Manager's rotation
does: ``FIELD`` is the secret in use, ``FIELD_pending`` the new one between a
cycle's steps 2 and 4, ``FIELD_previous`` the old one between steps 4 and 5;
every change is a new version written with check-and-set on the version read,
and the other fields of the document are kept. Every broker reads the
document at start, again when its version changes (:meth:`VaultRef.follow`,
every ``poll``) and at once when the issuer refuses the secret it holds; and
reports the version it uses under ``PATH/brokers/ID``, so that the broker that
cycles deletes the old secret only when every live broker has moved on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.errors import SecretError
from broker.stores.base import NO_CONTEXT, Context, SecretRef, SecretWriter, Stored, register

if TYPE_CHECKING:
    from broker.config import VaultSettings
    from broker.vault import Document, Vault

# broker.vault (and httpx under it) is imported where a Vault is used, not here: every
# process that parses a config imports this module, most never talk to Vault.

log = logging.getLogger("broker.vault")

#: What a mount, a path and a field may look like: they go into URL paths.
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+\Z")
DEFAULT_FIELD = "client_secret"
PENDING, PREVIOUS = "_pending", "_previous"
#: Tries of a read-modify-write whose check-and-set lost to another writer.
_CAS_TRIES = 5


@dataclass
class VaultSession:
    """This broker's Vault: the client, its id among the brokers that share a secret
    (random per process: several brokers may share a host), how often it looks for a
    new version, and the version of each credential's secret it holds now."""

    vault: Vault
    poll: float
    broker: str = field(default_factory=lambda: secrets.token_hex(8))
    versions: dict[str, int] = field(default_factory=dict)  # credential -> version held
    reported: dict[str, int] = field(default_factory=dict)  # report path -> version written
    #: This broker's report writes, one at a time (the follower's and a cycle's may meet).
    reporting: asyncio.Lock = field(default_factory=asyncio.Lock)


class VaultWriter(SecretWriter):
    """``FIELD``, ``FIELD_pending`` and ``FIELD_previous`` of the document, each change a
    new version written with check-and-set on the version read."""

    ref: VaultRef

    def __init__(self, ref: VaultRef, name: str, ctx: Context = NO_CONTEXT) -> None:
        super().__init__(ref, name)
        self._session = _session(ctx, name)
        self._vault = self._session.vault
        self._pending = ref.field + PENDING
        self._previous = ref.field + PREVIOUS

    async def _get(self, upcoming: bool) -> str | None:
        doc = await self.ref._document(self._session, self.name)
        return _value(doc.data.get(self._pending if upcoming else self.ref.field))

    async def _put(self, secret: str, upcoming: bool) -> None:
        key = self._pending if upcoming else self.ref.field
        await self._change(lambda data: {**data, key: secret})

    async def drop_upcoming(self) -> None:
        await self._change(lambda data: _without(data, self._pending))

    async def promote(self) -> None:
        def promoted(data: dict[str, Any]) -> dict[str, Any] | None:
            pending = data.get(self._pending)
            if not isinstance(pending, str) or not pending:
                return None  # promoted before (a step repeated after a crash)
            changed = _without(data, self._pending)
            changed[self._previous] = data.get(self.ref.field)
            changed[self.ref.field] = pending
            return changed

        await self._change(promoted)

    async def finish(self) -> None:
        await self._change(lambda data: _without(data, self._previous))

    async def _change(self, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        """Read, change, write with check-and-set on the version read; again if another
        writer came between (a person's `bao kv patch`); nothing when nothing changes."""
        from broker.vault import CasConflict

        for _ in range(_CAS_TRIES):
            doc = await self.ref._document(self._session, self.name)
            data = change(dict(doc.data))
            if data is None or data == doc.data:
                return
            try:
                await self._vault.write(self.ref.mount, self.ref.path, data, cas=doc.version)
            except CasConflict:
                continue
            return
        raise SecretError(
            f"credential {self.name!r}: {self.ref.describe()} changed under every one of "
            f"{_CAS_TRIES} writes; is another program writing it?"
        )


@register
@dataclass(frozen=True)
class VaultRef(SecretRef):
    kind = "vault"
    shapes = ("vault:MOUNT/PATH#FIELD",)
    writable = True  # whether this login may, Vault's policy decides: `token-broker doctor` asks
    writer_class = VaultWriter
    needs_vault = True
    mount: str = ""
    path: str = ""
    field: str = DEFAULT_FIELD

    @classmethod
    def from_text(cls, text: str, rest: str | None, credential: str) -> VaultRef | None:
        where, _, name = (rest or "").partition("#")
        mount, _, path = where.partition("/")
        segments = [mount, *path.split("/")]
        if not path or not all(_SEGMENT.match(s) and s not in (".", "..") for s in segments):
            return None
        if name and not _SEGMENT.match(name):
            return None
        return cls(text, mount, path, name or DEFAULT_FIELD)

    def describe(self) -> str:
        return f"Vault secret {self.mount}/{self.path} field {self.field!r}"

    async def read(self, name: str, ctx: Context = NO_CONTEXT) -> tuple[str, ...]:
        """The secret in use first, then a new one waiting (``_pending``), then the old
        one (``_previous``): the issuer may not have heard of the newest yet."""
        session = _session(ctx, name)
        doc = await self._document(session, name)
        values = [_value(doc.data.get(self.field + s)) for s in ("", PENDING, PREVIOUS)]
        if values[0] is None:
            fields = ", ".join(sorted(doc.data)) or "none"
            raise SecretError(
                f"credential {name!r}: {self.describe()} has no such field (version "
                f"{doc.version} has: {fields})"
            )
        session.versions[name] = doc.version
        return tuple(dict.fromkeys(v for v in values if v))

    async def store_new(
        self, name: str, values: list[str], *, force: bool = False, ctx: Context = NO_CONTEXT
    ) -> Stored:
        """Write the document (check-and-set: only if absent, or the version read); one
        that holds another secret is replaced only with ``force``."""
        session = _session(ctx, name)
        # The secret, and a second one (a rotation's new one) in FIELD_pending.
        data = dict(zip((self.field, self.field + PENDING), values, strict=False))
        doc, base = await session.vault.read_for_write(self.mount, self.path)
        where = f"{self.describe()} in {session.vault.address}"
        if doc is None:  # absent, or its newest version deleted
            await session.vault.write(self.mount, self.path, data, cas=base)
        elif all(doc.data.get(key) == value for key, value in data.items()):
            # Nothing to write: a login that may only read can import what is already there.
            return Stored(f"{where} (already there: nothing written)", len(values), [])
        elif doc.data.get(self.field) in (None, values[0]) or force:
            await session.vault.write(self.mount, self.path, {**doc.data, **data}, cas=doc.version)
        else:
            raise SecretError(
                f"credential {name!r}: {self.describe()} exists and holds another secret; "
                "pass --force to replace it, or name another path"
            )
        return Stored(where, len(values), [])

    async def _document(self, session: VaultSession, name: str) -> Document:
        if (doc := await session.vault.read(self.mount, self.path)) is None:
            raise SecretError(
                f"credential {name!r}: {self.describe()} does not exist in "
                f"{session.vault.address}; write it with `token-broker import FILE --secret "
                f"{self.text}` (or `bao kv put -cas=0 {self.mount}/{self.path} {self.field}=-`)"
            )
        return doc

    # -- every broker: follow new versions, report the one in use ------------------------

    # The documents beside the secret (docs/vault.md): the cycle's lease and state, and
    # one report per broker; their layout is named here alone.
    @property
    def cycle_path(self) -> str:
        return f"{self.path}/cycle"

    @property
    def reports_path(self) -> str:
        return f"{self.path}/brokers"

    def report_path(self, broker: str) -> str:
        return f"{self.reports_path}/{broker}"

    async def follow(
        self, name: str, session: VaultSession, reread: Callable[[str], Awaitable[None]]
    ) -> None:
        """Every ``poll`` while the credential is configured (a task of the daemon's): read
        the secret again when its version changed (``reread``: the holder of ``name``'s
        secrets reads the store), and report the version in use. Vault unreachable or
        refusing: the secret in hand stays in use; the failure is in the client's health
        (status, metrics) and in the log (once until Vault answers)."""
        from broker.vault import VaultError

        failing = False
        while True:
            try:
                meta = await session.vault.metadata(self.mount, self.path)
                if meta is not None and meta.current_version != session.versions.get(name):
                    await reread(name)
                await self.report(name, session)
            except VaultError as exc:
                if not failing:
                    held = "the secret in hand stays in use"
                    if name not in session.versions:
                        held = f"no secret read yet; reading again every {session.poll:g}s"
                    log.warning("credential %s: %s; %s", name, exc, held,
                                extra={"event": "vault_failed", "credential": name})  # fmt: skip
                failing = True
            else:
                if failing:
                    log.info("credential %s: Vault answers again", name,
                             extra={"event": "vault_ok", "credential": name})  # fmt: skip
                failing = False
            await asyncio.sleep(session.poll)

    async def report(self, name: str, session: VaultSession) -> Document:
        """Write this broker's report: the version it uses, who it is (a heartbeat too:
        its write time, Vault's clock, says the broker is alive)."""
        from broker.vault import CasConflict

        report = {
            "version": session.versions.get(name, 0),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "poll": session.poll,  # how long its silence means nothing yet (the fleet's)
        }
        path = self.report_path(session.broker)
        # Check-and-set like every write here (a mount may require it): on the version
        # this broker wrote last; 0 (absent) the first time, or after another broker
        # removed it as one of a broker long gone.
        async with session.reporting:
            for cas in dict.fromkeys((session.reported.get(path, 0), 0)):
                try:
                    written = await session.vault.write(self.mount, path, report, cas=cas)
                except CasConflict:
                    continue
                session.reported[path] = written.version
                return written
        raise CasConflict(
            f"vault {session.vault.address}: another writer keeps changing this broker's "
            f"report {self.mount}/{path}",
            reason="conflict",
        )


def session_for(
    table: VaultSettings, on_token: Callable[[str], None] = lambda token: None
) -> VaultSession:
    """The Vault session of a ``[vault]`` table: its client and login (the credential
    of the login read from its own store at every login); ``on_token`` hears every
    Vault token held (the daemon keeps it out of the log)."""
    ref = {"token": table.token, "approle": table.secret_id}.get(table.auth, table.jwt)
    if ref is None:  # the config's validation makes each method name its keys
        raise SecretError(f"[vault] auth = {table.auth!r} names no credential to log in with")

    async def credential() -> str:
        return (await ref.read("vault", NO_CONTEXT))[0]

    from broker.vault import Login, Vault

    role = table.role_id if table.auth == "approle" else table.role
    vault = Vault(
        table.address,
        Login(table.auth, credential, role=role or "", mount=table.mount or ""),
        namespace=table.namespace,
        ca_file=table.ca_file,
        timeout=table.timeout,
        on_token=on_token,
    )
    return VaultSession(vault, table.poll)


def _value(found: object) -> str | None:
    """A field's secret: a string, one trailing newline stripped (``bao kv put
    field=-`` keeps the one of the text it read, as a file secret would have it)."""
    if not isinstance(found, str):
        return None
    return found.removesuffix("\n").removesuffix("\r") or None


def _session(ctx: Context, name: str) -> VaultSession:
    if ctx.vault is None:
        raise SecretError(f"credential {name!r}: a vault: secret needs the [vault] table")
    return ctx.vault


def _without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}
