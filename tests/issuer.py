"""The demo issuer as the tests drive it: failure modes, held requests, bookkeeping.

:class:`TestIssuer` is :class:`broker.demo.DemoIssuer` (what ``token-broker demo``
serves) with what only tests need: a ``mode`` that answers something other than
a token (21 of them, :data:`MODES`), a ``console_mode`` for the I/O Management
API (:data:`CONSOLE_MODES`), ``hold``/``release`` to stop a request at a chosen
point while a test looks at the state, a ``delay`` before every answer, secrets
that IMS accepts only later or never, and a record of every request it saw.
"""

from __future__ import annotations

import asyncio
import email.utils
import threading
import time
import uuid
from collections.abc import Callable, Iterator, MutableSet
from dataclasses import dataclass, field
from typing import Any

from broker.demo import (
    ConsoleError,
    DemoIssuer,
    DemoSecret,
    MintRecord,
    bearer_token,
    console_reply,
    issuer_server,
    lower_headers,
    reply,
)
from broker.server import Server

#: Failure modes: what the issuer answers instead of a token.
MODES = (
    "ok",
    "error500",  # 500 internal_error (JSON)
    "html502",  # 502 with an HTML page
    "throttle",  # 429 with Retry-After (seconds)
    "throttle_date",  # 429 with Retry-After as an HTTP-date
    "unavailable",  # 503 with Retry-After (seconds)
    "garbage",  # 200 with a body that is not JSON
    "reset",  # 200, half a body, connection dropped
    "no_token",  # 200 JSON without access_token
    "no_expires", "zero_expires", "negative_expires", "string_expires", "huge_expires",
    "mac_token",  # token_type "mac"
    "endless",  # 200 with a chunked body that never ends
    "huge_token",  # 200 with a 100 KB access_token
    "hang",  # never answers within any sensible timeout
    "invalid_client", "invalid_scope", "unauthorized_client",  # 400 with that error
    "echo",  # 400 whose error_description quotes the secret it was sent (a careless issuer)
)  # fmt: skip

#: Modes answered with an OAuth error: status and error code.
_ERRORS = {
    "error500": (500, "internal_error"),
    "invalid_client": (400, "invalid_client"),
    "invalid_scope": (400, "invalid_scope"),
    "unauthorized_client": (400, "unauthorized_client"),
}
#: Modes answered 200 with one field of the token answer changed (None: left out).
_TOKEN_VARIANTS: dict[str, tuple[str, object]] = {
    "no_expires": ("expires_in", None),
    "zero_expires": ("expires_in", 0),
    "negative_expires": ("expires_in", -60),
    "string_expires": ("expires_in", str),  # the lifetime as a string: valid
    "huge_expires": ("expires_in", 10**12),
    "mac_token": ("token_type", "mac"),
}
#: Modes whose token reaches the client as issued (so the issuer records it).
_DELIVERED = ("ok", "string_expires")

#: Console failure modes: what the I/O Management API answers instead.
CONSOLE_MODES = (
    "ok",
    "error500",  # 500 JSON error, nothing applied
    "post_lost",  # POST creates the secret, then answers 500: the value is never seen
    "post_garbage",  # POST creates the secret, then answers 200 with a body that is not JSON
    "delete_error",  # DELETE answers 500 and deletes nothing
    "unavailable",  # 503 for everything
)
#: Console modes that refuse every call before looking at it: status, code, message.
_CONSOLE_DOWN = {
    "unavailable": (503, "503000", "service unavailable (demo)"),
    "error500": (500, "500000", "internal server error (demo)"),
}


@dataclass
class Received:
    """One request as the issuer saw it (form fields and headers, secrets included)."""

    path: str
    form: dict[str, str] = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    at: float = 0.0  # when it arrived, by the issuer's clock


@dataclass
class ConsoleCall:
    """One request to the console endpoints as the issuer saw it."""

    method: str
    path: str
    headers: dict[str, str] = field(repr=False)
    minted_by: str | None  # uuid of the secret that minted the bearer token, if known
    at: float  # by the issuer's clock


@dataclass
class TestSecret(DemoSecret):
    """A secret that IMS may accept only from ``works_from``, or never."""

    __test__ = False  # a helper, not a test class, whatever its name says to pytest

    works_from: float = -1.0  # epoch seconds from which IMS accepts it; -1: from creation
    works: bool = True  # False: IMS never accepts it

    def __post_init__(self) -> None:
        if self.works_from < 0:
            self.works_from = self.created_at / 1000


