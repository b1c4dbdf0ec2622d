"""What every client-credentials issuer shares: one token-endpoint call, one defensive parse.

:func:`request_token` is the one way anything asks an issuer for a token (the
manager's refreshes, a cycle's checks, ``add``/``import``/``doctor``): one POST,
bounded in time from connect to last byte and in size, its answer parsed
trusting nothing, its failures named.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
from dataclasses import dataclass, field

import httpx

from broker.errors import IssuerError
from broker.tokens import Token
from broker.upstream import HttpReply, json_object, send_bounded, text_field, transport_failure

#: Longest lifetime we believe; beyond it ``expires_in`` is treated as garbage.
MAX_LIFETIME = 366 * 86400
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
class IssuedToken:
    """A token an issuer just issued, and the ``x-debug-id`` of its answer (for the log)."""

    token: Token
    debug_id: str | None


async def request_token(
    client: httpx.AsyncClient,
    request: TokenRequest,
    *,
    now: float,
    timeout: float,  # noqa: ASYNC109 - the bound is the call's own: one call, one bound
) -> IssuedToken:
    """POST ``request`` and return the issued token, or raise IssuerError.

    ``timeout`` bounds the whole exchange, connect to last byte (httpx's own timeouts
    bound each phase only): past it, IssuerError ``timeout``. ``now`` is when the
    token counts as issued.
    """
    try:
        async with asyncio.timeout(timeout):
            response = await send_bounded(
                client, "POST", request.url, request.headers, data=request.form
            )
    except TimeoutError:
        raise IssuerError("timeout", f"no complete answer within {timeout:g}s") from None
    except httpx.HTTPError as exc:
        raise IssuerError(*transport_failure(exc, request.url)) from None
    try:
        return parse_response(response, now=now)
    except IssuerError as exc:
        raise exc.scrubbed(request.secret) from None


def parse_response(response: HttpReply, *, now: float) -> IssuedToken:
    """Turn an issuer's answer into a token, trusting nothing in it."""
    debug_id = response.headers.get("x-debug-id")
    status = response.status
    body = json_object(response)
    if status != 200:
        retry_after = parse_retry_after(response.headers.get("retry-after"), now)
        if body is not None and isinstance(body.get("error"), str):
            error = text_field(body["error"], 100)
            description = text_field(body.get("error_description"))
        else:
            error, description = "http_error", f"HTTP {status} with {_content_type(response)} body"
        raise IssuerError(
            error, description, status=status, debug_id=debug_id, retry_after=retry_after
        )

    def bad(description: str) -> IssuerError:
        return IssuerError("invalid_response", description, status=status, debug_id=debug_id)

    if body is None:
        raise bad(f"HTTP 200 with a {_content_type(response)} body that is not a JSON object")
    if not isinstance(access_token := body.get("access_token"), str) or not access_token:
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
    return IssuedToken(token, debug_id)


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
    return max(0.0, when.timestamp() - now) if when.tzinfo is not None else None


def _seconds(value: object) -> float | None:
    # Some issuers send expires_in as a string ("3599"); bool is an int in Python.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)  # a string's surrounding spaces are ignored
    except ValueError:
        return None


def _content_type(response: HttpReply) -> str:
    found: str = response.headers.get("content-type", "no content-type")
    return found.split(";")[0][:60]
