"""The embedded OAuth issuer behind ``token-broker demo``.

:class:`DemoIssuer` is a small ASGI app that speaks both the Adobe IMS
endpoint (``POST /ims/token/v3``) and a generic client-credentials endpoint
(``POST /oauth2/token``). It checks client credentials and issues short-lived
random tokens.

It also serves the client-secrets endpoints of Adobe's I/O Management API
(docs/credentials.md, automated secret cycling): list, add and delete a credential's secrets under
``/console/organizations/{org}/credentials/{credential}/secrets``, with the
bearer-token, API-key, scope and binding checks the real API makes, so that
``token-broker demo --rotate-every`` cycles a secret as it would at Adobe.

The test suite extends this issuer (failure modes, requests held at chosen
points, bookkeeping of what it received) in its own ``tests/issuer.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import uvicorn

from broker.logs import Redactor
from broker.server import Server

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


@dataclass(frozen=True)
class MintRecord:
    """What the issuer knows of a token it issued: who minted it, with which secret."""

    client_id: str
    secret_uuid: str
    scopes: frozenset[str]
    expires_at: float  # epoch seconds


class ConsoleError(Exception):
    """A console answer with an ``{"error_code", "message"}`` body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.body = status, {"error_code": code, "message": message}


class DemoIssuer:
    """An OAuth 2.0 client-credentials issuer, with Adobe's client-secrets API beside it."""

    #: Adobe's limit of secrets per credential.
    max_secrets = 2
    #: Length of an access token (Adobe's are JWTs of about 1,500 bytes).
    token_bytes = 48

    def __init__(self, lifetime: float = 120.0, *, clock: Callable[[], float] = time.time) -> None:
        self.lifetime = lifetime
        self.clock = clock  # for expiry bookkeeping and secret timestamps
        self._secrets: dict[str, list[DemoSecret]] = {}
        self.minted: dict[str, MintRecord] = {}  # token -> who minted it
        self.consoles: dict[tuple[str, str], str] = {}  # (org_id, credential_id) -> client_id

    def add_client(self, client_id: str, secret: str) -> DemoSecret:
        """Give ``client_id`` the secret ``secret``, accepted at once; return it."""
        own = self._secrets.setdefault(client_id, [])
        found = next((known for known in own if known.value == secret), None)
        if found is None:
            found = self._new_secret(secret, self.clock())
            own.append(found)
        return found

    def add_console(self, client_id: str, org_id: str, credential_id: str) -> None:
        """Say that Developer Console org ``org_id`` and ``credential_id`` are ``client_id``'s."""
        self.consoles[(org_id, credential_id)] = client_id

    def _new_secret(self, value: str, now: float) -> DemoSecret:
        """A secret created at ``now`` (tests make ones that IMS accepts later, or never)."""
        return DemoSecret(str(uuid.uuid4()), value, int(now * 1000))

    def _accepts(self, secret: DemoSecret, now: float) -> bool:
        """Whether IMS takes ``secret`` at ``now``: here every secret works from its creation."""
        return True

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""  # HTTP only: no lifespan (issuer_server), no websockets
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
            return await reply(send, 404, {"error": "not_found"})
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        await self._token(path, form, lower_headers(scope), send, receive)

    async def _token(
        self, path: str, form: dict[str, str], headers: dict[str, str], send: Any, receive: Any
    ) -> None:
        """One request to a token endpoint: a new token for a client whose secret works
        (one that IMS would accept now)."""
        client_id, value = self._credentials(form, headers)
        now = self.clock()
        own = self._secrets.get(client_id or "", [])
        used = next((s for s in own if s.value == value and self._accepts(s, now)), None)
        if client_id is None or used is None:
            body = {"error": "invalid_client", "error_description": "invalid client parameter"}
            return await reply(send, 400, body)
        await reply(send, 200, await self._mint(client_id, used, form))

    async def _mint(
        self, client_id: str, used: DemoSecret, form: dict[str, str]
    ) -> dict[str, object]:
        """A new token of ``client_id``, minted with ``used``: the token endpoint's answer."""
        now = self.clock()
        used.last_used_at = int(now * 1000)
        token = ("demo-" + secrets.token_urlsafe(self.token_bytes))[: self.token_bytes]
        scopes = frozenset(_SCOPE_SEPARATORS.split(form.get("scope", ""))) - {""}
        self.minted[token] = MintRecord(client_id, used.uuid, scopes, now + self.lifetime)
        return {"access_token": token, "token_type": "bearer", "expires_in": self.lifetime}

    async def _console(
        self, scope: dict[str, Any], send: Any, org: str, cred: str, secret_uuid: str | None
    ) -> None:
        """One call to the I/O Management API's client-secrets endpoints."""
        method = scope["method"]
        body: Mapping[str, object] | bytes | None
        try:
            client_id = self._console_client(method, lower_headers(scope), org, cred)
            if method == "GET":
                listed = [_entry(s) for s in self._secrets.get(client_id, [])]
                status, body = 200, {"client_id": client_id, "client_secrets": listed}
            elif method == "POST":
                status, body = await self._console_post(client_id)
            else:
                status, body = await self._console_delete(client_id, secret_uuid or "")
        except ConsoleError as e:  # a refusal, with the body the real API sends
            status, body = e.status, e.body
        await console_reply(send, status, body)

    def _console_client(self, method: str, headers: dict[str, str], org: str, cred: str) -> str:
        """The client whose secrets the call may see, after the checks the real API makes:
        a token it minted and still valid, its client ID as x-api-key, the scopes, and the
        binding of the Console org and credential ids to that client."""
        minted = self.minted.get(bearer_token(headers))
        if minted is None or self.clock() >= minted.expires_at:
            raise ConsoleError(401, "401013", "Oauth token is not valid")
        if headers.get("x-api-key") != minted.client_id:
            raise ConsoleError(403, "403003", "Api Key is invalid")
        if missing := {"adobeio_api", _CONSOLE_SCOPES[method]} - minted.scopes:
            needs = ", ".join(sorted(missing))
            raise ConsoleError(403, "403027", f"insufficient scope: the token lacks {needs}")
        if self.consoles.get((org, cred)) != minted.client_id:
            raise ConsoleError(404, "404001", "credential not found")
        return minted.client_id

    async def _console_post(self, client_id: str) -> tuple[int, dict[str, object] | bytes]:
        """Create a secret for ``client_id`` (a coroutine: tests hold it at chosen points)."""
        own = self._secrets.setdefault(client_id, [])
        if len(own) >= self.max_secrets:
            raise ConsoleError(400, "400012", "maximum number of client secrets reached")
        value = "p8e-" + secrets.token_urlsafe(24)
        created = self._new_secret(value, self.clock())
        own.append(created)
        return 201, {"client_id": client_id, **_entry(created), "client_secret": value}

    async def _console_delete(self, client_id: str, secret_uuid: str) -> tuple[int, None]:
        """Delete one secret of ``client_id`` (a coroutine: tests hold it before it acts)."""
        own = self._secrets.get(client_id, [])
        if (doomed := next((s for s in own if s.uuid == secret_uuid), None)) is None:
            raise ConsoleError(404, "404002", "secret not found")
        own.remove(doomed)
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