class _SecretValues(MutableSet[str]):
    """The values of one client's secrets as a mutable set (``TestIssuer.clients``)."""

    def __init__(self, issuer: TestIssuer, client_id: str) -> None:
        self._issuer, self._client_id = issuer, client_id

    def _secrets(self) -> list[DemoSecret]:
        return self._issuer._secrets.get(self._client_id, [])

    def __contains__(self, value: object) -> bool:
        return any(s.value == value for s in self._secrets())

    def __iter__(self) -> Iterator[str]:
        return iter([s.value for s in self._secrets()])

    def __len__(self) -> int:
        return len(self._secrets())

    def add(self, value: str) -> None:
        self._issuer.add_client(self._client_id, value)

    def discard(self, value: str) -> None:
        self._secrets()[:] = [s for s in self._secrets() if s.value != value]


class TestIssuer(DemoIssuer):
    """The demo issuer with the knobs and records of the tests."""

    __test__ = False  # a helper, not a test class, whatever its name says to pytest

    def __init__(
        self,
        lifetime: float = 120.0,
        token_bytes: int = 48,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.made: dict[str, str] = {}  # uuid -> value of every secret ever made, deleted too
        super().__init__(lifetime, clock=clock)
        self.token_bytes = token_bytes
        self.mode = "ok"
        self.retry_after = 2
        self.delay = 0.0  # seconds to wait before answering (any mode, console included)
        self.calls = 0
        self.received: list[Received] = []
        self.issued: dict[str, float] = {}  # token -> expiry (epoch seconds)
        self.activation_delay = 0.0  # seconds before a secret created by POST works at IMS
        self.new_secrets_work = True  # False: secrets created by POST never work
        self.console_mode = "ok"
        self.console_calls: list[ConsoleCall] = []
        # Holding requests: events named in `hold` wait in `held` until release().
        self.hold: set[str] = set()
        self.held: list[str] = []
        self._waiters: list[tuple[str, asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._hold_lock = threading.Lock()  # release() may run in another thread

    def secrets_of(self, client_id: str) -> list[TestSecret]:
        """The secrets of ``client_id`` (a new list of the live objects)."""
        return list(self._secrets.get(client_id, []))  # type: ignore[arg-type]

    @property
    def clients(self) -> dict[str, _SecretValues]:
        """Each client's secret values as a mutable set (``clients[id].discard(value)``)."""
        return {client_id: _SecretValues(self, client_id) for client_id in self._secrets}

    def release(self, event: str | None = None) -> int:
        """Let held requests go on (those held at ``event``, or all); return how many.

        Safe from any thread. ``hold`` is left as it is: a later request at the
        same event is held again until it is emptied.
        """
        with self._hold_lock:
            chosen = [w for w in self._waiters if event is None or w[0] == event]
            for waiter in chosen:
                self._waiters.remove(waiter)
                self.held.remove(waiter[0])
        for _, loop, gate in chosen:
            loop.call_soon_threadsafe(gate.set)
        return len(chosen)

    async def _hold(self, event: str) -> None:
        """Wait here until release() if ``event`` is in ``hold``."""
        if event not in self.hold:
            return
        waiter = (event, asyncio.get_running_loop(), asyncio.Event())
        with self._hold_lock:
            self._waiters.append(waiter)
            self.held.append(event)
        try:
            await waiter[2].wait()
        finally:  # cancelled while held (server shut down): no longer waiting
            with self._hold_lock:
                if any(w is waiter for w in self._waiters):
                    self._waiters.remove(waiter)
                    self.held.remove(event)

    # -- secrets that work later, or never ---------------------------------------------

    def _new_secret(self, value: str, now: float) -> TestSecret:
        made = TestSecret(str(uuid.uuid4()), value, int(now * 1000), works_from=now)
        self.made[made.uuid] = value
        return made

    def _accepts(self, secret: DemoSecret, now: float) -> bool:
        assert isinstance(secret, TestSecret)
        return secret.works and now >= secret.works_from

    # -- the token endpoints -------------------------------------------------------------

    async def _token(
        self, path: str, form: dict[str, str], headers: dict[str, str], send: Any, receive: Any
    ) -> None:
        self.calls += 1
        self.received.append(Received(path, form, headers, self.clock()))
        if self.delay:
            await asyncio.sleep(self.delay)
        if not await self._fail(form, headers, send, receive):
            await super()._token(path, form, headers, send, receive)

    async def _fail(
        self, form: dict[str, str], headers: dict[str, str], send: Any, receive: Any
    ) -> bool:
        """Answer as ``mode`` says, before any client check; False: go on to the token."""
        mode = self.mode
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode in _ERRORS:
            status, error = _ERRORS[mode]
            body = {"error": error, "error_description": f"{error.replace('_', ' ')} (demo)"}
            await reply(send, status, body)
        elif mode == "echo":
            sent = self._credentials(form, headers)[1]
            body = {"error": "invalid_request", "error_description": f"cannot parse {sent}"}
            await reply(send, 400, body)
        elif mode == "html502":
            html = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            await reply(send, 502, html, content_type=b"text/html")
        elif mode in ("throttle", "unavailable", "throttle_date"):
            status = 503 if mode == "unavailable" else 429
            body = {"error": "too_many_requests" if status == 429 else "temporarily_unavailable"}
            after = str(self.retry_after)
            if mode == "throttle_date":
                after = email.utils.formatdate(self.clock() + self.retry_after, usegmt=True)
            await reply(send, status, body, extra=[(b"retry-after", after.encode())])
        elif mode == "garbage":
            await reply(send, 200, b"\x00\xffnot json", content_type=b"text/plain")
        elif mode == "endless":  # a body that never ends: the broker must stop reading
            await _endless(send, receive)
        elif mode == "reset":  # promise a body, send half of it, drop the connection
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"100")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b'{"access_tok', "more_body": True})
            raise ConnectionResetError("demo issuer: connection dropped mid-body")
        else:
            return False
        return True

    async def _mint(
        self, client_id: str, used: DemoSecret, form: dict[str, str]
    ) -> dict[str, object]:
        mode = self.mode  # as the request found it, like _fail: not as a release finds it
        await self._hold(f"TOKEN:{used.uuid}")
        answer = await super()._mint(client_id, used, form)
        token = str(answer["access_token"])
        if mode in _DELIVERED:
            self.issued[token] = self.minted[token].expires_at
        else:  # the client never gets this token as it was minted
            del self.minted[token]
        if mode == "no_token":
            del answer["access_token"]
        elif mode == "huge_token":
            answer["access_token"] = "h" * 100_000
        elif mode in _TOKEN_VARIANTS:
            key, value = _TOKEN_VARIANTS[mode]
            answer[key] = str(self.lifetime) if value is str else value
            if value is None:
                del answer[key]
        return answer

    # -- the I/O Management API ------------------------------------------------------------

    async def _console(
        self, scope: dict[str, Any], send: Any, org: str, cred: str, secret_uuid: str | None
    ) -> None:
        headers = lower_headers(scope)
        minted: MintRecord | None = self.minted.get(bearer_token(headers))
        by = minted.secret_uuid if minted else None
        self.console_calls.append(
            ConsoleCall(scope["method"], scope["path"], headers, by, self.clock())
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.console_mode in _CONSOLE_DOWN:
            status, code, message = _CONSOLE_DOWN[self.console_mode]
            extra = [(b"retry-after", str(self.retry_after).encode())] if status == 503 else []
            body = {"error_code": code, "message": message}
            return await console_reply(send, status, body, extra)
        await super()._console(scope, send, org, cred, secret_uuid)

    async def _console_post(self, client_id: str) -> tuple[int, dict[str, object] | bytes]:
        await self._hold("POST")
        status, body = await super()._console_post(client_id)
        created = self.secrets_of(client_id)[-1]  # the secret that POST just added
        created.works_from += self.activation_delay
        created.works = self.new_secrets_work
        await self._hold("POST_APPLIED")
        if self.console_mode == "post_lost":
            raise ConsoleError(500, "500000", "internal server error (demo)")
        if self.console_mode == "post_garbage":
            return 200, b"<html>\x00\xffnot json"
        return status, body

    async def _console_delete(self, client_id: str, secret_uuid: str) -> tuple[int, None]:
        await self._hold("DELETE")
        if self.console_mode == "delete_error":
            raise ConsoleError(500, "500000", "internal server error (demo)")
        return await super()._console_delete(client_id, secret_uuid)


async def _endless(send: Any, receive: Any) -> None:
    """200 and a JSON body that never ends, until the client hangs up."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    chunk = b'{"access_token": "' + b"x" * 65536
    try:
        while not gone.is_set():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            chunk = b"x" * 65536
            await asyncio.sleep(0)  # let the disconnect be noticed
    finally:
        watcher.cancel()


def server_for(
    issuer: DemoIssuer, *, certfile: str | None = None, keyfile: str | None = None
) -> Server:
    """The demo's issuer server; with ``certfile``/``keyfile`` over HTTPS (issuers behind
    a private CA). uvicorn reads its TLS settings when the server loads, at start."""
    server = issuer_server(issuer)
    server.config.ssl_certfile, server.config.ssl_keyfile = certfile, keyfile
    return server
