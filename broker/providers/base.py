"""What every client-credentials issuer shares: one POST, one defensive parse."""

from __future__ import annotations

import email.utils
import gc
import json
import re
import socket
import ssl
from dataclasses import dataclass, field

import httpx

from broker.errors import IssuerError
from broker.tokens import Token

#: Longest lifetime we believe; beyond it ``expires_in`` is treated as garbage.
MAX_LIFETIME = 366 * 86400
#: An issuer's answer is a few KB (an Adobe token is a JWT of ~1.5 KB); reading stops past this,
#: so an issuer that never ends its body cannot fill the daemon's memory.
MAX_ANSWER_BYTES = 1024 * 1024
#: The longest access token served: tokens travel in request headers, which servers cap at
#: 8-64 KB; one beyond that is an issuer's mistake, not something to hand to every tool.
MAX_TOKEN_LENGTH = 32 * 1024
#: RFC 6750 §2.1 ``b64token``: the characters a bearer token is made of. Every token the
#: broker serves goes into headers, JSON, env files a shell sources, a command's
#: environment: a token outside this alphabet (``x;touch${IFS}/p;``) is refused here, once,
#: so nothing downstream has to quote it.
B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True)
class TokenRequest:
    """One token request, prepared. ``form`` and ``headers`` may hold the secret: never log them."""

    url: str
    form: dict[str, str] = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    secret: str = field(default="", repr=False)  # to cut out of an issuer's error text


@dataclass(frozen=True)
class Issued:
    token: Token
    debug_id: str | None


async def fetch_token(client: httpx.AsyncClient, request: TokenRequest, *, now: float) -> Issued:
    """POST ``request`` and return the issued token, or raise IssuerError.

    The caller bounds the whole exchange (connect to last byte) with
    ``asyncio.timeout``; httpx's own timeouts only bound each phase.
    """
    try:
        response = await _post(client, request)
    except httpx.HTTPError as exc:
        raise IssuerError(*transport_failure(exc, request.url)) from None
    try:
        return parse_response(response, now=now)
    except IssuerError as exc:
        raise exc.scrubbed(request.secret) from None


@dataclass(frozen=True)
class Answer:
    """An issuer's answer, read whole (and bounded)."""

    status: int
    headers: httpx.Headers
    body: bytes = field(repr=False)


async def _post(client: httpx.AsyncClient, request: TokenRequest) -> Answer:
    """POST the token request and read the answer (bounded)."""
    return await send_bounded(client, "POST", request.url, request.headers, data=request.form)


async def send_bounded(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    headers: dict[str, str],
    *,
    data: dict[str, str] | None = None,
) -> Answer:
    """Send one request and read the answer, at most :data:`MAX_ANSWER_BYTES` of it.

    Raises httpx.HTTPError when no answer arrives, IssuerError when it is too long.
    """
    headers = {
        "Accept": "application/json",
        # An answer is a few KB: nothing to gain from compression, and a compressed body
        # could expand far beyond what was read.
        "Accept-Encoding": "identity",
        **headers,
    }
    outgoing = client.build_request(method, url, data=data, headers=headers)
    response = await client.send(outgoing, stream=True)
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                break
    finally:
        await response.aclose()
    if len(body) > MAX_ANSWER_BYTES:
        # The transport reads ahead (megabytes, from a fast issuer) and what it read stays
        # in reference cycles of the closed connection until the collector runs, which in
        # a quiet daemon may be much later: collect now, on this rare path, so memory
        # stays flat however often an issuer does this.
        del body, chunk
        gc.collect()
        raise IssuerError(
            "invalid_response",
            f"HTTP {response.status_code} answer longer than "
            f"{MAX_ANSWER_BYTES // 1024} KiB; stopped reading",
            status=response.status_code,
            debug_id=response.headers.get("x-debug-id"),
        )
    return Answer(response.status_code, response.headers, bytes(body))


