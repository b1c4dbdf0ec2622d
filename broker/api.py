"""The HTTP API of DESIGN §4.

``create_app`` returns one ASGI application. Its outer layer applies the
guards to every request and answers the hot path (``GET /token`` and
``GET /token/{name}``) itself, at the ASGI level, because FastAPI's routing
and response machinery costs about two thirds of the throughput there. Every
other route is an ordinary FastAPI route behind the same guards.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker import access, guards
from broker.config import Settings
from broker.console import Cycler
from broker.errors import (
    AccessDenied,
    BrokerError,
    ConfigError,
    CycleError,
    IssuerError,
    RefreshCooldown,
    RotateCooldown,
    SecretError,
    TokenUnavailable,
    UnknownCredential,
)
from broker.manager import Credential, Manager
from broker.metrics import Gauges, RequestCounters, render
from broker.net import is_loopback
from broker.providers import api_headers
from broker.tokens import Clock, rfc3339

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Routes that answer without the X-Token-Broker header: they reveal no token or secret.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: The route whose answer is about the reload it made: it is not judged again under the
#: rules that reload put in force (they may have dropped the very key that asked for it).
RELOAD_PATH = "/v1/reload"
NO_STORE = "no-store"
access_log = logging.getLogger("broker.access")


def error_body(exc: BrokerError) -> tuple[int, dict[str, object], dict[str, str]]:
    """Map an error of the tree to (status, JSON body, headers): one place for both paths."""
    headers: dict[str, str] = {}
    body: dict[str, object]
    if isinstance(exc, AccessDenied):
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="token-broker"'
        return exc.status, {"error": exc.code, "detail": str(exc)}, headers
    if isinstance(exc, UnknownCredential):
        return 404, {"error": "unknown_credential", "detail": str(exc)}, headers
    if isinstance(exc, TokenUnavailable):
        headers["Retry-After"] = str(math.ceil(exc.retry_after))
        body = {"error": "token_unavailable", "detail": str(exc), "last_error": exc.last_error}
        return 503, body, headers
    if isinstance(exc, RefreshCooldown):
        headers["Retry-After"] = str(math.ceil(exc.retry_after))
        return 429, {"error": "refresh_cooldown", "detail": str(exc)}, headers
    if isinstance(exc, RotateCooldown):
        headers["Retry-After"] = str(math.ceil(exc.retry_after))
        return 429, {"error": "rotate_cooldown", "detail": str(exc)}, headers
    if isinstance(exc, CycleError):
        status = {"conflict": 409, "busy": 409}.get(exc.outcome, 502)
        body = {"error": f"cycle_{exc.outcome}", "detail": str(exc),
                "x_request_id": exc.request_id}  # fmt: skip
        return status, body, headers
    if isinstance(exc, IssuerError):
        return 502, {"error": "issuer_error", "detail": exc.summary()}, headers
    if isinstance(exc, SecretError):
        return 502, {"error": "secret_unavailable", "detail": str(exc)}, headers
    if isinstance(exc, ConfigError):
        return 400, {"error": "config_error", "detail": str(exc)}, headers
    return 500, {"error": "internal_error", "detail": type(exc).__name__}, headers


async def _send(
    send: Send, status: int, body: bytes, content_type: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_JSON = b"application/json"
_NO_NAMES: frozenset[bytes] = frozenset()
_TEXT = b"text/plain; charset=utf-8"


class BrokerApp:
    """Outer ASGI layer: guards for every route, and the token hot path.

    The access rules are built once per (re)loaded settings, here, and the
    FastAPI routes read them from :meth:`rules`. An answer is made under the
    rules in force when it is sent: a request that waited (on a refresh, a
    cycle) while a reload removed its key, or its right to that credential,
    gets the refusal instead of what it asked for.
    """

    def __init__(self, manager: Manager, counters: RequestCounters) -> None:
        self.api: FastAPI | None = None  # set by create_app
        #: The DNS names of the TLS certificate: Host may be one of them over HTTPS.
        self.tls_names: frozenset[bytes] = frozenset()
        self.manager = manager
        self.counters = counters
        self._use(manager.settings)

    def rules(self) -> access.Access:
        """The access rules of the settings in force."""
        if self.manager.settings is not self._settings:  # a reload happened
            self._use(self.manager.settings)
        return self._access

    def _use(self, settings: Settings) -> None:
        self._settings = settings
        self._header = _header_name(settings)
        self._remote = settings.server.allow_remote
        self._access = access.Access(settings)
        # Plain booleans for the hot path: with no client keys and no peer rules, skip both.
        self._keys = bool(self._access.clients)
        self._open = self._access.open
        self._access_log = settings.server.access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)  # type: ignore[misc]  # lifespan
            return
        if self.manager.settings is not self._settings:  # a reload happened
            self._use(self.manager.settings)
        settings = self._settings  # the rules this request is judged by, until its answer
        if self._access_log:
            send = _logged(scope, send)
        path: str = scope["path"]
        guarded = path not in OPEN_PATHS
        names = self.tls_names if self.tls_names and scope["scheme"] == "https" else _NO_NAMES
        rejection = guards.refusal(
            scope, self._header if guarded else None, remote=self._remote, names=names
        )
        if rejection is not None:
            self.counters.rejected[rejection.rule] += 1
            body = _dump({"error": rejection.error, "detail": rejection.detail})
            await _send(send, rejection.status, body, _JSON, [])
            return
        if guarded and self._keys:
            try:
                client = self._access.authenticate(scope)
            except AccessDenied as exc:
                if not access.keyless_admin(scope, exc):
                    await self._denied(send, exc)
                    return
                client = None  # root or the daemon's user on the unix socket: see access.py
            scope.setdefault("extensions", {})[access.CLIENT] = client
        elif not guarded and self._remote and _remote_peer(scope):
            if await self._remote_probe(scope, path, send):
                return
        if scope["method"] == "GET" and (path == "/token" or path.startswith("/token/")):
            await self._token(scope, path, send, settings)
            return
        if guarded and path != RELOAD_PATH:
            send = self._judged_again(scope, send, settings)
        await self.api(scope, receive, send)  # type: ignore[misc]

    async def _token(self, scope: Scope, path: str, send: Send, settings: Settings) -> None:
        manager = self.manager
        name = manager.default if path == "/token" else path[7:]
        if not self._open:
            try:
                self._access.authorize(scope, name)
            except AccessDenied as exc:
                await self._denied(send, exc)
                return
        token = manager.cached(name)
        if token is None:
            try:
                token = await manager.token(name)
            except UnknownCredential as exc:
                self.counters.unknown += 1
                await self._error(send, exc)
                return
            except BrokerError as exc:
                self.counters.tokens[(name, "unavailable")] += 1  # type: ignore[index]
                await self._error(send, exc)
                return
            # It waited for a refresh: a reload meanwhile may have removed its key.
            if manager.settings is not settings and name is not None:
                denied = self.rules().reauthorize(scope, (name,))
                if denied is not None:
                    await self._denied(send, denied)
                    return
        self.counters.tokens[(name, "ok")] += 1  # type: ignore[index]
        await _send(send, 200, token.access_token.encode(), _TEXT, [])

    def _judged_again(self, scope: Scope, send: Send, settings: Settings) -> Send:
        """Wrap ``send`` so that, should a reload have changed the rules since the request
        was admitted, the request is judged again when its answer starts; refused, it gets
        the refusal and nothing of the answer. The names and the administrator rule it
        was admitted for are those the route recorded (access.NAMES, access.ADMIN)."""
        refused = False

        async def judged_send(message: Message) -> None:
            nonlocal refused
            if refused:
                return  # the route's own answer is dropped: the refusal was sent
            if message["type"] == "http.response.start" and self.manager.settings is not settings:
                ext = scope.get("extensions") or {}
                denied = self.rules().reauthorize(
                    scope, ext.get(access.NAMES, ()), admin=ext.get(access.ADMIN, "")
                )
                if denied is not None:
                    refused = True
                    await self._denied(send, denied)
                    return
            await send(message)

        return judged_send

    async def _remote_probe(self, scope: Scope, path: str, send: Send) -> bool:
        """``/healthz``, ``/readyz`` and ``/metrics`` for a non-loopback peer (allow_remote):
        True once answered here. Without a client key it learns no credential name:
        ``/readyz`` answers with its status code alone (probes keep working), ``/metrics``
        is refused (401). With a valid key the routes answer in full; a wrong one is 401."""
        if path == "/metrics" or any(n == b"authorization" for n, _ in scope["headers"]):
            try:
                client = self._access.authenticate(scope)
            except AccessDenied as exc:
                await self._denied(send, exc)
                return True
            scope.setdefault("extensions", {})[access.CLIENT] = client
            return False
        if path == "/readyz":
            if self.manager.ready():
                body: dict[str, object] = {"status": "ready"}
            else:
                body = {"error": "not_ready", "detail": "a credential has no servable token"}
            await _send(send, 200 if "status" in body else 503, _dump(body), _JSON, [])
            return True
        return False  # /healthz names nothing

    async def _denied(self, send: Send, exc: AccessDenied) -> None:
        self.counters.rejected[exc.rule] += 1
        await self._error(send, exc)

    @staticmethod
    async def _error(send: Send, exc: BrokerError) -> None:
        status, body, headers = error_body(exc)
        extra = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await _send(send, status, _dump(body), _JSON, extra)


def _remote_peer(scope: Scope) -> bool:
    """A TCP peer outside loopback (only admitted with allow_remote)."""
    server, client = scope.get("server"), scope.get("client")
    if server is not None and server[1] is None:
        return False  # a unix socket
    return client is None or not is_loopback(client[0])


def _logged(scope: Scope, send: Send) -> Send:
    """Wrap ``send`` to write one access-log line when the response starts.

    The line holds the method, the path (credential names, never a token), the
    status, the peer and the client name; never headers or the query string.
    """
    started = time.perf_counter()

    async def logged_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            ext = scope.get("extensions") or {}
            peer = ext.get(access.PEER)
            client = ext.get(access.CLIENT)
            where = f"uid={peer.uid}" if peer else (scope.get("client") or ("unix",))[0]
            access_log.info(
                "%s %s %d peer=%s client=%s %.1fms",
                scope["method"],
                scope["path"][:200],
                message["status"],
                where,
                client.name if client else "-",
                (time.perf_counter() - started) * 1000,
            )
        await send(message)

    return logged_send


def _header_name(settings: Settings) -> bytes | None:
    name = settings.server.require_header
    return name.lower().encode() if name else None


def _dump(body: dict[str, object]) -> bytes:
    return json.dumps(body).encode()


def status_json(
    credential: Credential, now: float, default: str | None, cycler: Cycler | None = None
) -> dict[str, object]:
    """The status JSON of DESIGN §4: no secret, no token; with secret cycling, its state."""
    cred, token = credential.settings, credential.token
    cycling = cycler.status.get(cred.name) if cycler is not None else None
    return {
        "name": cred.name,
        "provider": cred.provider,
        "client_id": cred.client_id,
        "default": cred.name == default,  # how clients find GET /token's credential
        "state": credential.state(now),
        "expires_at": rfc3339(token.expires_at if token else None),
        "refreshed_at": rfc3339(credential.refreshed_at),
        "next_refresh_at": rfc3339(credential.next_refresh_at),
        "last_error": credential.last_error.as_json() if credential.last_error else None,
        "secret_cycling": cycling.as_json(cred, now) if cycling is not None else None,  # type: ignore[arg-type]
    }


def gauges(manager: Manager, now: float, cycler: Cycler | None = None) -> list[Gauges]:
    """Each credential's current values for a metrics scrape."""
    ages = cycler.secret_ages(now) if cycler is not None else {}
    return [
        Gauges(
            name,
            c.state(now),
            c.token.expires_at - now if c.token is not None else None,
            c.refreshed_at,
            ages.get(name),
        )
        for name, c in manager.credentials.items()
    ]


