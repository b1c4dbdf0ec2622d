"""The HTTP API of DESIGN §4.

``create_app`` returns one ASGI application. Its outer layer applies the
guards to every request and answers the hot path (``GET /token`` and
``GET /token/{name}``) itself, at the ASGI level, because FastAPI's routing
and response machinery costs about two thirds of the throughput there. Every
other route is an ordinary FastAPI route behind the same guards.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker import guards
from broker.config import Settings
from broker.errors import (
    BrokerError,
    ConfigError,
    IssuerError,
    RefreshCooldown,
    SecretError,
    TokenUnavailable,
    UnknownCredential,
)
from broker.manager import Manager
from broker.metrics import RequestCounters, render
from broker.tokens import Clock, rfc3339

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Routes that answer without the X-Token-Broker header: they reveal no token or secret.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
NO_STORE = "no-store"


def error_body(exc: BrokerError) -> tuple[int, dict[str, object], dict[str, str]]:
    """Map an error of the tree to (status, JSON body, headers): one place for both paths."""
    headers: dict[str, str] = {}
    body: dict[str, object]
    if isinstance(exc, UnknownCredential):
        return 404, {"error": "unknown_credential", "detail": str(exc)}, headers
    if isinstance(exc, TokenUnavailable):
        headers["Retry-After"] = str(math.ceil(exc.retry_after))
        body = {"error": "token_unavailable", "detail": str(exc), "last_error": exc.last_error}
        return 503, body, headers
    if isinstance(exc, RefreshCooldown):
        headers["Retry-After"] = str(math.ceil(exc.retry_after))
        return 429, {"error": "refresh_cooldown", "detail": str(exc)}, headers
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
_TEXT = b"text/plain; charset=utf-8"


class BrokerApp:
    """Outer ASGI layer: guards for every route, and the token hot path."""

    def __init__(
        self, api: FastAPI, manager: Manager, settings: Settings, counters: RequestCounters
    ) -> None:
        self.api = api
        self.manager = manager
        self.counters = counters
        self._settings = settings
        self._header = _header_name(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)  # lifespan
            return
        if self.manager.settings is not self._settings:  # a reload happened
            self._settings = self.manager.settings
            self._header = _header_name(self._settings)
        path: str = scope["path"]
        rejection = guards.check(scope, None if path in OPEN_PATHS else self._header)
        if rejection is not None:
            self.counters.rejected[rejection.rule] += 1
            body = _dump({"error": rejection.error, "detail": rejection.detail})
            await _send(send, rejection.status, body, _JSON, [])
            return
        if scope["method"] == "GET" and (path == "/token" or path.startswith("/token/")):
            await self._token(path, send)
            return
        await self.api(scope, receive, send)

    async def _token(self, path: str, send: Send) -> None:
        manager = self.manager
        name = manager.default if path == "/token" else path[7:]
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
        self.counters.tokens[(name, "ok")] += 1  # type: ignore[index]
        await _send(send, 200, token.access_token.encode(), _TEXT, [])

    @staticmethod
    async def _error(send: Send, exc: BrokerError) -> None:
        status, body, headers = error_body(exc)
        extra = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await _send(send, status, _dump(body), _JSON, extra)


def _header_name(settings: Settings) -> bytes | None:
    name = settings.server.require_header
    return name.lower().encode() if name else None


def _dump(body: dict[str, object]) -> bytes:
    return json.dumps(body).encode()


def create_app(settings: Settings, *, manager: Manager, clock: Clock) -> BrokerApp:
    """Build the ASGI app; its lifespan starts and stops the manager."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await manager.start()
        try:
            yield
        finally:
            await manager.close()

    api = FastAPI(
        title="token-broker", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    counters = RequestCounters()

    @api.exception_handler(BrokerError)
    async def broker_error(_: Request, exc: BrokerError) -> Response:
        status, body, headers = error_body(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, exc.status_code)

    @api.get("/v1/credentials")
    async def list_credentials() -> list[dict[str, object]]:
        return [manager.status(e) for e in manager.entries.values()]

    @api.get("/v1/credentials/{name}")
    async def credential_status(name: str) -> dict[str, object]:
        return manager.status(manager.entry(name))

    @api.get("/v1/credentials/{name}/token")
    async def credential_token(name: str) -> Response:
        token = await manager.token(name)
        body = {
            "access_token": token.access_token,
            "token_type": "bearer",
            "expires_in": max(0, math.floor(token.expires_at - clock())),
            "expires_at": rfc3339(token.expires_at),
        }
        return JSONResponse(body, headers={"Cache-Control": NO_STORE})

    @api.get("/v1/credentials/{name}/headers")
    async def credential_headers(name: str) -> Response:
        cred = manager.entry(name).cred
        token = await manager.token(name)
        if cred.provider == "adobe":
            from broker.providers.adobe import api_headers

            body = api_headers(cred, token.access_token)
        else:
            body = {"Authorization": f"Bearer {token.access_token}"}
        return JSONResponse(body, headers={"Cache-Control": NO_STORE})

    @api.post("/v1/credentials/{name}/refresh")
    async def force_refresh(name: str) -> dict[str, object]:
        return manager.status(await manager.force_refresh(name))

    @api.post("/v1/reload")
    async def reload() -> dict[str, list[str]]:
        return await manager.reload_file()

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> Response:
        now = clock()
        states = {name: e.state(now) for name, e in manager.entries.items()}
        if manager.ready():
            return JSONResponse({"status": "ready", "credentials": states})
        waiting = sorted(n for n, e in manager.entries.items() if now >= e.serve_until)
        body = {
            "error": "not_ready",
            "detail": f"no servable token for: {', '.join(waiting)}",
            "credentials": states,
        }
        return JSONResponse(body, status_code=503)

    @api.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(
            render(manager, counters, clock()), media_type="text/plain; version=0.0.4"
        )

    return BrokerApp(api, manager, settings, counters)
