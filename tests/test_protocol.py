"""The guarded HTTP protocol, driven in-process over a fake transport.

It subclasses uvicorn's private httptools protocol: these tests use uvicorn's
real machinery (Config, ServerState, the parser, RequestResponseCycle), so a
change in uvicorn's internals fails here, loudly, before it reaches a user.
pyproject.toml caps uvicorn at the newest version this suite passes with.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from broker.protocol import MAX_HEADER_BYTES, protocol_class


class Transport(asyncio.Transport):
    """Collects what the protocol writes; enough of asyncio.Transport for uvicorn."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8765), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class App:
    """Answers 200 with the Host header it saw and the number of header fields."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        host = dict(scope["headers"]).get(b"host", b"-")
        out = b"%s %d %s" % (host, len(scope["headers"]), body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(out)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": out})


async def connect(max_body: int = 0, header_timeout: float = 5.0):  # type: ignore[no-untyped-def]
    app = App()
    config = uvicorn.Config(app, lifespan="off", log_config=None, ws="none")
    config.load()
    cls = protocol_class(header_timeout, max_body)
    protocol = cls(config=config, server_state=ServerState(), app_state={},
                   _loop=asyncio.get_running_loop())  # fmt: skip
    transport = Transport()
    protocol.connection_made(transport)
    return app, protocol, transport


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def statuses(data: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", bytes(data))]


REQUEST = b"GET /token HTTP/1.1\r\nHost: localhost\r\nX-Token-Broker: 1\r\n\r\n"


async def test_a_plain_request_reaches_the_app_and_arms_no_timer():
    app, protocol, transport = await connect()
    protocol.data_received(REQUEST)
    await settle()
    assert statuses(transport.written) == [200]
    assert protocol._deadline is None  # a request that arrived whole costs no timer
    assert app.scopes[0]["headers"] == [(b"host", b"localhost"), (b"x-token-broker", b"1")]
    protocol.data_received(REQUEST)  # keep-alive: the next one too
    await settle()
    assert statuses(transport.written) == [200, 200] and not transport.closed
    protocol.connection_lost(None)


async def test_trailers_never_reach_the_request():
    app, protocol, transport = await connect()
    protocol.data_received(
        b"GET /token HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\nX-Token-Broker: 1\r\nHost: evil\r\n\r\n"
    )
    await settle()
    assert app.scopes[0]["headers"] == [(b"host", b"localhost"), (b"transfer-encoding", b"chunked")]
    assert statuses(transport.written) == [200]


async def test_a_form_listener_takes_a_bounded_body_and_never_a_trailer():
    app, protocol, transport = await connect(max_body=64)
    protocol.data_received(
        b"POST /ims/token/v3 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\na=b&c"
    )
    await settle()
    assert bytes(transport.written).endswith(b"localhost 2 a=b&c")
    app, protocol, transport = await connect(max_body=64)
    protocol.data_received(b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 65\r\n\r\n")
    await settle()
    assert statuses(transport.written) == [413]
    app, protocol, transport = await connect(max_body=64)
    protocol.data_received(
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\na\r\n0\r\nHost: evil\r\n\r\n"
    )
    await settle()
    assert statuses(transport.written) == [411] and not app.scopes


@pytest.mark.parametrize(
    "target, host",
    [(b"http://evil.example/token", b"evil.example"), (b"http://[::1]:8765/x", b"[::1]:8765")],
)
async def test_an_absolute_form_target_becomes_the_host(target, host):
    app, protocol, transport = await connect()
    protocol.data_received(b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await settle()
    assert dict(app.scopes[0]["headers"])[b"host"] == host
    assert app.scopes[0]["path"] in ("/token", "/x")


async def test_the_header_limit_counts_each_pipelined_request_exactly():
    app, protocol, transport = await connect()
    pad = b"X-Pad: " + b"a" * (MAX_HEADER_BYTES - 100) + b"\r\n"
    fits = b"GET /a HTTP/1.1\r\nHost: localhost\r\n" + pad + b"\r\n"
    protocol.data_received(fits * 3)  # each just under the limit: all served
    await settle()
    assert statuses(transport.written) == [200, 200, 200]
    protocol.data_received(b"\r\n\r\nGET /b HTTP/1.1\r\nHost: localhost\r\n" + pad + pad + b"\r\n")
    await settle()
    assert statuses(transport.written) == [200, 200, 200, 431] and transport.closed


async def test_a_refusal_waits_for_the_responses_before_it():
    app, protocol, transport = await connect()
    # The second request's headers are too large: its 431 comes after the first one's 200.
    big = b"GET /token HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n"
    protocol.data_received(REQUEST + big)
    await settle()
    assert statuses(transport.written) == [200, 431]
    assert transport.closed


async def test_a_dribble_of_empty_lines_gets_a_deadline():
    app, protocol, transport = await connect(header_timeout=0.05)
    protocol.data_received(REQUEST)
    await settle()
    assert protocol._deadline is None
    protocol.data_received(b"\r\n")  # no request line yet: uvicorn's keep-alive timer is gone
    assert protocol._deadline is not None
    await asyncio.sleep(0.1)
    assert transport.closed


TOKEN = b"GET /token HTTP/1.1\r\nHost: localhost\r\nX-Token-Broker: 1\r\n"


@pytest.mark.parametrize("coding", [b"identity", b"gzip", b"chunked\r\nTransfer-Encoding: gzip"])
async def test_a_transfer_encoding_that_does_not_end_in_chunked_is_400_and_never_served(coding):
    """RFC 9112 §6.3: the body's length cannot be known: 400 and close, not the app's answer."""
    app, protocol, transport = await connect()
    protocol.data_received(TOKEN + b"Transfer-Encoding: " + coding + b"\r\n\r\nabc")
    await settle()
    assert statuses(transport.written) == [400] and transport.closed
    assert b"Transfer-Encoding must end in chunked" in transport.written
    # Pipelined behind a whole request: that one is answered, the broken one is not.
    app, protocol, transport = await connect()
    protocol.data_received(REQUEST + TOKEN + b"Transfer-Encoding: " + coding + b"\r\n\r\n")
    await settle()
    assert statuses(transport.written) == [200, 400] and transport.closed


async def test_a_chunked_body_that_breaks_withdraws_its_request():
    app, protocol, transport = await connect()
    protocol.data_received(TOKEN + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
    await settle()
    assert statuses(transport.written) == [400] and transport.closed


async def test_a_form_listener_refuses_a_non_chunked_transfer_encoding_with_400():
    app, protocol, transport = await connect(max_body=64)
    protocol.data_received(
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: identity\r\n\r\nabc"
    )
    await settle()
    assert statuses(transport.written) == [400] and transport.closed and not app.scopes
    assert b"Transfer-Encoding must end in chunked" in transport.written


@pytest.mark.parametrize(
    "target, headers, reason",
    [
        (b"http://user@localhost/token", b"Host: localhost\r\n", b"userinfo"),
        (b"http://user:pw@localhost:8765/token", b"Host: localhost\r\n", b"userinfo"),
        (b"http://@localhost/token", b"Host: localhost\r\n", b"userinfo"),
        (b"http://localhost/token", b"", b"needs a Host"),
        (b"http://localhost/token", b"Host: user@localhost\r\n", b"not a valid"),
        (b"http://localhost/token", b"Host: localhost\r\nHost: localhost\r\n", b"duplicate"),
    ],
)
async def test_an_absolute_form_target_keeps_every_host_rule(target, headers, reason):
    """RFC 9112 §3.2 and RFC 9110 §4.2.4 hold whatever the target form."""
    for max_body in (0, 64):  # the main listener and the IMS one
        app, protocol, transport = await connect(max_body=max_body)
        protocol.data_received(b"GET " + target + b" HTTP/1.1\r\n" + headers + b"\r\n")
        await settle()
        assert statuses(transport.written) == [400] and transport.closed and not app.scopes
        assert reason in transport.written


async def test_http_1_0_may_omit_host_with_an_absolute_form_target():
    app, protocol, transport = await connect()
    protocol.data_received(b"GET http://localhost/token HTTP/1.0\r\n\r\n")
    await settle()
    assert statuses(transport.written) == [200]
    assert dict(app.scopes[0]["headers"])[b"host"] == b"localhost"