def transport_failure(exc: httpx.HTTPError, url: str) -> tuple[str, str]:
    """(error code, sentence) naming why no answer arrived.

    The code stays ``timeout`` or ``connection_error`` (what scripts match on); the
    sentence names the cause a user acts on: a certificate that failed verification
    and why, a name that does not resolve, a refused or reset connection.
    """
    where = origin(url)
    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: "connecting to",
            httpx.ReadTimeout: "waiting for an answer from",
            httpx.WriteTimeout: "sending the request to",
            httpx.PoolTimeout: "waiting for a connection to",
        }.get(type(exc), "talking to")
        return "timeout", f"timed out {phase} {where}"
    cause = _root_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = cause.verify_message or cause.reason or "certificate rejected"
        return (
            "connection_error",
            f"TLS certificate verify failed for {where}: {reason} "
            "(trust a private CA with the credential's ca_file)",
        )
    if isinstance(cause, ssl.SSLError):
        return "connection_error", f"TLS handshake with {where} failed: {cause.reason or cause}"
    if isinstance(cause, socket.gaierror):
        host = httpx.URL(url).host
        return "connection_error", f"cannot resolve the name {host!r} of {where}: {cause.strerror}"
    if isinstance(cause, ConnectionRefusedError):
        return "connection_error", f"connection refused by {where} (is the issuer up?)"
    if isinstance(cause, ConnectionResetError):
        return "connection_error", f"connection reset by {where}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "connection_error", f"{where} broke the HTTP exchange: {_short(exc)}"
    if isinstance(cause, OSError) and cause.strerror:
        return "connection_error", f"cannot reach {where}: {cause.strerror}"
    return "connection_error", f"cannot reach {where}: {type(exc).__name__}: {_short(exc)}"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception httpx and httpcore wrapped (bounded: no cycles)."""
    seen = 0
    while seen < 10:
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            return exc
        exc, seen = inner, seen + 1
    return exc


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def parse_response(response: Answer, *, now: float) -> Issued:
    """Turn an issuer's answer into a token, trusting nothing in it."""
    debug_id = response.headers.get("x-debug-id")
    status = response.status
    body = json_object(response)
    if status != 200:
        retry_after = parse_retry_after(response.headers.get("retry-after"), now)
        if body is not None and isinstance(body.get("error"), str):
            raise IssuerError(
                text_field(body["error"], 100),
                text_field(body.get("error_description")),
                status=status,
                debug_id=debug_id,
                retry_after=retry_after,
            )
        raise IssuerError(
            "http_error",
            f"HTTP {status} with {_content_type(response)} body",
            status=status,
            debug_id=debug_id,
            retry_after=retry_after,
        )

    def bad(description: str) -> IssuerError:
        return IssuerError("invalid_response", description, status=status, debug_id=debug_id)

    if body is None:
        raise bad(f"HTTP 200 with a {_content_type(response)} body that is not a JSON object")
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise bad("HTTP 200 without an access_token")
    if len(access_token) > MAX_TOKEN_LENGTH:
        raise bad(f"access_token of {len(access_token)} characters; at most {MAX_TOKEN_LENGTH}")
    if not B64TOKEN.fullmatch(access_token):
        raise bad(
            "access_token has characters outside RFC 6750's token alphabet (letters, digits, "
            "-._~+/ and = only at the end)"
        )
    token_type = body.get("token_type", "bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise bad(f"token_type {str(token_type)[:40]!r} is not bearer")
    expires_in = _seconds(body.get("expires_in"))
    if expires_in is None or not 0 < expires_in <= MAX_LIFETIME:
        raise bad(
            f"expires_in {str(body.get('expires_in'))[:40]!r} is not a number of seconds "
            f"between 1 and {MAX_LIFETIME}"
        )
    token = Token(access_token, "bearer", issued_at=now, expires_at=now + expires_in)
    return Issued(token, debug_id)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _seconds(value: object) -> float | None:
    # Some issuers send expires_in as a string ("3599"); bool is an int in Python.
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def json_object(response: Answer) -> dict[str, object] | None:
    try:
        body = json.loads(response.body)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def text_field(value: object, limit: int = 500) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _content_type(response: Answer) -> str:
    value: str = response.headers.get("content-type", "no content-type")
    return value.split(";")[0][:60]


def origin(url: str) -> str:
    u = httpx.URL(url)
    return f"{u.scheme}://{u.netloc.decode('ascii', 'replace')}"
