"""The embedded OAuth issuer behind ``token-broker demo``.

:class:`DemoIssuer` is a small ASGI app that speaks both the Adobe IMS
endpoint (``POST /ims/token/v3``) and a generic client-credentials endpoint
(``POST /oauth2/token``). It checks client credentials, issues short-lived
random tokens, counts calls, and can be switched into a failure ``mode``:
the test suite uses the same issuer to drive the broker through outages.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import secrets
import socket
import tempfile
import time
from collections.abc import Callable
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
        self.clients: dict[str, set[str]] = {}
        self.mode = "ok"
        self.retry_after = 2
        self.delay = 0.0  # seconds to wait before answering (any mode)
        self.calls = 0
        self.received: list[Received] = []
        self.issued: dict[str, float] = {}  # token -> expiry (epoch seconds)

    def add_client(self, client_id: str, secret: str) -> None:
        self.clients.setdefault(client_id, set()).add(secret)

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
        if not self._authorised(form, headers):
            body = {"error": "invalid_client", "error_description": "invalid client parameter"}
            return await _reply(send, 400, body)
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
            self.issued[token] = self.clock() + self.lifetime
        await _reply(send, 200, answer)

    def _authorised(self, form: dict[str, str], headers: dict[str, str]) -> bool:
        client_id, secret = self._credentials(form, headers)
        return secret is not None and secret in self.clients.get(client_id or "", set())

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


async def run(listen: str, lifetime: float, redactor: Redactor) -> int:
    """Start the demo issuer and the broker in one process; serve until interrupted."""
    from broker import config, server

    issuer = DemoIssuer(lifetime=lifetime)
    secret = secrets.token_urlsafe(24)
    issuer.add_client("demo", secret)
    issuer_sock = loopback_socket()
    port = issuer_sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="token-broker-demo-") as tmp:
        secret_file = Path(tmp) / "demo.secret"
        secret_file.touch(mode=0o600)
        secret_file.write_text(secret + "\n")
        settings = config.parse(
            {
                "server": {"listen": [listen]},
                "credentials": {
                    "demo": {
                        "provider": "oauth2",
                        "token_url": f"http://127.0.0.1:{port}/oauth2/token",
                        "client_id": "demo",
                        "secret": f"file:{secret_file}",
                    }
                },
            },
            source="demo",
        )
        sockets = server.open_listeners(settings.server)
        own = server.socket_files(settings.server)
        _banner(settings, port, lifetime)
        issuer_srv = issuer_server(issuer)
        issuer_task = asyncio.create_task(issuer_srv.serve(sockets=[issuer_sock]))
        try:
            await server.serve(settings, sockets, redactor=redactor)
        finally:
            server.remove_socket_files(own)
            issuer_srv.request_exit()
            await issuer_task
    return 0


def _banner(settings: Any, issuer_port: int, lifetime: float) -> None:
    listen = settings.server.listen[0]
    base = f"http://{listen}" if not str(listen).startswith("unix:") else "http://localhost"
    unix = f"--unix-socket {listen.path} " if str(listen).startswith("unix:") else ""
    # The client and exec find 127.0.0.1:8765 by themselves; any other address is named.
    url = str(listen) if unix else base
    own = url != "http://127.0.0.1:8765"
    arg, flag = (f'"{url}"', f"--url {url} ") if own else ("", "")
    list_line = f"token-broker list {flag}".rstrip()
    print(
        f"token-broker demo: issuer on http://127.0.0.1:{issuer_port}, "
        f"tokens live {lifetime:g}s and are refreshed ahead of expiry.\n"
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