def create_app(manager: Manager, *, clock: Clock, cycler: Cycler | None = None) -> BrokerApp:
    """Build the ASGI app around ``manager``; its lifespan starts and stops the manager
    (and the secret cycling beside it)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await manager.start()
        if cycler is not None:
            cycler.start()
        try:
            yield
        finally:
            await manager.close()

    api = FastAPI(
        title="token-broker", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    counters = RequestCounters()
    app = BrokerApp(manager, counters)
    app.api = api

    @api.exception_handler(BrokerError)
    async def broker_error(_: Request, exc: BrokerError) -> Response:
        status, body, headers = error_body(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, exc.status_code)

    def allowed(request: Request, name: str) -> str:
        """``name`` once the request may read it (raises AccessDenied otherwise); recorded,
        so that the answer is judged again should a reload change the rules meanwhile."""
        app.rules().authorize(request.scope, name)
        request.scope.setdefault("extensions", {}).setdefault(access.NAMES, []).append(name)
        return name

    def administrator(request: Request, act: str) -> None:
        """Raise AccessDenied unless an administrator asks (with client keys: "*")."""
        app.rules().authorize_reload(request.scope, act)
        request.scope.setdefault("extensions", {})[access.ADMIN] = act

    def status(credential: Credential) -> dict[str, object]:
        return status_json(credential, clock(), manager.default, cycler)

    @api.get("/v1/credentials")
    async def list_credentials(request: Request) -> list[dict[str, object]]:
        rules = app.rules()
        return [
            status(c)
            for name, c in manager.credentials.items()
            if rules.may_read(request.scope, name)
        ]

    @api.get("/v1/credentials/{name}")
    async def credential_status(request: Request, name: str) -> dict[str, object]:
        return status(manager.get(allowed(request, name)))

    @api.get("/v1/credentials/{name}/token")
    async def credential_token(request: Request, name: str) -> Response:
        token = await manager.token(allowed(request, name))
        body = token.as_json(clock())
        return JSONResponse(body, headers={"Cache-Control": NO_STORE})

    @api.get("/v1/credentials/{name}/headers")
    async def credential_headers(request: Request, name: str) -> Response:
        cred = manager.get(allowed(request, name)).settings
        token = await manager.token(name)
        body = api_headers(cred, token.access_token)
        # The token's remaining life, so a client knows how long to keep these headers
        # (broker.client.BrokerAuth); the JSON body stays exactly the headers to send.
        left = str(max(0, math.floor(token.expires_at - clock())))
        return JSONResponse(body, headers={"Cache-Control": NO_STORE, "X-Token-Expires-In": left})

    @api.post("/v1/credentials/{name}/refresh")
    async def force_refresh(request: Request, name: str) -> dict[str, object]:
        return status(await manager.force_refresh(allowed(request, name)))

    @api.post("/v1/credentials/{name}/rotate")
    async def rotate(request: Request, name: str) -> dict[str, object]:
        # Creates and deletes secrets at Adobe: for whoever may force a refresh of that
        # credential (client keys, allow_uids / allow_gids), and with client keys only for
        # an administrator ("*"), as reload; at most one per ROTATE_COOLDOWN on request.
        administrator(request, "cycle secrets")
        manager.get(allowed(request, name))
        if cycler is None:
            raise CycleError("error", "this daemon does not cycle secrets")
        result = await cycler.rotate(name)
        return {**result.as_json(), "credential": name, "status": status(manager.get(name))}

    @api.post("/v1/reload")
    async def reload(request: Request) -> dict[str, list[str]]:
        administrator(request, "reload")
        return await manager.reload_file()

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> Response:
        now = clock()
        states = {name: c.state(now) for name, c in manager.credentials.items()}
        if manager.ready():
            return JSONResponse({"status": "ready", "credentials": states})
        waiting = sorted(n for n, c in manager.credentials.items() if now >= c.serve_until)
        body = {
            "error": "not_ready",
            "detail": f"no servable token for: {', '.join(waiting)}",
            "credentials": states,
        }
        return JSONResponse(body, status_code=503)

    @api.get("/metrics")
    async def metrics() -> Response:
        text = render(manager.recorder, counters, gauges(manager, clock(), cycler))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app
