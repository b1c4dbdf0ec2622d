"""A client of the HashiCorp Vault / OpenBao HTTP API: the few calls a broker makes.

KV version 2 (read, metadata, check-and-set write, list, delete), one login
(``token``, ``approle``, ``jwt``, ``kubernetes``) and keeping it alive (renew
before the TTL runs out, log in again when renewal is refused). Written on
httpx, not hvac: hvac would add requests and ~5 MiB to the daemon for about
ten calls, it blocks (every call a thread), folds a check-and-set conflict
into the same exception as every other 400, hides the ``Date`` header, and
reads ``VAULT_TOKEN`` / ``~/.vault-token`` behind the caller's back.

Every answer is read bounded, redirects are never followed (a standby's 307
must not carry ``X-Vault-Token`` elsewhere), no proxy or ``.netrc`` from the
environment applies, and no message ever holds the Vault token: errors name the
address, the operation and path, and Vault's own ``errors`` text.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import httpx

from broker import upstream
from broker.errors import BrokerError, SecretError

log = logging.getLogger("broker.vault")

Method = Literal["token", "approle", "jwt", "kubernetes"]
#: What renewal aims for: renew when this share of the token's TTL has passed.
RENEW_AT = 2 / 3
#: Pause after a failed login or renewal before the next try, doubled up to the cap.
RETRY_INITIAL, RETRY_MAX = 1.0, 60.0
#: Longest Vault ``errors`` text quoted in a message.
_ERROR_MAX = 200
#: The KV engine answers this to a write whose ``cas`` is not the current version.
CAS_MISMATCH = "check-and-set parameter did not match the current version"


class VaultError(SecretError):
    """Vault refused or failed a call; ``reason`` is a bounded label for metrics and status:
    ``denied`` (403), ``sealed`` (503), ``unreachable`` (no answer), ``conflict`` (a
    check-and-set write lost), ``invalid`` (another 4xx), ``error`` (anything else)."""

    def __init__(self, message: str, *, reason: str, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


class CasConflict(VaultError):
    """A check-and-set write found another version than the one it was based on."""


@dataclass(frozen=True)
class Login:
    """How this broker logs in to Vault.

    ``read`` returns the credential of the method, read again at every login (a
    Vault Agent token sink or a projected service-account token is rewritten
    under a running daemon): the token itself (``token``), the secret_id
    (``approle``) or the JWT (``jwt``, ``kubernetes``). ``role`` is AppRole's
    role_id or the JWT/Kubernetes role; ``mount`` where the auth method is enabled.
    """

    method: Method
    read: Callable[[], Awaitable[str]] = field(repr=False)
    role: str = ""
    mount: str = ""


@dataclass(frozen=True)
class Document:
    """One version of a KV v2 secret: its fields, its version, and when it was written
    (Vault's clock, epoch seconds)."""

    data: dict[str, Any] = field(repr=False)
    version: int
    written: float


@dataclass(frozen=True)
class Metadata:
    """A KV v2 secret's metadata: the newest version and when anything last changed."""

    current_version: int
    updated: float


@dataclass
class Health:
    """What the daemon shows of its Vault connection (status JSON, ``list``, metrics)."""

    ok: bool = True
    error: str | None = None  # the last failure, a sentence without secrets
    reason: str | None = None  # VaultError.reason of that failure
    at: float | None = None  # when it happened (local epoch seconds)
    failures: int = 0  # consecutive failed calls
    errors: Counter[str] = field(default_factory=Counter)  # every failure, by reason (metrics)


class Vault:
    """One Vault (or OpenBao) cluster, one login, shared by every ``vault:`` secret.

    Calls are coroutines on the daemon's event loop. :meth:`keep_alive` runs as a
    task of the daemon's and keeps the token valid; any call also logs in first if
    no valid token is held, and once more when Vault answers 403 (a token revoked
    or expired early). ``on_token`` hears every token held, so the log redaction
    can cut it out of any line.
    """

    def __init__(
        self,
        address: str,
        login: Login,
        *,
        namespace: str | None = None,
        ca_file: str | None = None,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_token: Callable[[str], None] = lambda token: None,
    ) -> None:
        self.address = address.rstrip("/")
        self.login = login
        self.namespace = namespace
        self.timeout = timeout
        self.health = Health()
        self._client = client or upstream.client(timeout, ca_file, trust_env=False)
        self._clock = clock
        self._wall = wall
        self._on_token = on_token
        self._token: str | None = None
        self._renewable = False
        self._expires: float = math.inf  # by self._clock; inf: no TTL (root, periodic none)
        self._ttl = 0.0
        self._login_lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- KV version 2 ----------------------------------------------------------------

    async def read(self, mount: str, path: str) -> Document | None:
        """The newest version of ``mount/path``, or None if there is none (or it was deleted)."""
        return (await self.read_for_write(mount, path))[0]

    async def read_for_write(self, mount: str, path: str) -> tuple[Document | None, int]:
        """:meth:`read`, and the version a check-and-set write over ``mount/path`` names: the
        newest, deleted (``bao kv delete``: a 404 that carries its metadata) or not; 0 when
        there is none."""
        if (answer := await self._call("GET", f"{mount}/data/{path}", missing=True)) is None:
            return None, 0
        data = _dig(answer, "data", "data")
        meta = _dig(answer, "data", "metadata")
        if data is None:  # a soft-deleted newest version: as good as none
            return None, _int(_dig(meta, "version"))
        if not isinstance(data, dict) or not isinstance(meta, dict):
            raise self._shape("GET", f"{mount}/data/{path}", "no data or metadata")
        version = _int(meta.get("version"))
        return Document(data, version, _time(meta.get("created_time"))), version

    async def metadata(self, mount: str, path: str) -> Metadata | None:
        """``current_version`` and ``updated_time`` of ``mount/path``, or None if absent."""
        if (answer := await self._call("GET", f"{mount}/metadata/{path}", missing=True)) is None:
            return None
        meta = _dig(answer, "data")
        if not isinstance(meta, dict):
            raise self._shape("GET", f"{mount}/metadata/{path}", "no metadata")
        return Metadata(_int(meta.get("current_version")), _time(meta.get("updated_time")))

    async def write(
        self, mount: str, path: str, data: dict[str, Any], *, cas: int | None
    ) -> Document:
        """Write a new version; with ``cas`` only if the current version is that (0: absent),
        else :class:`CasConflict` (another version was written meanwhile)."""
        body: dict[str, Any] = {"data": data}
        if cas is not None:
            body["options"] = {"cas": cas}
        answer = await self._call("POST", f"{mount}/data/{path}", json=body)
        meta = _dig(answer, "data")
        if not isinstance(meta, dict):
            raise self._shape("POST", f"{mount}/data/{path}", "no version in the answer")
        return Document(data, _int(meta.get("version")), _time(meta.get("created_time")))

    async def keys(self, mount: str, prefix: str) -> list[str]:
        """The keys under ``mount/prefix/`` (folders end in ``/``); [] when there are none."""
        answer = await self._call("LIST", f"{mount}/metadata/{prefix.rstrip('/')}/", missing=True)
        keys = _dig(answer, "data", "keys")
        if keys is None:  # no such prefix (a 404), or nothing under it
            return []
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise self._shape("LIST", f"{mount}/metadata/{prefix}", "keys that are not strings")
        return keys

    async def destroy(self, mount: str, path: str) -> None:
        """Delete ``mount/path`` with every version (a report of a broker that is gone)."""
        await self._call("DELETE", f"{mount}/metadata/{path}", missing=True)

    async def capabilities(self, paths: list[str]) -> dict[str, tuple[str, ...]]:
        """What this login may do on each path (``sys/capabilities-self``), changing nothing."""
        answer = await self._call("POST", "sys/capabilities-self", json={"paths": paths})
        found: dict[str, tuple[str, ...]] = {}
        for path in paths:
            caps = _dig(answer, "data", path)
            caps = _dig(answer, path) if caps is None else caps
            caps = caps if isinstance(caps, list) else []
            found[path] = tuple(c for c in caps if isinstance(c, str))
        return found

    # -- the login -------------------------------------------------------------------

    async def keep_alive(self) -> None:
        """Keep a valid token for as long as the daemon runs (a task of its own).

        Renews when :data:`RENEW_AT` of the TTL has passed; when Vault refuses the
        renewal (not renewable, past its max TTL, revoked) logs in again. A token
        given as such (``auth = "token"``) is read again instead: its owner (Vault
        Agent, an operator) renews or replaces it.
        """
        delay = RETRY_INITIAL
        while True:
            try:
                await self._ensure()
                await asyncio.sleep(self._renew_in())
                await self._renew()
            except VaultError as exc:
                log.warning("%s; trying again in %.0fs", exc, delay)  # exc names the address
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
            else:
                delay = RETRY_INITIAL

    def _renew_in(self) -> float:
        if math.isinf(self._expires):
            return 300.0  # no TTL: look again now and then (a token file may be replaced)
        return max(1.0, self._ttl * RENEW_AT - (self._ttl - (self._expires - self._clock())))

    async def _renew(self) -> None:
        if self.login.method != "token" and self._renewable:
            try:
                # A refusal is routine (past the max TTL, not renewable): the login that
                # follows decides whether Vault failed, so it is not counted as a failure.
                answer = await self._send(
                    "POST", "auth/token/renew-self", {}, await self._ensure(), quiet=True
                )
            except VaultError as exc:
                if exc.reason == "unreachable":
                    raise
                log.info("vault %s: renewal refused (%s); logging in again", self.address, exc)
            else:
                self._hold(answer, renewed=True)
                return
        async with self._login_lock:
            await self._login()

    async def _ensure(self) -> str:
        """A token believed valid now: the one held, or a fresh login."""
        token = self._token
        if token is not None and self._clock() < self._expires:
            return token
        async with self._login_lock:
            if self._token is not None and self._clock() < self._expires:
                return self._token
            return await self._login()

    async def _login(self) -> str:
        try:
            credential = (await self.login.read()).strip()
        except SecretError as exc:
            raise self._error("login", f"cannot read the credential: {exc}", "invalid") from None
        if not credential:
            raise self._error("login", f"the {self.login.method} credential is empty", "invalid")
        if self.login.method == "token":
            self._token = credential
            self._on_token(credential)
            answer = await self._send("GET", "auth/token/lookup-self", None, credential)
            self._set_lifetime(_dig(answer, "data"), "ttl")
            return credential
        body = (
            {"role_id": self.login.role, "secret_id": credential}
            if self.login.method == "approle"
            else {"role": self.login.role, "jwt": credential}
        )
        path = f"auth/{self.login.mount or self.login.method}/login"
        return self._hold(await self._send("POST", path, body, None), renewed=False)

    def _hold(self, answer: dict[str, Any] | None, *, renewed: bool) -> str:
        auth = _dig(answer, "auth")
        token = auth.get("client_token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token:
            raise self._shape("POST", "auth", "no client_token in the answer")
        self._on_token(token)
        self._token = token
        self._set_lifetime(auth, "lease_duration")
        log.info(
            "vault %s: %s, token valid for %ds",
            self.address,
            "token renewed" if renewed else f"logged in ({self.login.method})",
            self._ttl,
            extra={"event": "vault_login"},
        )
        return token

    def _set_lifetime(self, info: Any, ttl_key: str) -> None:
        """Renewable and TTL of the token held, from a login's ``auth`` or a lookup's ``data``."""
        info = info if isinstance(info, dict) else {}
        self._renewable = bool(info.get("renewable"))
        ttl = info.get(ttl_key)
        self._ttl = float(ttl) if isinstance(ttl, int | float) else 0.0
        self._expires = self._clock() + self._ttl if self._ttl > 0 else math.inf

    # -- one call --------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, *, json: Any = None, missing: bool = False
    ) -> dict[str, Any] | None:
        """One authenticated call; None for a 404 when ``missing`` (no such secret)."""
        token = await self._ensure()
        try:
            return await self._send(method, path, json, token, missing=missing)
        except VaultError as exc:
            if exc.reason != "denied":
                raise
        # A token revoked or expired before its TTL: log in (or read it) once more.
        async with self._login_lock:
            if self._token == token:
                await self._login()
        return await self._send(method, path, json, await self._ensure(), missing=missing)

    async def _send(
        self,
        method: str,
        path: str,
        json: Any,
        token: str | None,
        *,
        missing: bool = False,
        quiet: bool = False,
    ) -> dict[str, Any] | None:
        headers = {"X-Vault-Request": "true"}
        if token is not None:
            headers["X-Vault-Token"] = token
        if self.namespace:
            headers["X-Vault-Namespace"] = self.namespace
        url = f"{self.address}/v1/{path}"
        what = f"{method} {path}"
        try:
            async with asyncio.timeout(self.timeout):
                answer = await upstream.send_bounded(self._client, method, url, headers, json=json)
        except TimeoutError:
            raise self._error(what, f"no answer within {self.timeout:g}s", "unreachable") from None
        except httpx.HTTPError as exc:
            why = upstream.transport_failure(exc, url, "Vault")[1]
            raise self._error(what, why, "unreachable") from None
        except BrokerError as exc:  # an answer too long to read
            raise self._error(what, str(exc), "error") from None
        body = upstream.json_object(answer)
        if answer.status == 200 and body is None:  # a proxy's page, say: not Vault's answer
            raise self._error(what, "unexpected answer (not a JSON object)", "error")
        if answer.status in (200, 204) or (
            answer.status == 404 and missing and not _dig(body, "errors")
        ):  # a 404 without errors is "no such secret"; a missing mount or namespace says so
            self.health.ok, self.health.failures = True, 0
            if answer.status == 404 and not _dig(body, "data", "metadata"):
                return None  # a deleted newest version is a 404 that carries its metadata
            return body
        errors = _dig(body, "errors")
        errors = [e for e in errors if isinstance(e, str)] if isinstance(errors, list) else []
        text = " ".join("; ".join(errors).replace("1 error occurred:", "").split())[:_ERROR_MAX]
        reason = _reason(answer.status, text)
        detail = f"HTTP {answer.status}" + (f": {text}" if text else "")
        raise self._error(what, detail, reason, answer.status, record=not quiet)

    def _error(
        self, what: str, detail: str, reason: str, status: int | None = None, record: bool = True
    ) -> VaultError:
        kind = CasConflict if reason == "conflict" else VaultError
        error = kind(f"vault {self.address}: {what}: {detail}", reason=reason, status=status)
        if reason != "conflict" and record:  # a lost check-and-set race is not a failure
            self.health.ok = False
            self.health.error, self.health.reason = str(error), reason
            self.health.at = self._wall()
            self.health.failures += 1
            self.health.errors[reason] += 1
        return error

    def _shape(self, method: str, path: str, why: str) -> VaultError:
        return self._error(f"{method} {path}", f"unexpected answer ({why})", "error")


def _reason(status: int, text: str) -> str:
    if status == 403:
        return "denied"
    if status == 503:
        return "sealed" if "sealed" in text else "unreachable"
    if status == 400 and CAS_MISMATCH in text:
        return "conflict"
    if 400 <= status < 500:
        return "invalid"
    return "error"


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _time(value: object) -> float:
    """Vault's RFC 3339 time (up to 9 fraction digits, of which Python keeps 6; ``Z`` or an
    offset) as epoch seconds; 0.0 if unreadable, or without a zone: read as local, a time
    would be off across DST."""
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return 0.0
    return when.timestamp() if when is not None and when.tzinfo is not None else 0.0
