"""Request tricks that once reached the token: each must be refused, before any guard is fooled.

Every case is sent as raw bytes to the broker as a process (real uvicorn, real
httptools); the token must never come back, and the daemon keeps serving.
"""

from __future__ import annotations

import re
import select
import socket

import httpx
import pytest

H = {"X-Token-Broker": "1"}
GOOD = b"Host: localhost\r\nX-Token-Broker: 1\r\n"


def exchange(port: int, request: bytes, *, responses: int = 1, timeout: float = 5.0) -> bytes:
    """Send ``request`` in one write; read until ``responses`` answers came or the peer closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        try:
            while len(answers(data)) < responses:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return data


def answers(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each complete response in ``data`` (bodies carry content-length)."""
    found = []
    while (head_end := data.find(b"\r\n\r\n")) >= 0:
        head = data[:head_end]
        match = re.match(rb"HTTP/1\.1 (\d{3})", head)
        length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
        if not match or not length or len(data) < head_end + 4 + int(length.group(1)):
            break
        body_end = head_end + 4 + int(length.group(1))
        found.append((int(match.group(1)), data[head_end + 4 : body_end]))
        data = data[body_end:]
    return found


def statuses(data: bytes) -> list[int]:
    return [status for status, _ in answers(data)]


def token_of(broker) -> str:
    response = httpx.get(broker.url + "/token", headers=H)
    assert response.status_code == 200, response.text
    return response.text


@pytest.mark.parametrize(
    "headers",
    [
        b"Host: evil.example\r\nHost: localhost\r\nX-Token-Broker: 1\r\n",
        b"Host: localhost\r\nHost: localhost\r\nX-Token-Broker: 1\r\n",
        b"Host: localhost\r\nX-Token-Broker: \r\nX-Token-Broker: 1\r\n",
        b"Host: localhost\r\nX-Token-Broker: 1\r\nX-Token-Broker: 1\r\n",
        b"Host: localhost\r\nX-Token-Broker: 1\r\nSec-Fetch-Site: none\r\nSec-Fetch-Site: none\r\n",
    ],
    ids=["host-evil-first", "host-twice", "header-empty-first", "header-twice", "sec-fetch-twice"],
)
def test_a_duplicate_guarded_header_is_refused(start_broker, headers):
    broker = start_broker()
    token = token_of(broker)
    answer = exchange(broker.port, b"GET /token HTTP/1.1\r\n" + headers + b"\r\n")
    assert statuses(answer) == [400], answer[:300]
    assert token.encode() not in answer
    assert b"duplicate" in answer
    token_of(broker)  # still serving


def test_duplicate_client_keys_are_refused_whichever_comes_first(start_broker, tmp_path):
    import hashlib

    key = "tbk_" + "k" * 43
    digest = hashlib.sha256(key.encode()).hexdigest()
    broker = start_broker(extra=f'[clients.ci]\nkey_sha256 = "{digest}"\ncredentials = ["*"]\n')
    good = b"Authorization: Bearer " + key.encode() + b"\r\n"
    bad = b"Authorization: Bearer tbk_wrong-wrong-wrong\r\n"
    ok = exchange(broker.port, b"GET /token HTTP/1.1\r\n" + GOOD + good + b"\r\n")
    assert statuses(ok) == [200]
    for pair in (bad + good, good + bad):
        answer = exchange(broker.port, b"GET /token HTTP/1.1\r\n" + GOOD + pair + b"\r\n")
        assert statuses(answer) == [400], answer[:300]


def test_trailers_never_count_as_headers(start_broker, issuer):
    broker = start_broker()
    token = token_of(broker)
    calls = issuer.issuer.calls
    tricks = [
        # No X-Token-Broker in the head; one in the trailer section of a chunked body.
        b"GET /token HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\nX-Token-Broker: 1\r\n\r\n",
        # A bad Host in the head, a good one in the trailers.
        b"GET /token HTTP/1.1\r\nHost: evil.example\r\nX-Token-Broker: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\nHost: localhost\r\n\r\n",
        # The same trick on the route that forces a refresh.
        b"POST /v1/credentials/main/refresh HTTP/1.1\r\nHost: localhost\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-Token-Broker: 1\r\n\r\n",
    ]
    for request in tricks:
        answer = exchange(broker.port, request)
        assert token.encode() not in answer
        (status,) = statuses(answer)
        assert 400 <= status < 500, answer[:300]
    assert issuer.issuer.calls == calls  # no refresh was forced
    token_of(broker)


