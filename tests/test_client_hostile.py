"""broker.client against a hostile "broker" on loopback that echoes what it is sent.

Something else may answer on the broker's address (a squatter on the port
while the daemon is down, a proxy, a bug). Whatever it answers, no message,
repr or log line the client produces may hold the client key it sent, or a
token, in whole or in part: callers log client errors, and logs travel.
The server is a real socket speaking raw bytes, so it can also answer what
no HTTP library would send (a header line without a colon, a status line
that is not one, the key as the reason phrase).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import socket
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
import requests

from broker.client import AsyncTokenBroker, BrokerAuth, BrokerClientError, TokenBroker

KEY = "tbk_" + secrets.token_urlsafe(32)
TOKEN = "eyJ" + secrets.token_urlsafe(48)  # what the squatter serves, then quotes


def json_answer(status: int, body: object, *headers: str, reason: str = "X") -> bytes:
    data = json.dumps(body).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", *headers,
            f"Content-Length: {len(data)}", "Connection: close"]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def text_answer(status: int, text: str, *headers: str, reason: str = "X") -> bytes:
    data = text.encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/html", *headers,
            f"Content-Length: {len(data)}", "Connection: close"]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def quoted(echo: str) -> dict[str, Callable[[str], bytes]]:
    """Answers, by name, that quote ``echo`` (the request's Authorization header) somewhere."""
    key = echo.removeprefix("Bearer ")
    return {
        **{
            f"detail-{status}": lambda path, s=status: json_answer(
                s, {"error": "forbidden", "detail": f"you sent {echo} for {path}"}
            )
            for status in (400, 401, 403, 404, 429, 500, 502, 503)
        },
        "code": lambda path: json_answer(403, {"error": echo, "detail": key}),
        "code-only-key": lambda path: json_answer(401, {"error": key}),
        "detail-long": lambda path: json_answer(500, {"error": "x", "detail": "y" * 290 + key}),
        "detail-upper": lambda path: json_answer(500, {"error": "x", "detail": key.upper()}),
        "detail-piece": lambda path: json_answer(500, {"error": "x", "detail": key[5:25]}),
        "detail-lines": lambda path: json_answer(
            500, {"error": "x", "detail": f"a\nkey: {key}\r\nb"}
        ),
        "detail-token": lambda path: json_answer(503, {"error": "x", "detail": f"t={TOKEN}"}),
        "detail-bare-token": lambda path: json_answer(502, {"error": "x", "detail": TOKEN}),
        "html": lambda path: text_answer(500, f"<pre>{echo}</pre>"),
        "headers": lambda path: json_answer(
            503,
            {"error": "token_unavailable", "detail": "later"},
            f"X-Echo: {echo}",
            f"Retry-After: {key}",
            f"X-Token-Expires-In: {key}",
            f"WWW-Authenticate: {echo}",
        ),  # fmt: skip
        "reason": lambda path: json_answer(500, {"error": "x"}, reason=echo),
        "reason-ok": lambda path: text_answer(200, TOKEN, reason=echo),
        "header-line": lambda path: (
            f"HTTP/1.1 200 OK\r\n{echo}\r\nContent-Length: 0\r\n\r\n".encode()
        ),
        "status-line": lambda path: f"HTTP/1.1 2{key} OK\r\n\r\n".encode(),
        "not-http": lambda path: f"{echo}\r\n\r\n".encode(),
        "header-value": lambda path: (
            f"HTTP/1.1 200 OK\r\nX-A: {echo}\x00\r\nContent-Length: 0\r\n\r\n".encode()
        ),
        "chunked": lambda path: (
            f"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{key}\r\n".encode()
        ),
        "headers-map": lambda path: json_answer(200, [echo]),
        "status-list": lambda path: json_answer(200, {"not": "a list"}),
    }


class Squatter:
    """A raw HTTP/1.1 server on 127.0.0.1: each request gets ``answers[mode](path)``."""

    def __init__(self) -> None:
        self.mode = "detail-403"
        self.seen: list[str] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            path = head.split(" ", 2)[1]
            found = re.search(r"(?im)^authorization: *(.*)$", head)
            echo = found.group(1).strip() if found else "no authorization header"
            self.seen.append(echo)
            if path.startswith("/token") and self.mode.endswith("-after-token"):
                conn.sendall(text_answer(200, TOKEN, reason="OK"))
                return
            conn.sendall(quoted(echo)[self.mode.removesuffix("-after-token")](path))

    def stop(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread
        self._sock.close()
        self._thread.join(5)


@pytest.fixture
def squatter() -> Iterator[Squatter]:
    server = Squatter()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TOKEN_BROKER_URL", "TOKEN_BROKER_CLIENT_KEY", "TOKEN_BROKER_CLIENT_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)


def pieces(secret: str, size: int = 10) -> set[str]:
    """Every ``size``-character piece of ``secret``, lower-cased."""
    return {secret[i : i + size].lower() for i in range(len(secret) - size + 1)}


SECRET_PIECES = pieces(KEY) | pieces(TOKEN)


def holds_no_secret(text: str) -> bool:
    folded = text.lower()
    return not any(piece in folded for piece in SECRET_PIECES)


def texts_of(exc: BaseException) -> list[str]:
    """Every text a caller could print or log of ``exc``, the chain included."""
    import traceback

    found: list[str] = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    found += [repr(v) for v in vars(exc).values()]
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None:
            found += [str(linked), repr(linked)]
    return found


def calls(broker: TokenBroker) -> dict[str, Callable[[], object]]:
    def with_httpx() -> object:
        api = httpx.MockTransport(lambda request: httpx.Response(200))
        with httpx.Client(auth=BrokerAuth("main", broker=broker), transport=api) as client:
            return client.get("http://api.test/x")

    def with_requests() -> object:  # requests calls the auth object as it prepares
        auth = BrokerAuth("main", broker=broker)
        return requests.Request("GET", "http://api.test/x", auth=auth).prepare()

    return {
        "token": lambda: broker.token("main"),
        "default-token": broker.token,
        "headers": lambda: broker.headers("main"),
        "default-headers": broker.headers,
        "status": lambda: broker.status("main"),
        "refresh": lambda: broker.refresh("main"),
        "token-info": lambda: broker._token_info("main"),
        "list": broker.credentials,
        "health": lambda: broker.health(ready=True),
        "reload": broker.reload,
        "rotate": lambda: broker.rotate("main"),
        "httpx-auth": with_httpx,
        "requests-auth": with_requests,
    }


MODES = sorted(quoted("Bearer x"))


@pytest.mark.parametrize("mode", MODES)
def test_no_error_text_holds_the_key_or_a_token(squatter, mode, caplog):
    caplog.set_level(logging.DEBUG, logger="broker")
    caplog.set_level(logging.INFO, logger="httpx")  # what a tool's basicConfig(INFO) shows
    failures = 0
    with TokenBroker(squatter.url, key=KEY) as broker:
        for name, call in calls(broker).items():
            for squatter.mode in (mode, mode + "-after-token"):
                try:
                    call()  # an answer taken as a success has nothing to quote
                except BrokerClientError as exc:
                    failures += 1
                    leaked = [t for t in texts_of(exc) if not holds_no_secret(t)]
                    assert not leaked, (name, squatter.mode, leaked[0][:300])
                    assert exc.code is None or re.fullmatch(r"[a-z0-9_]{1,64}", exc.code)
    assert failures
    assert squatter.seen and all(seen == f"Bearer {KEY}" for seen in squatter.seen)
    for record in caplog.records:
        assert holds_no_secret(record.getMessage()), (record.name, record.getMessage()[:300])


def test_the_async_client_quotes_no_secret_either(squatter):
    async def run() -> list[BrokerClientError]:
        failures = []
        async with AsyncTokenBroker(squatter.url, key=KEY) as broker:
            for squatter.mode in MODES:
                for call in (broker.token, broker.headers, broker.status, broker.refresh,
                             broker.rotate):  # fmt: skip
                    try:
                        await call("main")
                    except BrokerClientError as exc:
                        failures.append(exc)
        return failures

    failures = asyncio.run(run())
    assert len(failures) > len(MODES)
    for exc in failures:
        assert all(holds_no_secret(t) for t in texts_of(exc)), texts_of(exc)[0][:300]
