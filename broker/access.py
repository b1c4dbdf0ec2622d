"""Who may read which token: client keys and unix-socket peer credentials.

Layered on the guards of :mod:`broker.guards` (which decide whether a request
is a plausible local tool at all), this decides *which* credentials it may
read:

* **Client keys.** When any ``[clients.NAME]`` exists, every token and status
  route needs ``Authorization: Bearer KEY``. The config holds only the
  SHA-256 of each key; the key is 256 random bits, so a fast hash is enough
  (nothing to brute-force) and the hot path stays cheap. The presented key's
  digest is compared with every client's digest with
  :func:`hmac.compare_digest`, so the time taken does not depend on which
  client (if any) matched or how many leading bytes agreed.
* **Peer credentials.** A credential with ``allow_uids`` / ``allow_gids`` is
  served only on a unix socket, to a peer whose uid (or one of whose groups)
  is listed, as the kernel reports them (``SO_PEERCRED``/``SO_PEERGROUPS``,
  captured when the connection is accepted, see :mod:`broker.protocol`).
  Over TCP the peer's user cannot be known, so such a credential is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from broker.config import ClientSettings, Settings
from broker.errors import Refused
from broker.schema import CredentialSettings

KEY_PREFIX = "tbk_"
#: Where the protocol puts the peer and the app the authenticated client (ASGI extensions).
PEER = "token_broker.peer"
CLIENT = "token_broker.client"
#: Where a route records what its answer was authorized for, to be judged again should a
#: reload change the rules before the answer is made: the credential names it read, and
#: the administrator's act it needed, if any (ASGI extensions).
NAMES = "token_broker.names"
ADMIN = "token_broker.admin"


def new_key() -> str:
    """A fresh client key: a recognisable prefix and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a unix socket, as the kernel saw it at connect."""

    pid: int
    uid: int
    gids: frozenset[int]


class Access:
    """The access rules of one configuration, built once per (re)loaded settings."""

    def __init__(self, settings: Settings) -> None:
        self.clients: tuple[ClientSettings, ...] = tuple(settings.clients.values())
        self.credentials = settings.credentials
        #: No client keys and no peer restrictions: every guarded request may read anything.
        self.open = not self.clients and not any(
            c.peer_restricted for c in settings.credentials.values()
        )

    def authenticate(self, scope: Mapping[str, Any]) -> ClientSettings | None:
        """The client whose key the request carries (None when no clients are configured)."""
        if not self.clients:
            return None
        presented: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                presented = value
        if presented is None:
            raise Refused(401, "a client key is required: Authorization: Bearer KEY", "no_key")
        scheme, _, key = presented.strip().partition(b" ")
        key = key.strip()
        if scheme.lower() != b"bearer" or not key:
            raise Refused(401, "expected Authorization: Bearer KEY", "no_key")
        if (found := self.client_of(key)) is None:
            raise Refused(401, "the client key is not valid", "bad_key")
        return found

    def client_of(self, key: bytes) -> ClientSettings | None:
        """The client that holds ``key``, compared with every client in constant time."""
        digest = key_digest(key)
        found: ClientSettings | None = None
        for client in self.clients:  # all of them: no early exit that timing could reveal
            if hmac.compare_digest(digest, client.key_sha256):
                found = client
        return found

    def authorize(self, scope: Mapping[str, Any], name: str | None) -> None:
        """Raise Refused unless this request may read credential ``name``.

        A name the client may not read is refused before its existence is
        checked, so a client cannot probe which names exist.
        """
        if name is None:
            return  # no default credential: the caller answers 404
        ext = scope.get("extensions") or {}
        client: ClientSettings | None = ext.get(CLIENT)
        if client is not None and client.credentials is not None and name not in client.credentials:
            raise Refused(403, f"client {client.name!r} may not read {name!r}", "client")
        cred = self.credentials.get(name)
        if cred is None or not cred.peer_restricted:
            return
        peer: Peer | None = ext.get(PEER)
        if peer is None:
            raise Refused(
                403,
                f"{name!r} is served only on a unix socket to the users in its "
                "allow_uids / allow_gids",
                "peer_unknown",
            )
        if not _peer_allowed(peer, cred):
            raise Refused(
                403, f"uid {peer.uid} may not read {name!r} (allow_uids / allow_gids)", "peer"
            )

    def may_read(self, scope: Mapping[str, Any], name: str) -> bool:
        try:
            self.authorize(scope, name)
        except Refused:
            return False
        return True

    def reauthorize(
        self, scope: MutableMapping[str, Any], names: Iterable[str] = (), *, admin: str = ""
    ) -> Refused | None:
        """Judge again, under these rules, a request authorized under others: its key (the
        client it names may be gone or changed), the credentials ``names`` it read, and
        with ``admin`` (the act, e.g. "cycle secrets") the administrator rule. The
        refusal, or None."""
        try:
            scope.setdefault("extensions", {})[CLIENT] = self.authenticate(scope)
            for name in names:
                self.authorize(scope, name)
            if admin:
                self.authorize_reload(scope, admin)
        except Refused as exc:
            return exc
        return None

    def authorize_reload(self, scope: Mapping[str, Any], act: str = "reload") -> None:
        """Reloading (and cycling a secret, ``act``) is for a client that may read every
        credential ("*")."""
        client: ClientSettings | None = (scope.get("extensions") or {}).get(CLIENT)
        if client is not None and client.credentials is not None:
            raise Refused(
                403, f'client {client.name!r} may not {act}: needs credentials = ["*"]', "client"
            )


def keyless_admin(scope: Mapping[str, Any], denied: Refused) -> bool:
    """Whether a request refused for want of a key is a local administrator's reload or cycle.

    Over the unix socket the kernel names the caller (``SO_PEERCRED``). Root and the
    daemon's own user may already signal it (SIGHUP reloads) and read its config and
    secrets, so a key proves nothing more: they may ``POST /v1/reload`` and
    ``POST /v1/credentials/NAME/rotate`` without one. This is how ``token-broker client
    add`` on the same host gets the daemon to load the very first ``"*"`` key it has
    just written. Only a missing key is excused, never a wrong one; over TCP the
    caller's user cannot be known, and a key is needed.
    """
    if denied.rule != "no_key" or scope.get("method") != "POST":
        return False
    path: str = scope.get("path", "")
    admin = path == "/v1/reload" or (
        path.startswith("/v1/credentials/") and path.endswith("/rotate")
    )
    peer: Peer | None = (scope.get("extensions") or {}).get(PEER)
    return admin and peer is not None and peer.uid in (0, os.getuid())


def _peer_allowed(peer: Peer, cred: CredentialSettings) -> bool:
    if cred.allow_uids is not None and peer.uid in cred.allow_uids:
        return True
    return cred.allow_gids is not None and not cred.allow_gids.isdisjoint(peer.gids)
