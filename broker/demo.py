"""The embedded OAuth issuer behind ``token-broker demo``.

:class:`DemoIssuer` is a small ASGI app that speaks both the Adobe IMS
endpoint (``POST /ims/token/v3``) and a generic client-credentials endpoint
(``POST /oauth2/token``). It checks client credentials, issues short-lived
random tokens, counts calls, and can be switched into a failure ``mode``:
the test suite uses the same issuer to drive the broker through outages.

It also serves the client-secrets endpoints of Adobe's I/O Management API
(DESIGN.md §11): list, add and delete a credential's secrets under
``/console/organizations/{org}/credentials/{credential}/secrets``, with the
bearer-token, API-key, scope and binding checks the real API makes, a
``console_mode`` to fail on command, and ``hold``/``release`` to stop a
request at a chosen point while a test looks at the state.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import re
import secrets
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, MutableSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import uvicorn

from broker.logs import Redactor
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


@dataclass
class Received:
    """One request as the issuer saw it (form fields and headers, secrets included)."""

    path: str
    form: dict[str, str] = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    at: float = 0.0  # when it arrived, by the issuer's clock


#: Console failure modes: what the I/O Management API answers instead.
CONSOLE_MODES = (
    "ok",
    "error500",  # 500 JSON error, nothing applied
    "post_lost",  # POST creates the secret, then answers 500: the value is never seen
    "post_garbage",  # POST creates the secret, then answers 200 with a body that is not JSON
    "delete_error",  # DELETE answers 500 and deletes nothing
    "unavailable",  # 503 for everything
)
#: Scopes each console method needs, beyond ``adobeio_api``.
_CONSOLE_SCOPES = {"GET": "read_client_secret", "POST": "manage_client_secrets",
                   "DELETE": "manage_client_secrets"}  # fmt: skip
#: (method, on the collection rather than one secret) pairs the console answers.
_CONSOLE_ROUTES = {("GET", True), ("POST", True), ("DELETE", False)}
#: Adobe IMS sends scopes comma-separated; OAuth 2.0 says spaces.
_SCOPE_SEPARATORS = re.compile(r"[,\s]+")
_CONSOLE_PATH = re.compile(
    r"/console/organizations/(?P<org>[^/]+)/credentials/(?P<cred>[^/]+)/secrets(?:/(?P<uuid>[^/]+))?"
)


@dataclass
class DemoSecret:
    """One client secret of a client, as the Developer Console keeps it."""

    uuid: str
    value: str = field(repr=False)
    created_at: int  # epoch milliseconds
    last_used_at: int | None = None  # epoch milliseconds of the last token it minted
    works_from: float = -1.0  # epoch seconds from which IMS accepts it; -1: from creation
    works: bool = True  # False: IMS never accepts it

    def __post_init__(self) -> None:
        if self.works_from < 0:
            self.works_from = self.created_at / 1000


@dataclass(frozen=True)
class Minted:
    """What the issuer knows of a token it issued: who minted it, with which secret."""

    client_id: str
    secret_uuid: str
    scopes: frozenset[str]
    expires_at: float  # epoch seconds


@dataclass
class ConsoleCall:
    """One request to the console endpoints as the issuer saw it."""

    method: str
    path: str
    headers: dict[str, str] = field(repr=False)
    minted_by: str | None  # uuid of the secret that minted the bearer token, if known
    at: float  # by the issuer's clock


class _ConsoleError(Exception):
    """A console answer with an ``{"error_code", "message"}`` body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.body = status, {"error_code": code, "message": message}


class _SecretValues(MutableSet[str]):
    """The values of one client's secrets as a mutable set (``DemoIssuer.clients``)."""

    def __init__(self, issuer: DemoIssuer, client_id: str) -> None:
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


