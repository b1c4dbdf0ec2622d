"""broker.connections in-process: the cap arithmetic, the log throttle, the reasons of
failed handshakes (from real handshakes on loopback), and a Listener serving real
sockets on the running loop."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from helpers import FakeClock, make_ca_and_leaf
from uvicorn.server import ServerState

from broker import connections
from broker.metrics import RequestCounters, render
from broker.protocol import protocol_class


@pytest.mark.parametrize(
    "soft, listeners, limit",
    [(1024, 2, 384), (16384, 3, 4096), (320, 2, 32), (65536, 1, 4096), (300, 3, 16)],
)
def test_each_listener_gets_an_equal_share_of_what_is_not_reserved(soft, listeners, limit):
    assert connections.connection_limit(soft, listeners) == limit
    if limit > connections.MIN_PER_LISTENER:
        assert listeners * limit + connections.RESERVED_FDS <= soft


def test_a_limit_too_low_to_share_is_said(caplog):
    with caplog.at_level(logging.WARNING):
        assert connections.connection_limit(200, 2) == connections.MIN_PER_LISTENER
    assert "open-file limit (RLIMIT_NOFILE) is 200" in caplog.text


def test_the_soft_fd_limit_is_raised_to_the_hard_one():
    code = (
        "import resource\n"
        "from broker.connections import raise_fd_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 700))\n"
        "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))\n"
        "print(raise_fd_limit())\n"  # already there: left alone
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["700 (700, 700)", "700"]


def test_the_throttle_lets_one_line_through_a_minute_and_counts_the_rest():
    clock = FakeClock(0.0)
    throttle = connections.Throttle(clock)
    assert throttle("a") == 0
    assert throttle("a") is None and throttle("a") is None
    assert throttle("b") == 0  # another key has its own minute
    clock.now = connections.LOG_INTERVAL
    assert throttle("a") == 2


# -- a Listener on the running loop ------------------------------------------------------


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})  # fmt: skip
    await send({"type": "http.response.body", "body": b"ok"})


async def serve(
    limit: int, *, context: ssl.SSLContext | None = None, header_timeout: float = 5.0
) -> tuple[connections.Listener, asyncio.AbstractServer, int, RequestCounters]:
    loop = asyncio.get_running_loop()
    config = uvicorn.Config(_app, lifespan="off", log_config=None, ws="none")
    config.load()
    cls = protocol_class(header_timeout)
    state = ServerState()

    def protocol() -> Any:
        return cls(config=config, server_state=state, app_state={}, _loop=loop)

    counters = RequestCounters()
    listener = connections.Listener(
        "test", limit, protocol, counters, loop=loop, ssl_context=context,
        handshake_timeout=header_timeout,
    )  # fmt: skip
    server = await loop.create_server(listener, "127.0.0.1", 0)
    return listener, server, server.sockets[0].getsockname()[1], counters


async def ask(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A connection that made one request and read its answer: idle, kept alive."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = await reader.readuntil(b"ok")
    return reader, writer, answer


async def until(predicate: Callable[[], bool]) -> None:
    """Wait (at most 10 s) for ``predicate``: an event on the loop, not a time."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out waiting for the listener")


async def test_at_its_cap_a_listener_closes_the_oldest_idle_connections_first():
    listener, server, port, counters = await serve(limit=4)
    kept = [await ask(port) for _ in range(4)]
    assert len(listener.live) == 4
    reader, writer, answer = await ask(port)  # a fifth: the oldest idle one made room
    assert answer.startswith(b"HTTP/1.1 200")
    assert await kept[0][0].read() == b""  # closed
    assert counters.idle_closed["test"] == 1 and counters.refused_connections["test"] == 0
    for _, w, _ in kept[1:]:  # the younger ones are still open and served
        assert not w.is_closing()
    writer.close()
    for _, w, _ in kept:
        w.close()
    await until(lambda: not listener.live)  # every slot is given back
    server.close()


async def test_busy_connections_are_never_closed_and_the_new_one_is_refused(caplog):
    listener, server, port, counters = await serve(limit=2)
    busy = []
    for _ in range(2):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\nHost: loc")  # a request under way
        busy.append((r, w))
    await until(lambda: len(listener.live) == 2)
    with caplog.at_level(logging.WARNING, "broker.connections"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await reader.read()
    assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in answer
    assert counters.refused_connections["test"] == 1
    assert "test: connection from 127.0.0.1:" in caplog.text and "refused" in caplog.text
    text = render_metrics(counters)
    assert 'token_broker_refused_connections_total{listener="test"} 1' in text
    assert 'token_broker_open_connections{listener="test"} 2' in text
    assert 'token_broker_connection_limit{listener="test"} 2' in text
    for r, w in busy:
        w.write(b"alhost\r\n\r\n")  # they finish and are answered
        assert (await r.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
        w.close()
    writer.close()
    server.close()


def render_metrics(counters: RequestCounters) -> str:
    from broker.metrics import Recorder

    return render(Recorder(), counters, [])


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_ca_and_leaf(tmp_path_factory.mktemp("tls"))


def handshake(port: int, context: ssl.SSLContext) -> None:
    """A handshake that fails on the client's side too (which then tells the server why)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            context.wrap_socket(raw, server_hostname="127.0.0.1")


def _client(**kw: Any) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    for key, value in kw.items():
        setattr(ctx, key, value)
    return ctx


async def test_a_failed_handshake_is_counted_and_logged_by_reason(tls_files, caplog):
    ca, leaf, key = tls_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    server_ctx.load_cert_chain(leaf, key)
    listener, server, port, counters = await serve(limit=8, context=server_ctx, header_timeout=0.5)
    untrusted = ssl.create_default_context()  # the system's CAs: not this test CA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = _client(minimum_version=ssl.TLSVersion.TLSv1_1,
                      maximum_version=ssl.TLSVersion.TLSv1_1)  # fmt: skip
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    rsa = _client(maximum_version=ssl.TLSVersion.TLSv1_2)
    rsa.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")  # the leaf's key is EC
    with caplog.at_level(logging.INFO, "broker.connections"):
        for ctx in (untrusted, old, rsa):  # blocking clients: asyncio's sends no alert
            await asyncio.get_running_loop().run_in_executor(None, handshake, port, ctx)
        _, plain = await asyncio.open_connection("127.0.0.1", port)  # never says hello
        plain.write(b"GET / HTTP/1.1\r\n\r\n")  # HTTP to an https port
        _, silent = await asyncio.open_connection("127.0.0.1", port)
        expected = {"unknown_ca", "protocol_version", "no_shared_cipher", "not_tls", "timeout"}
        await until(lambda: {r for _, r in counters.handshake_failures} >= expected)
    assert all(counters.handshake_failures[("test", r)] == 1 for r in expected)
    for reason in expected:
        assert "TLS handshake from 127.0.0.1:" in caplog.text
        assert f"on test failed: {reason}: {connections.EXPLAIN[reason]}" in caplog.text
    await until(lambda: not listener.live)  # the failed ones gave their slots back
    trusted = ssl.create_default_context(cafile=ca)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=trusted,
                                                   server_hostname="127.0.0.1")  # fmt: skip
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
    assert len(listener.live) == 1
    writer.close()
    plain.close()
    silent.close()
    server.close()


def test_reasons_of_errors_without_a_handshake():
    aborted = ConnectionAbortedError("SSL handshake is taking longer than 2 seconds: aborting")
    assert connections.handshake_reason(aborted) == "timeout"
    assert connections.handshake_reason(None) == "closed"
    assert connections.handshake_reason(ConnectionResetError()) == "closed"