async def reply(
    send: Any,
    status: int,
    body: Mapping[str, object] | bytes,
    *,
    content_type: bytes = b"application/json",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A token-endpoint answer: always an ``x-debug-id``, as IMS sends."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(data)).encode()),
        (b"x-debug-id", secrets.token_hex(8).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def lower_headers(scope: dict[str, Any]) -> dict[str, str]:
    """A request's headers by lower-case name."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def bearer_token(headers: dict[str, str]) -> str:
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


async def console_reply(
    send: Any,
    status: int,
    body: Mapping[str, object] | bytes | None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A console answer: always an ``x-request-id``, JSON content type when there is a body."""
    headers = [(b"x-request-id", secrets.token_hex(16).encode()), *(extra or [])]
    data = b""
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode())]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def loopback_socket() -> socket.socket:
    """A listening socket on a free loopback port, bound once and handed to the server."""
    return socket.create_server(("127.0.0.1", 0), backlog=128)  # SO_REUSEADDR set on POSIX


def issuer_server(issuer: DemoIssuer) -> Server:
    """The issuer as a uvicorn server that leaves signals to the broker beside it."""
    config = uvicorn.Config(
        issuer,
        log_config=None,
        access_log=False,
        lifespan="off",  # nothing to start or stop
        ws="none",
        timeout_graceful_shutdown=1,
    )
    return Server(config)


async def run(
    listen: str, lifetime: float, redactor: Redactor, rotate_every: float | None = None
) -> int:
    """Start the demo issuer and the broker in one process; serve until interrupted.

    With ``rotate_every`` the credential is an Adobe one whose secret the broker
    cycles through the issuer's I/O Management API that often.
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
        table: dict[str, object] = {"client_id": "demo", "secret": f"file:{secret_file}"}
        if rotate_every is None:
            table.update(provider="oauth2", token_url=f"{base}/oauth2/token")
        else:
            issuer.add_console("demo", DEMO_ORG, DEMO_CREDENTIAL)
            table.update(
                provider="adobe",
                ims_url=base,
                console_url=base,
                console_org_id=DEMO_ORG,
                credential_id=DEMO_CREDENTIAL,
                rotate_every=rotate_every,
                rotate_verify="20s",
            )
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


def _banner(settings: Any, issuer_port: int, lifetime: float, rotate_every: float | None) -> None:
    listen = settings.server.listen[0]
    unix = f"--unix-socket {listen.path} " if str(listen).startswith("unix:") else ""
    base = "http://localhost" if unix else f"http://{listen}"
    # The client and exec find 127.0.0.1:8765 by themselves; any other address is named.
    url = str(listen) if unix else base
    arg, flag = (f'"{url}"', f"--url {url} ") if url != "http://127.0.0.1:8765" else ("", "")
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