class DemoIssuer:
    """An OAuth 2.0 client-credentials issuer for the demo and the tests."""

    def __init__(
        self,
        lifetime: float = 120.0,
        token_bytes: int = 48,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lifetime = lifetime
        self.clock = clock  # for expiry bookkeeping and Retry-After dates
        self.token_bytes = token_bytes  # Adobe's tokens are JWTs of about 1,500 bytes
        self._secrets: dict[str, list[DemoSecret]] = {}
        self.mode = "ok"
        self.retry_after = 2
        self.delay = 0.0  # seconds to wait before answering (any mode, console included)
        self.calls = 0
        self.received: list[Received] = []
        self.issued: dict[str, float] = {}  # token -> expiry (epoch seconds)
        self.minted: dict[str, Minted] = {}  # token -> who minted it
        # The I/O Management API (console) endpoints.
        self.consoles: dict[tuple[str, str], str] = {}  # (org_id, credential_id) -> client_id
        self.max_secrets = 2  # Adobe's limit per credential
        self.activation_delay = 0.0  # seconds before a secret created by POST works at IMS
        self.new_secrets_work = True  # False: secrets created by POST never work
        self.console_mode = "ok"
        self.console_calls: list[ConsoleCall] = []
        # Holding requests: events named in `hold` wait in `held` until release().
        self.hold: set[str] = set()
        self.held: list[str] = []
        self._waiters: list[tuple[str, asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._hold_lock = threading.Lock()  # release() may run in another thread

    def add_client(self, client_id: str, secret: str) -> DemoSecret:
        """Give ``client_id`` the secret ``secret``, accepted at once; return it."""
        own = self._secrets.setdefault(client_id, [])
        for known in own:
            if known.value == secret:
                return known
        now = self.clock()
        added = DemoSecret(str(uuid.uuid4()), secret, int(now * 1000), works_from=now)
        own.append(added)
        return added

    def secrets_of(self, client_id: str) -> list[DemoSecret]:
        """The secrets of ``client_id`` (a new list of the live objects)."""
        return list(self._secrets.get(client_id, []))

    @property
    def clients(self) -> dict[str, _SecretValues]:
        """Each client's secret values as a mutable set (``clients[id].discard(value)``)."""
        return {client_id: _SecretValues(self, client_id) for client_id in self._secrets}

    def add_console(self, client_id: str, org_id: str, credential_id: str) -> None:
        """Say that Developer Console org ``org_id`` and ``credential_id`` are ``client_id``'s."""
        self.consoles[(org_id, credential_id)] = client_id

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

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]  # lifespan.startup, then lifespan.shutdown
                await send({"type": kind + ".complete"})
                if kind == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        console = _CONSOLE_PATH.fullmatch(path)
        if console and (scope["method"], console["uuid"] is None) in _CONSOLE_ROUTES:
            await self._console(scope, send, console["org"], console["cred"], console["uuid"])
            return
        if scope["method"] != "POST" or path not in ("/ims/token/v3", "/oauth2/token"):
            await _reply(send, 404, {"error": "not_found"})
            return
        self.calls += 1
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        self.received.append(Received(path, form, headers, self.clock()))
        if self.delay:
            await asyncio.sleep(self.delay)
        await self._answer(send, receive, form, headers)

    async def _answer(
        self, send: Any, receive: Any, form: dict[str, str], headers: dict[str, str]
    ) -> None:
        mode = self.mode
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode in _ERRORS:
            status, error = _ERRORS[mode]
            body = {"error": error, "error_description": f"{error.replace('_', ' ')} (demo)"}
            return await _reply(send, status, body)
        if mode == "echo":
            sent = self._credentials(form, headers)[1]
            body = {"error": "invalid_request", "error_description": f"cannot parse {sent}"}
            return await _reply(send, 400, body)
        if mode == "html502":
            html = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            return await _reply(send, 502, html, content_type=b"text/html")
        if mode in ("throttle", "unavailable", "throttle_date"):
            status = 503 if mode == "unavailable" else 429
            body = {"error": "too_many_requests" if status == 429 else "temporarily_unavailable"}
            after = str(self.retry_after)
            if mode == "throttle_date":
                after = email.utils.formatdate(self.clock() + self.retry_after, usegmt=True)
            return await _reply(send, status, body, extra=[(b"retry-after", after.encode())])
        if mode == "garbage":
            return await _reply(send, 200, b"\x00\xffnot json", content_type=b"text/plain")
        if mode == "endless":  # a body that never ends: the broker must stop reading
            return await _endless(send, receive)
        if mode == "reset":  # promise a body, send half of it, drop the connection
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"100")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b'{"access_tok', "more_body": True})
            raise ConnectionResetError("demo issuer: connection dropped mid-body")
        found = self._authorised(form, headers)
        if found is None:
            body = {"error": "invalid_client", "error_description": "invalid client parameter"}
            return await _reply(send, 400, body)
        client_id, used = found
        await self._hold(f"TOKEN:{used.uuid}")
        now = self.clock()
        used.last_used_at = int(now * 1000)
        token = ("demo-" + secrets.token_urlsafe(self.token_bytes))[: self.token_bytes]
        answer: dict[str, object] = {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.lifetime,
        }
        if mode == "no_token":
            del answer["access_token"]
        elif mode == "huge_token":
            answer["access_token"] = "h" * 100_000
        elif mode in _TOKEN_VARIANTS:
            key, value = _TOKEN_VARIANTS[mode]
            answer[key] = str(self.lifetime) if value is str else value
            if value is None:
                del answer[key]
        if mode == "ok" or mode == "string_expires":
            self.issued[token] = now + self.lifetime
            scopes = frozenset(_SCOPE_SEPARATORS.split(form.get("scope", ""))) - {""}
            self.minted[token] = Minted(client_id, used.uuid, scopes, now + self.lifetime)
        await _reply(send, 200, answer)

    def _authorised(
        self, form: dict[str, str], headers: dict[str, str]
    ) -> tuple[str, DemoSecret] | None:
        """The client and the secret that authenticate this request, if IMS would accept it."""
        client_id, value = self._credentials(form, headers)
        if client_id is None or value is None:
            return None
        now = self.clock()
        for known in self._secrets.get(client_id, []):
            if known.value == value and known.works and now >= known.works_from:
                return client_id, known
        return None

    async def _console(
        self, scope: dict[str, Any], send: Any, org: str, cred: str, secret_uuid: str | None
    ) -> None:
        """One call to the I/O Management API's client-secrets endpoints."""
        method = scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        minted = self.minted.get(_bearer(headers))
        by = minted.secret_uuid if minted else None
        self.console_calls.append(ConsoleCall(method, scope["path"], headers, by, self.clock()))
        if self.delay:
            await asyncio.sleep(self.delay)
        try:
            status, body = await self._console_answer(method, headers, org, cred, secret_uuid)
        except _ConsoleError as e:
            status, body = e.status, e.body
        extra = [(b"retry-after", str(self.retry_after).encode())] if status == 503 else []
        await _console_reply(send, status, body, extra)

    async def _console_answer(
        self, method: str, headers: dict[str, str], org: str, cred: str, secret_uuid: str | None
    ) -> tuple[int, dict[str, object] | bytes | None]:
        """(status, body) for a console call; refusals raise _ConsoleError."""
        if self.console_mode == "unavailable":
            raise _ConsoleError(503, "503000", "service unavailable (demo)")
        if self.console_mode == "error500":
            raise _ConsoleError(500, "500000", "internal server error (demo)")
        client_id = self._console_client(method, headers, org, cred)
        if method == "GET":
            secrets_ = self._secrets.get(client_id, [])
            return 200, {"client_id": client_id, "client_secrets": [_entry(s) for s in secrets_]}
        if method == "POST":
            return await self._console_post(client_id)
        return await self._console_delete(client_id, secret_uuid or "")

    def _console_client(self, method: str, headers: dict[str, str], org: str, cred: str) -> str:
        """The client whose secrets the call may see, after checks a–d of DESIGN.md §11."""
        minted = self.minted.get(_bearer(headers))
        if minted is None or self.clock() >= minted.expires_at:
            raise _ConsoleError(401, "401013", "Oauth token is not valid")
        if headers.get("x-api-key") != minted.client_id:
            raise _ConsoleError(403, "403003", "Api Key is invalid")
        missing = {"adobeio_api", _CONSOLE_SCOPES[method]} - minted.scopes
        if missing:
            needs = ", ".join(sorted(missing))
            raise _ConsoleError(403, "403027", f"insufficient scope: the token lacks {needs}")
        if self.consoles.get((org, cred)) != minted.client_id:
            raise _ConsoleError(404, "404001", "credential not found")
        return minted.client_id

    async def _console_post(self, client_id: str) -> tuple[int, dict[str, object] | bytes]:
        await self._hold("POST")
        own = self._secrets.setdefault(client_id, [])
        if len(own) >= self.max_secrets:
            raise _ConsoleError(400, "400012", "maximum number of client secrets reached")
        now = self.clock()
        value = "p8e-" + secrets.token_urlsafe(24)
        created = DemoSecret(
            str(uuid.uuid4()), value, int(now * 1000),
            works_from=now + self.activation_delay, works=self.new_secrets_work,
        )  # fmt: skip
        own.append(created)
        await self._hold("POST_APPLIED")
        if self.console_mode == "post_lost":
            raise _ConsoleError(500, "500000", "internal server error (demo)")
        if self.console_mode == "post_garbage":
            return 200, b"<html>\x00\xffnot json"
        return 201, {"client_id": client_id, **_entry(created), "client_secret": value}

    async def _console_delete(self, client_id: str, secret_uuid: str) -> tuple[int, None]:
        await self._hold("DELETE")
        if self.console_mode == "delete_error":
            raise _ConsoleError(500, "500000", "internal server error (demo)")
        own = self._secrets.get(client_id, [])
        doomed = [s for s in own if s.uuid == secret_uuid]
        if not doomed:
            raise _ConsoleError(404, "404002", "secret not found")
        own.remove(doomed[0])
        return 204, None

    @staticmethod
    def _credentials(
        form: dict[str, str], headers: dict[str, str]
    ) -> tuple[str | None, str | None]:
        """(client_id, secret) from the form or from HTTP Basic authentication."""
        auth = headers.get("authorization", "")
        if not auth.startswith("Basic "):
            return form.get("client_id"), form.get("client_secret")
        try:
            pair = base64.b64decode(auth[6:], validate=True).decode()
        except ValueError:
            return None, None
        raw_id, _, raw_secret = pair.partition(":")
        return unquote_plus(raw_id), unquote_plus(raw_secret)


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


