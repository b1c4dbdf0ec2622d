"""The HTTP API (docs/http-api.md).

``create_app`` returns one ASGI application. Its outer layer applies the
guards to every request and answers the hot path (``GET /token`` and
``GET /token/{name}``) itself, at the ASGI level, because FastAPI's routing
and response machinery costs about two thirds of the throughput there. Every
other route is an ordinary FastAPI route behind the same guards.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker import access, guards
from broker.asgi import TEXT, Message, Receive, Scope, Send, respond, respond_error
from broker.config import Settings
from broker.cycling import Cycler
from broker.errors import BrokerError, CycleError, Refused, UnknownCredential
from broker.manager import Credential, Manager
from broker.metrics import Gauges, RequestCounters, render
from broker.stores import VaultRef, VaultSession
from broker.tokens import Clock, rfc3339

#: What the reload route calls: re-read the config and apply it (the daemon's), returning
#: the plan (added, removed, changed, unchanged).
Reload = Callable[[], Awaitable[dict[str, list[str]]]]

#: Routes that answer without the X-Token-Broker header: they reveal no token or secret.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: The route whose answer is about the reload it made: it is not judged again under the
#: rules that reload put in force (they may have dropped the very key that asked for it).
RELOAD_PATH = "/v1/reload"
NO_STORE = "no-store"
access_log = logging.getLogger("broker.access")


_NO_NAMES: frozenset[bytes] = frozenset()


class BrokerApp:
    """Outer ASGI layer: guards for every route, and the token hot path.

    The access rules (``rules``) are built once per (re)loaded settings, in :meth:`use`,
    which the daemon calls at every reload. An answer is made under the rules in force
    when it is sent: a request that waited (on a refresh, a cycle) while a reload removed
    its key, or its right to that credential, gets the refusal instead of what it asked for.
    """

    def __init__(
        self, manager: Manager, counters: RequestCounters, settings: Settings, api: FastAPI
    ) -> None:
        self.api = api
        #: The DNS names of the TLS certificate: Host may be one of them over HTTPS.
        self.tls_names: frozenset[bytes] = frozenset()
        self.manager = manager
        self.counters = counters
        self.use(settings)

    def use(self, settings: Settings) -> None:
        """Take the settings of a (re)load: their access rules and guard switches."""
        self._settings = settings
        header = settings.server.require_header
        self._header = header.lower().encode() if header else None
        self._remote = settings.server.allow_remote
        self.rules = access.Access(settings)
        # Plain booleans for the hot path: with no client keys and no peer rules, skip both.
        self._keys = bool(self.rules.clients)
        self._open = self.rules.open
        self._access_log = settings.server.access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan: the daemon starts and stops what this app reads
        settings = self._settings  # the rules this request is judged by, until its answer
        if self._access_log:
            send = _logged(scope, send)
        path: str = scope["path"]
        guarded = path not in OPEN_PATHS
        names = self.tls_names if self.tls_names and scope["scheme"] == "https" else _NO_NAMES
        refused = guards.refusal(
            scope, self._header if guarded else None, remote=self._remote, names=names
        )
        if refused is not None:
            await self._denied(send, refused)
            return
        if guarded and self._keys:
            try:
                client = self.rules.authenticate(scope)
            except Refused as exc:
                if not access.keyless_admin(scope, exc):
                    await self._denied(send, exc)
                    return
                client = None  # root or the daemon's user on the unix socket: see access.py
            scope.setdefault("extensions", {})[access.CLIENT] = client
        elif not guarded and self._remote and guards.remote_peer(scope):
            if await self._remote_probe(scope, path, send):
                return
        if scope["method"] == "GET" and (path == "/token" or path.startswith("/token/")):
            await self._token(scope, path, send, settings)
            return
        if guarded and path != RELOAD_PATH:
            send = self._judged_again(scope, send, settings)
        await self.api(scope, receive, send)

    async def _token(self, scope: Scope, path: str, send: Send, settings: Settings) -> None:
        manager = self.manager
        name = manager.default if path == "/token" else path[7:]
        if not self._open:
            try:
                self.rules.authorize(scope, name)
            except Refused as exc:
                await self._denied(send, exc)
                return
        token = manager.cached(name)
        if token is None:
            try:
                token = await manager.token(name)
            except UnknownCredential as exc:
                self.counters.unknown += 1
                await respond_error(send, exc)
                return
            except BrokerError as exc:
                self.counters.tokens[(name, "unavailable")] += 1  # type: ignore[index]
                await respond_error(send, exc)
                return
            # It waited for a refresh: a reload meanwhile may have removed its key.
            if self._settings is not settings and name is not None:
                if (denied := self.rules.reauthorize(scope, (name,))) is not None:
                    await self._denied(send, denied)
                    return
        self.counters.tokens[(name, "ok")] += 1  # type: ignore[index]
        await respond(send, 200, token.access_token.encode(), content_type=TEXT)

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
            if message["type"] == "http.response.start" and self._settings is not settings:
                ext = scope.get("extensions") or {}
                denied = self.rules.reauthorize(
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
                client = self.rules.authenticate(scope)
            except Refused as exc:
                await self._denied(send, exc)
                return True
            scope.setdefault("extensions", {})[access.CLIENT] = client
            return False
        if path == "/readyz":
            if self.manager.ready():
                body: dict[str, object] = {"status": "ready"}
            else:
                body = {"error": "not_ready", "detail": "a credential has no servable token"}
            await respond(send, 200 if "status" in body else 503, body)
            return True
        return False  # /healthz names nothing

    async def _denied(self, send: Send, exc: Refused) -> None:
        self.counters.rejected[exc.rule] += 1
        await respond_error(send, exc)


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
            ms = (time.perf_counter() - started) * 1000
            access_log.info("%s %s %d peer=%s client=%s %.1fms", scope["method"],
                            scope["path"][:200], message["status"], where,
                            client.name if client else "-", ms)  # fmt: skip
        await send(message)

    return logged_send


def status_json(
    credential: Credential,
    now: float,
    default: str | None,
    cycler: Cycler | None = None,
    vault: VaultSession | None = None,
) -> dict[str, object]:
    """The status JSON (docs/http-api.md): no secret, no token; with secret cycling, its
    state; with a secret in Vault, the version in use and how Vault answers."""
    cred, token = credential.settings, credential.token
    cycling = cycler.status.get(cred.name) if cycler is not None else None
    in_vault = vault is not None and isinstance(cred.secret, VaultRef)
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
        "vault": _vault_json(vault, cred.name) if in_vault and vault is not None else None,
    }


def _vault_json(vault: VaultSession, name: str) -> dict[str, object]:
    health = vault.vault.health
    return {
        "address": vault.vault.address,
        "version": vault.versions.get(name),
        "ok": health.ok,
        "error": health.error,  # the address, the call and Vault's own words: no secret
        "failed_at": rfc3339(health.at),
    }


def gauges(
    manager: Manager, now: float, cycler: Cycler | None = None, vault: VaultSession | None = None
) -> list[Gauges]:
    """Each credential's current values for a metrics scrape."""
    ages = cycler.secret_ages(now) if cycler is not None else {}
    versions = vault.versions if vault is not None else {}
    return [
        Gauges(
            name,
            c.state(now),
            c.token.expires_at - now if c.token is not None else None,
            c.refreshed_at,
            ages.get(name),
            versions.get(name),
        )
        for name, c in manager.credentials.items()
    ]


