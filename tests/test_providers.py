from __future__ import annotations

import base64
import json
from urllib.parse import parse_qsl

import httpx
import pytest
from helpers import settings

from broker.errors import IssuerError
from broker.providers import request_token
from broker.providers.base import MAX_LIFETIME, parse_retry_after
from broker.providers.oauth2 import basic_auth

NOW = 1_800_000_000.0
ADOBE, OAUTH2 = settings(
    {
        "adobe": {
            "provider": "adobe",
            "client_id": "cid",
            "scopes": ["openid", "AdobeID"],
            "ims_url": "https://ims.test",
        },
        "p": {
            "provider": "oauth2",
            "client_id": "broker",
            "scopes": ["api.read", "api.write"],
            "token_url": "https://login.test/oauth2/token",
            "params": {"audience": "https://api.test"},
        },
    }
).credentials.values()


def client_for(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def answer(status=200, body=None, headers=None, content=None):
    def handler(request: httpx.Request) -> httpx.Response:
        if content is not None:
            return httpx.Response(status, content=content, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


async def fetch(handler, cred=ADOBE, secret="sec"):
    async with client_for(handler) as client:
        return await request_token(client, cred.token_request(secret), now=NOW, timeout=10)


async def test_adobe_request_shape():
    seen: list[httpx.Request] = []

    def handler(request):
        seen.append(request)
        return httpx.Response(
            200,
            json={"access_token": "tok", "token_type": "bearer", "expires_in": 86399},
            headers={"x-debug-id": "dbg-1"},
        )

    issued = await fetch(handler, secret="a&b=c")
    (request,) = seen
    assert request.method == "POST" and str(request.url) == "https://ims.test/ims/token/v3"
    assert request.url.query == b""  # the secret never goes in the URL
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert dict(parse_qsl(request.content.decode())) == {
        "grant_type": "client_credentials",
        "client_id": "cid",
        "client_secret": "a&b=c",
        "scope": "openid,AdobeID",
    }
    assert issued.token.access_token == "tok"
    assert issued.token.expires_at == NOW + 86399 and issued.debug_id == "dbg-1"


def test_basic_auth_matches_rfc_6749_example():
    # RFC 6749 §4.4.2's example: client s6BhdRkqt3, secret 7Fjfp0ZBr1KtDRbnfVdmIw.
    assert basic_auth("s6BhdRkqt3", "7Fjfp0ZBr1KtDRbnfVdmIw") == (
        "Basic czZCaGRSa3F0Mzo3RmpmcDBaQnIxS3REUmJuZlZkbUl3"
    )


def test_basic_auth_form_encodes_before_base64():
    header = basic_auth("my:client", "a b+c/%")
    assert base64.b64decode(header[6:]).decode() == "my%3Aclient:a+b%2Bc%2F%25"


async def test_oauth2_basic_and_post():
    seen: list[httpx.Request] = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, json={"access_token": "t", "expires_in": "3599"})

    await fetch(handler, cred=OAUTH2)
    form = dict(parse_qsl(seen[0].content.decode()))
    assert form == {
        "grant_type": "client_credentials",
        "scope": "api.read api.write",
        "audience": "https://api.test",
    }
    assert seen[0].headers["authorization"] == basic_auth("broker", "sec")

    await fetch(handler, cred=OAUTH2.model_copy(update={"auth_method": "client_secret_post"}))
    form = dict(parse_qsl(seen[1].content.decode()))
    assert form["client_id"] == "broker" and form["client_secret"] == "sec"
    assert "authorization" not in seen[1].headers


@pytest.mark.parametrize("expires_in", [3599, "3599", 3599.0, " 3599 "])
async def test_expires_in_number_or_string(expires_in):
    issued = await fetch(answer(body={"access_token": "t", "expires_in": expires_in}))
    assert issued.token.expires_at == NOW + 3599


@pytest.mark.parametrize("token_type", ["bearer", "Bearer", "BEARER"])
async def test_token_type_case_insensitive(token_type):
    body = {"access_token": "t", "token_type": token_type, "expires_in": 10}
    assert (await fetch(answer(body=body))).token.token_type == "bearer"


@pytest.mark.parametrize(
    ("handler", "error", "fragment"),
    [
        (
            answer(content=b"<html>hi</html>", headers={"content-type": "text/html"}),
            "invalid_response",
            "text/html",
        ),
        (answer(body=["not", "an", "object"]), "invalid_response", "not a JSON object"),
        (answer(body={"expires_in": 10}), "invalid_response", "without an access_token"),
        (answer(body={"access_token": "", "expires_in": 10}), "invalid_response", "access_token"),
        (answer(body={"access_token": "t"}), "invalid_response", "expires_in"),
        (answer(body={"access_token": "t", "expires_in": 0}), "invalid_response", "expires_in"),
        (answer(body={"access_token": "t", "expires_in": -5}), "invalid_response", "expires_in"),
        (answer(body={"access_token": "t", "expires_in": "soon"}), "invalid_response", "soon"),
        (answer(body={"access_token": "t", "expires_in": True}), "invalid_response", "expires_in"),
        (
            answer(body={"access_token": "t", "expires_in": MAX_LIFETIME + 1}),
            "invalid_response",
            "expires_in",
        ),
        (
            answer(body={"access_token": "t", "expires_in": 1, "token_type": "mac"}),
            "invalid_response",
            "not bearer",
        ),
        (
            answer(502, content=b"<html>502</html>", headers={"content-type": "text/html"}),
            "http_error",
            "HTTP 502 with text/html",
        ),
    ],
)
async def test_defensive_parsing(handler, error, fragment):
    with pytest.raises(IssuerError) as info:
        await fetch(handler)
    assert info.value.error == error and info.value.retryable
    assert fragment in info.value.description


async def test_issuer_error_keeps_status_code_description_and_debug_id():
    handler = answer(
        400,
        {"error": "invalid_client", "error_description": "invalid client_secret parameter"},
        headers={"x-debug-id": "abc-123"},
    )
    with pytest.raises(IssuerError) as info:
        await fetch(handler, secret="hunter2")
    exc = info.value
    assert (exc.status, exc.error, exc.description, exc.debug_id) == (
        400,
        "invalid_client",
        "invalid client_secret parameter",
        "abc-123",
    )
    assert not exc.retryable
    assert str(exc) == (
        "issuer error (HTTP 400): invalid_client: invalid client_secret parameter "
        "(x-debug-id abc-123)"
    )
    assert "hunter2" not in str(exc)


@pytest.mark.parametrize("code", ["invalid_client", "unauthorized_client", "invalid_scope"])
async def test_permanent_errors(code):
    with pytest.raises(IssuerError) as info:
        await fetch(answer(400, {"error": code}))
    assert not info.value.retryable


async def test_throttle_retry_after_seconds_and_date():
    with pytest.raises(IssuerError) as info:
        await fetch(answer(429, {"error": "too_many"}, headers={"retry-after": "30"}))
    assert info.value.retry_after == 30 and info.value.retryable
    assert parse_retry_after("Fri, 15 Jan 2027 08:02:00 GMT", NOW) == 120
    assert parse_retry_after("Fri, 15 Jan 2027 07:00:00 GMT", NOW) == 0
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None


async def test_transport_errors_become_issuer_errors():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(IssuerError) as info:
        await fetch(refuse)
    assert info.value.error == "connection_error" and info.value.status is None
    assert "https://ims.test" in info.value.description

    def slow(request):
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(IssuerError, match="timeout"):
        await fetch(slow)


async def test_error_json_with_odd_fields_is_still_an_error():
    body = json.dumps({"error": "server_error", "error_description": 42}).encode()
    with pytest.raises(IssuerError) as info:
        await fetch(answer(500, content=body))
    assert info.value.error == "server_error" and info.value.description == ""


async def test_an_answer_that_never_ends_is_cut_at_the_cap():
    from broker.upstream import MAX_ANSWER_BYTES

    sent = 0

    async def endless():
        nonlocal sent
        yield b'{"access_token": "'
        while True:
            sent += 65536
            yield b"x" * 65536

    def handler(request):
        return httpx.Response(200, content=endless())

    with pytest.raises(IssuerError) as info:
        await fetch(handler)
    assert info.value.error == "invalid_response"
    assert "longer than 1024 KiB" in info.value.description
    assert sent <= MAX_ANSWER_BYTES + 65536  # stopped reading right there


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compression_bomb_is_cut_at_the_cap_without_inflating_it(encoding):
    """A server may compress though asked not to. A network read is up to 64 KiB, and
    64 KiB of deflated spaces are ~64 MiB: the cap must hold while inflating, not after
    each read has been inflated whole (peak memory, by tracemalloc, stays a few MiB)."""
    import tracemalloc
    import zlib

    seen: list[httpx.Request] = []
    packer = zlib.compressobj(9, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    bomb = packer.compress(b"{" + b" " * (256 * 1024 * 1024)) + packer.flush()

    async def chunks():
        for i in range(0, len(bomb), 64 * 1024):
            yield bomb[i : i + 64 * 1024]

    def handler(request):
        seen.append(request)
        return httpx.Response(200, content=chunks(), headers={"content-encoding": encoding})

    tracemalloc.start()
    try:
        with pytest.raises(IssuerError, match="longer than 1024 KiB"):
            await fetch(handler)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"{peak / 2**20:.0f} MiB"
    assert seen[0].headers["accept-encoding"] == "identity"  # we never asked for it


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_answer_within_the_cap_is_read(encoding):
    """Compressed though not asked for, a normal answer still works (read raw, inflated)."""
    import json
    import zlib

    packer = zlib.compressobj(6, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    answer = {"access_token": "tok-z", "token_type": "bearer", "expires_in": 3600}
    packed = packer.compress(json.dumps(answer).encode()) + packer.flush()

    async def chunks():  # a stream, in small reads, as off the network
        for i in range(0, len(packed), 7):
            yield packed[i : i + 7]

    def handler(request):
        return httpx.Response(200, content=chunks(), headers={"content-encoding": encoding})

    assert (await fetch(handler)).token.access_token == "tok-z"


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip", "x-unknown"])
async def test_an_answer_in_an_encoding_not_read_here_is_an_invalid_response(encoding):
    async def body():  # a stream: a mock given bytes would decode them itself
        yield b"..."

    def handler(request):
        return httpx.Response(200, content=body(), headers={"content-encoding": encoding})

    with pytest.raises(IssuerError, match=f"encoded as {encoding!r}"):
        await fetch(handler)


OUTSIDE = "outside RFC 6750's token alphabet"


@pytest.mark.parametrize(
    "token, why",
    [
        ("t" * (32 * 1024 + 1), "32769 characters"),
        ("ab\r\nX-Evil: 1", OUTSIDE),
        ("x;touch${IFS}/tmp/pwned;", OUTSIDE),  # sourced from an env file, it runs
        ("a b", OUTSIDE),
        ("a\tb", OUTSIDE),
        ('a"b', OUTSIDE),
        ("a'b", OUTSIDE),
        ("a$(id)", OUTSIDE),
        ("a`id`", OUTSIDE),
        ("a\\b", OUTSIDE),
        ("tok,en", OUTSIDE),
        ("tøken", OUTSIDE),
        ("=abc", OUTSIDE),  # "=" only as padding, at the end
        ("ab=c", OUTSIDE),
        ("===", OUTSIDE),
    ],
    ids=["too-long", "crlf", "shell", "space", "tab", "dquote", "squote", "subst", "backtick",
         "backslash", "comma", "non-ascii", "leading-equals", "inner-equals", "only-equals"],
)  # fmt: skip
async def test_unusable_access_tokens_are_refused(token, why):
    body = {"access_token": token, "token_type": "bearer", "expires_in": 60}
    with pytest.raises(IssuerError, match=why) as info:
        await fetch(answer(200, body))
    assert info.value.error == "invalid_response"
    assert token not in info.value.description


@pytest.mark.parametrize(
    "token",
    [
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",  # a JWT
        "demo-AbC_dEf-123",  # what the demo issuer hands out
        "a-b.c_d~e+f/g==",  # every character of the alphabet, padding at the end
        "~",
        "x",
    ],
)
async def test_tokens_in_rfc_6750s_alphabet_are_accepted(token):
    body = {"access_token": token, "token_type": "bearer", "expires_in": 60}
    assert (await fetch(answer(200, body))).token.access_token == token


async def test_a_refused_connection_is_named():
    from helpers import reserve_port

    cred = ADOBE.model_copy(update={"ims_url": f"http://127.0.0.1:{reserve_port()}"})
    async with httpx.AsyncClient() as client:
        with pytest.raises(IssuerError) as info:
            await request_token(client, cred.token_request("sec"), now=NOW, timeout=10)
    assert info.value.error == "connection_error"
    assert "connection refused by http://127.0.0.1:" in info.value.description


async def test_a_name_that_does_not_resolve_is_named():
    import socket

    def handler(request):
        try:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        except socket.gaierror as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc

    with pytest.raises(IssuerError) as info:
        await fetch(handler)
    assert info.value.description == (
        "cannot resolve the name 'ims.test' of https://ims.test: Name or service not known"
    )


async def test_a_certificate_that_fails_verification_is_named(tmp_path):
    from helpers import IssuerThread, make_ca_and_leaf

    ca, leaf, key = make_ca_and_leaf(tmp_path)
    thread = IssuerThread(certfile=str(leaf), keyfile=str(key)).start()
    try:
        cred = ADOBE.model_copy(update={"ims_url": thread.url})
        async with httpx.AsyncClient() as client:
            with pytest.raises(IssuerError) as info:
                await request_token(client, cred.token_request("sec"), now=NOW, timeout=10)
        assert info.value.error == "connection_error"
        assert info.value.description.startswith(
            f"TLS certificate verify failed for {thread.url}: unable to get local issuer "
            "certificate"
        ), info.value.description
    finally:
        thread.stop()