def test_a_body_is_never_read_as_a_request(start_broker):
    """No route reads a body; one sent anyway is consumed as a body, never as a request."""
    broker = start_broker()
    smuggled = b"GET /token/main HTTP/1.1\r\nHost: localhost\r\nX-Token-Broker: 1\r\n\r\n"
    request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
    answer = exchange(broker.port, request % len(smuggled) + smuggled, responses=2, timeout=2)
    assert statuses(answer) == [200]  # one answer: the body was not a second request


def _big(size: int = 60_000) -> bytes:
    return b"GET /token HTTP/1.1\r\n" + GOOD + b"X-Pad: " + b"a" * size + b"\r\n\r\n"


def test_the_header_limit_holds_for_the_second_request_of_a_keep_alive_connection(start_broker):
    broker = start_broker()
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        sock.sendall(b"GET /token HTTP/1.1\r\n" + GOOD + b"\r\n")
        data = b""
        while len(answers(data)) < 1:
            data += sock.recv(65536)
        assert statuses(data) == [200]
        sock.sendall(_big())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert statuses(data) == [431], data[:300]


@pytest.mark.parametrize("prefix", [b"", b"\r\n", b"\r\n\r\n\r\n"], ids=["plain", "crlf", "crlfs"])
def test_the_header_limit_holds_for_a_pipelined_request(start_broker, prefix):
    broker = start_broker()
    first = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answer = exchange(broker.port, first + prefix + _big(), responses=2)
    assert statuses(answer) == [200, 431], answer[:300]


def test_a_header_that_arrives_in_pieces_is_counted_whole(start_broker):
    broker = start_broker()
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        sock.sendall(b"GET /token HTTP/1.1\r\n" + GOOD + b"X-Pad: ")
        data = b""
        for _ in range(40):  # 80 KB in 2 KB pieces, stopping as soon as the broker answers
            sock.sendall(b"a" * 2000)
            if select.select([sock], [], [], 0.02)[0]:
                break
        else:
            sock.sendall(b"\r\n\r\n")
        while chunk := sock.recv(65536):
            data += chunk
    assert statuses(data) == [431], data[:300]


def test_small_headers_over_many_requests_are_not_summed(start_broker):
    broker = start_broker()
    # Forty pipelined requests with 2 KB of headers each: 80 KB in all, none too large.
    one = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
    answer = exchange(broker.port, one * 40, responses=40)
    assert statuses(answer) == [200] * 40


@pytest.mark.parametrize(
    "target, expected",
    [
        (b"http://evil.example/token", 403),
        (b"http://evil.example:80/token", 403),
        (b"http://localhost/token", 200),
    ],
)
def test_an_absolute_form_target_is_judged_by_its_authority(start_broker, target, expected):
    broker = start_broker()
    token = token_of(broker)
    answer = exchange(broker.port, b"GET " + target + b" HTTP/1.1\r\n" + GOOD + b"\r\n")
    assert statuses(answer) == [expected], answer[:300]
    assert (token.encode() in answer) == (expected == 200)


@pytest.mark.parametrize("line", [b"GET /token", b"GET /token HTTP/2.0", b"GET /token HTTP/0.9"])
def test_a_request_line_without_http_1x_is_refused(start_broker, line):
    broker = start_broker()
    token = token_of(broker)
    answer = exchange(broker.port, line + b"\r\n" + GOOD + b"\r\n")
    assert token.encode() not in answer
    (status,) = statuses(answer)
    assert status in (400, 505), answer[:300]
    token_of(broker)