def create_app(
    manager: Manager,
    *,
    clock: Clock,
    cycler: Cycler | None = None,
    counters: RequestCounters | None = None,
    reload: Reload | None = None,
    vault: VaultSession | None = None,
) -> BrokerApp:
    """Build the ASGI app that answers from ``manager`` (and ``cycler``, ``vault``);
    ``reload`` is what ``POST /v1/reload`` runs. Starting and stopping them is the
    daemon's."""
    api = FastAPI(title="token-broker", docs_url=None, redoc_url=None, openapi_url=None)
    counters = counters or RequestCounters()
    app = BrokerApp(manager, counters, manager.settings, api)

    @api.exception_handler(BrokerError)
    async def broker_error(_: Request, exc: BrokerError) -> Response:
        return JSONResponse(exc.http_body(), exc.http_status, headers=exc.http_headers())

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, exc.status_code)

    def allowed(request: Request, name: str) -> str:
        """``name`` once the request may read it (raises Refused otherwise); recorded,
        so that the answer is judged again should a reload change the rules meanwhile."""
        app.rules.authorize(request.scope, name)
        request.scope.setdefault("extensions", {}).setdefault(access.NAMES, []).append(name)
        return name

    def administrator(request: Request, act: str) -> None:
        """Raise Refused unless an administrator asks (with client keys: "*")."""
        app.rules.authorize_reload(request.scope, act)
        request.scope.setdefault("extensions", {})[access.ADMIN] = act

    def status(credential: Credential) -> dict[str, object]:
        return status_json(credential, clock(), manager.default, cycler, vault)

    @api.get("/v1/credentials")
    async def list_credentials(request: Request) -> list[dict[str, object]]:
        rules = app.rules
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
        return JSONResponse(token.as_json(clock()), headers={"Cache-Control": NO_STORE})

    @api.get("/v1/credentials/{name}/headers")
    async def credential_headers(request: Request, name: str) -> Response:
        cred = manager.get(allowed(request, name)).settings
        token = await manager.token(name)
        body = cred.api_headers(token.access_token)
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
    async def reload_route(request: Request) -> dict[str, list[str]]:
        administrator(request, "reload")
        if reload is None:
            raise CycleError("error", "this app has no config file to reload")
        return await reload()

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
        health = vault.vault.health if vault is not None else None
        text = render(manager.recorder, counters, gauges(manager, clock(), cycler, vault), health)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app
