"""What every client-credentials issuer shares: one POST, one defensive parse."""

from __future__ import annotations

import email.utils
import json
from dataclasses import dataclass, field

import httpx

from broker.errors import IssuerError
from broker.tokens import Token

#: Longest lifetime we believe; beyond it ``expires_in`` is treated as garbage.
MAX_LIFETIME = 366 * 86400


@dataclass(frozen=True)
class Fetch:
    """A prepared token request. ``form`` and ``headers`` may hold the secret: never log them."""

    url: str
    form: dict[str, str] = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    secret: str = field(default="", repr=False)  # to cut out of an issuer's error text


@dataclass(frozen=True)
class Issued:
    token: Token
    debug_id: str | None


async def fetch_token(client: httpx.AsyncClient, fetch: Fetch, *, now: float) -> Issued:
    """POST ``fetch`` and return the issued token, or raise IssuerError.

    The caller bounds the whole exchange (connect to last byte) with
    ``asyncio.timeout``; httpx's own timeouts only bound each phase.
    """
    try:
        response = await client.post(
            fetch.url, data=fetch.form, headers={"Accept": "application/json", **fetch.headers}
        )
    except httpx.TimeoutException:
        raise IssuerError("timeout", f"no answer from {_origin(fetch.url)} in time") from None
    except httpx.HTTPError as exc:
        raise IssuerError(
            "connection_error", f"cannot reach {_origin(fetch.url)}: {type(exc).__name__}"
        ) from None
    try:
        return parse_response(response, now=now)
    except IssuerError as exc:
        raise exc.scrubbed(fetch.secret) from None


def parse_response(response: httpx.Response, *, now: float) -> Issued:
    """Turn an issuer's answer into a token, trusting nothing in it."""
    debug_id = response.headers.get("x-debug-id")
    status = response.status_code
    body = _json_object(response)
    if status != 200:
        retry_after = parse_retry_after(response.headers.get("retry-after"), now)
        if body is not None and isinstance(body.get("error"), str):
            raise IssuerError(
                _text(body["error"], 100),
                _text(body.get("error_description")),
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


def _json_object(response: httpx.Response) -> dict[str, object] | None:
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _text(value: object, limit: int = 500) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _content_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "no content-type").split(";")[0][:60]


def _origin(url: str) -> str:
    u = httpx.URL(url)
    return f"{u.scheme}://{u.netloc.decode('ascii', 'replace')}"