async def _reply(
    send: Any,
    status: int,
    body: dict[str, object] | bytes,
    *,
    content_type: bytes = b"application/json",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(data)).encode()),
        (b"x-debug-id", secrets.token_hex(8).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _bearer(headers: dict[str, str]) -> str:
    """The token of an ``Authorization: Bearer`` header, or ""."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _entry(secret: DemoSecret) -> dict[str, object]:
    """A secret as the console lists it: no value, times as strings of epoch milliseconds."""
    usages = None
    if secret.last_used_at is not None:
        usages = [{"last_used_at": str(secret.last_used_at), "grant_type": "client_credentials"}]
    return {
        "uuid": secret.uuid,
        "created_at": str(secret.created_at),
        "expires_at": "PERMANENT",
        "secret_usages": usages,
    }


async def _console_reply(
    send: Any,
    status: int,
    body: dict[str, object] | bytes | None,
    extra: list[tuple[bytes, bytes]],
) -> None:
    """A console answer: always an ``x-request-id``, JSON content type when there is a body."""
    headers = [(b"x-request-id", secrets.token_hex(16).encode()), *extra]
    data = b""
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode())]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def loopback_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def issuer_server(
    issuer: DemoIssuer, *, certfile: str | None = None, keyfile: str | None = None
) -> Server:
    """The issuer as a uvicorn server that leaves signals to the broker beside it.

    With ``certfile``/``keyfile`` it speaks HTTPS (tests of issuers behind a private CA).
    """
    config = uvicorn.Config(
        issuer,
        log_config=None,
        access_log=False,
        lifespan="on",
        ws="none",
        timeout_graceful_shutdown=1,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )
    return Server(config)


async def run(
    listen: str, lifetime: float, redactor: Redactor, rotate_every: float | None = None
) -> int:
    """Start the demo issuer and the broker in one process; serve until interrupted.

    With ``rotate_every`` the credential is an Adobe one whose secret the broker
    cycles through the issuer's I/O Management API (DESIGN §11) that often.
    """
    from broker import config, daemon, server

    issuer = DemoIssuer(lifetime=lifetime)
    secret = secrets.token_urlsafe(24)
    issuer.add_client("demo", secret)
    issuer_sock = loopback_socket()
    port = issuer_sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="token-broker-demo-") as tmp:
        secret_file = Path(tmp) / "demo.secret"
        secret_file.touch(mode=0o600)
        secret_file.write_text(secret + "\n")
        table: dict[str, object] = {
            "provider": "oauth2",
            "token_url": f"{base}/oauth2/token",
            "client_id": "demo",
            "secret": f"file:{secret_file}",
        }
        if rotate_every is not None:
            issuer.add_console("demo", DEMO_ORG, DEMO_CREDENTIAL)
            table = {
                "provider": "adobe",
                "client_id": "demo",
                "secret": f"file:{secret_file}",
                "ims_url": base,
                "console_url": base,
                "console_org_id": DEMO_ORG,
                "credential_id": DEMO_CREDENTIAL,
                "rotate_every": rotate_every,
                "rotate_verify": "20s",
            }
        settings = config.parse(
            {"server": {"listen": [listen]}, "credentials": {"demo": table}}, source="demo"
        )
        sockets = server.open_listeners(settings.server)
        own = server.socket_files(settings.server)
        _banner(settings, port, lifetime, rotate_every)
        issuer_srv = issuer_server(issuer)
        issuer_task = asyncio.create_task(issuer_srv.serve(sockets=[issuer_sock]))
        try:
            await daemon.serve(settings, sockets, redactor=redactor, state_directory=Path(tmp))
        finally:
            server.remove_socket_files(own)
            issuer_srv.request_exit()
            await issuer_task
    return 0


#: The Developer Console ids of the demo credential (``--rotate-every``).
DEMO_ORG = "1000001"
DEMO_CREDENTIAL = "demo-credential"


def _banner(
    settings: Any, issuer_port: int, lifetime: float, rotate_every: float | None = None
) -> None:
    listen = settings.server.listen[0]
    base = f"http://{listen}" if not str(listen).startswith("unix:") else "http://localhost"
    unix = f"--unix-socket {listen.path} " if str(listen).startswith("unix:") else ""
    # The client and exec find 127.0.0.1:8765 by themselves; any other address is named.
    url = str(listen) if unix else base
    own = url != "http://127.0.0.1:8765"
    arg, flag = (f'"{url}"', f"--url {url} ") if own else ("", "")
    list_line = f"token-broker list {flag}".rstrip()
    cycling = (
        f"The client secret is cycled every {rotate_every:g}s through the issuer's I/O "
        "Management API (secret_cycling in the status; `token-broker list`).\n"
        if rotate_every is not None
        else ""
    )
    print(
        f"token-broker demo: issuer on http://127.0.0.1:{issuer_port}, "
        f"tokens live {lifetime:g}s and are refreshed ahead of expiry.\n"
        f"{cycling}"
        "Try:\n"
        f"  curl -s {unix}-H 'X-Token-Broker: 1' {base}/token\n"
        f"  curl -s {unix}-H 'X-Token-Broker: 1' {base}/v1/credentials/demo\n"
        f"  curl -s {unix}{base}/metrics\n"
        f"  python -c 'from broker.client import TokenBroker; print(TokenBroker({arg}).status())'\n"
        f"  token-broker exec {flag}-- sh -c 'echo \"token until $TOKEN_BROKER_EXPIRES_AT\"'\n"
        f"  {list_line}\n"
        "Press Ctrl-C to stop.",
        flush=True,
    )
