"""The broker's HTTP API as :mod:`broker.client` calls it: where the broker is, each
call as a flow, and what an answer means.

A flow is a generator that yields the requests (:class:`_Call`) a call needs and
receives their responses; the sync and async drivers of :mod:`broker.client` run
the same flows, so both clients and both halves of ``BrokerAuth`` share one
reading of the protocol. An answer other than a 2xx becomes one of the client's
errors here, and only here, quoting nothing the request carried (see
:func:`_quotable`).

Imports only httpx, the standard library and :mod:`broker.errors` (which imports
nothing either).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx

from broker.errors import REDACTED, BrokerError  # the standard library only

DEFAULT_URL = "http://127.0.0.1:8765"
URL_ENV = "TOKEN_BROKER_URL"
KEY_ENV = "TOKEN_BROKER_CLIENT_KEY"
KEY_FILE_ENV = "TOKEN_BROKER_CLIENT_KEY_FILE"
#: Response header of ``/v1/credentials/NAME/headers``: whole seconds the token has left.
EXPIRES_IN_HEADER = "X-Token-Expires-In"
#: Longest ``detail`` quoted in an error's message (its ``detail`` attribute keeps more).
_DETAIL_MAX = 300
#: Longest ``detail`` kept in an error's ``detail`` attribute: a config error the daemon
#: refused a reload for names the file, the key and what to do, and a command prints it
#: whole; a squatter's endless text is still cut.
_DETAIL_KEPT = 4000
#: The broker's ``error`` codes (``unknown_credential``); anything else is not quoted.
_CODE = re.compile(r"[a-z0-9_]{1,64}")
#: A piece this long of the client key in a broker's text withholds the whole text: a
#: squatter that echoes the request must not get a key into a caller's log, not even
#: cut short or upper-cased.
_PIECE = 8
#: Shapes of a credential in a broker's text: an Authorization value or a client key (of
#: 8 characters or more, so "Bearer KEY" in a sentence stays), and a run of 24 or more
#: token characters that mixes upper case, lower case and digits (any random token or
#: JWT; names, paths and hex ids do not).
_SHAPED = re.compile(r"(?i)\b(?:bearer|basic)\s+\S{8,}|\btbk_[\w-]{8,}|[A-Za-z0-9._~+/-]{24,}=*")


# -- errors ---------------------------------------------------------------------------


class BrokerClientError(BrokerError):
    """Root of the client's errors: the broker could not give what was asked.

    ``status`` is the HTTP status (None when no answer arrived), ``code`` the
    broker's ``error`` code (e.g. ``unknown_credential``) and ``detail`` its
    ``detail`` sentence, fit to print (no piece of the client key, nothing shaped
    like a credential, one line), when it answered with them.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail


class BrokerUnavailable(BrokerClientError):
    """No connection, no answer in time, or no servable token (503); try again later.

    ``retry_after`` is the broker's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.retry_after = retry_after


class BrokerRefused(BrokerClientError):
    """401, 403 or 404: a missing or wrong client key, a credential this key may not
    read, or an unknown name. ``code`` is the broker's ``error`` code."""


# -- where the broker is --------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A broker address, parsed once: ``http(s)://HOST:PORT`` or ``unix:/path/to.sock``."""

    url: str  # as given (normalised), for messages
    base: str  # what httpx is asked for; "http://localhost" over a unix socket
    uds: str | None = None

    @classmethod
    def parse(cls, url: str | None = None) -> Endpoint:
        """``url``, else ``$TOKEN_BROKER_URL``, else ``http://127.0.0.1:8765``."""
        where = "url"
        if not url:
            url, where = os.environ.get(URL_ENV) or DEFAULT_URL, f"${URL_ENV}"
        url = url.strip()
        if url.startswith("unix:"):
            path = url[5:].removeprefix("//")  # unix:///run/x.sock, as some tools write it
            if not path.startswith("/"):
                raise BrokerClientError(f"{where} {url!r}: a unix socket needs an absolute path")
            return cls(f"unix:{path}", "http://localhost", path)
        if "://" not in url:
            url = "http://" + url  # "127.0.0.1:8765", as the config's listen key writes it
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BrokerClientError(
                f"{where} {re.sub(r'//[^/@]*@', '//…@', url)!r}: expected http://HOST:PORT, "
                "https://HOST:PORT or unix:/path"  # a key put in the URL is not quoted
            )
        if parts.username or parts.password or parts.query or parts.fragment:
            raise BrokerClientError(
                f"{where}: a broker URL has no user, password, query or fragment; "
                "the client key goes in $TOKEN_BROKER_CLIENT_KEY(_FILE)"
            )
        url = url.rstrip("/")
        return cls(url, url)

    def transport(self) -> httpx.HTTPTransport:
        # Plain HTTP has nothing to verify; skipping the CA bundle saves ~40 ms per client.
        return _Transport(uds=self.uds, verify=self.base.startswith("https:"))

    def async_transport(self) -> httpx.AsyncHTTPTransport:
        return _AsyncTransport(uds=self.uds, verify=self.base.startswith("https:"))


class _Transport(httpx.HTTPTransport):
    """httpx's transport, without the answer's reason phrase.

    httpx logs it ("HTTP Request: GET … "HTTP/1.1 200 OK"", at INFO, which many tools
    show), and whatever answers on the broker's address chooses it: the standard
    phrase of the status is logged instead.
    """

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        response.extensions.pop("reason_phrase", None)
        return response


class _AsyncTransport(httpx.AsyncHTTPTransport):
    """:class:`_Transport` for asyncio."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        response.extensions.pop("reason_phrase", None)
        return response


@dataclass(frozen=True)
class _Call:
    """One request a flow needs from the broker."""

    method: str
    path: str
    long: bool = False  # waits for the issuer: REFRESH_TIMEOUT at least


T = TypeVar("T")
Flow = Generator[_Call, httpx.Response, T]


def _path(name: str) -> str:
    return "/v1/credentials/" + quote(name, safe="")


# -- what an answer means -------------------------------------------------------------


def _check(response: httpx.Response, url: str) -> httpx.Response:
    """Raise the client error a non-2xx answer stands for; return a 2xx answer."""
    status = response.status_code
    if 200 <= status < 300:
        return response
    code, detail = _error_fields(response)
    short = detail if len(detail) <= _DETAIL_MAX else detail[:_DETAIL_MAX] + "…"
    text = f"the token broker at {url} answered {status} {code}: {short}"
    fields: dict[str, Any] = {"status": status, "code": code, "detail": detail}
    if status in (401, 403, 404):
        raise BrokerRefused(text, **fields)
    if status == 503:
        raise BrokerUnavailable(text, **fields, retry_after=_seconds(response, "retry-after"))
    raise BrokerClientError(text, **fields)


def _error_fields(response: httpx.Response) -> tuple[str, str]:
    """The broker's ``error`` and ``detail``, fit to quote; a body that is not its JSON
    is not quoted, nor is an ``error`` that is not a plain code."""
    fallback = f"http_{response.status_code}"
    try:
        body = response.json()
        code, detail = body["error"], body.get("detail") or ""
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return fallback, "not an answer of the token broker"
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        code = fallback
    return code, _quotable(str(detail), _sent_secrets(response), _DETAIL_KEPT)


def _sent_secrets(response: httpx.Response) -> tuple[str, ...]:
    """The client key the request of ``response`` carried (what a squatter could echo)."""
    try:
        sent = response.request.headers.get("authorization", "")
    except RuntimeError:  # a response built by hand, without its request
        return ()
    key = sent.removeprefix("Bearer ").strip()
    return (key,) if key else ()


def _quotable(text: str, secrets: Sequence[str], limit: int = _DETAIL_MAX) -> str:
    """``text`` from an answer, fit for a message: no piece of ``secrets``, nothing shaped
    like a credential, one line, at most ``limit`` characters.

    The checks come before the cut, so a cut never leaves part of a secret behind.
    """
    folded = text.casefold()
    for secret in filter(None, secrets):  # no key sent: nothing to look for
        secret = secret.casefold()
        if any(secret[i : i + _PIECE] in folded for i in range(max(1, len(secret) - _PIECE + 1))):
            return "(not quoted: it holds part of the client key this request sent)"
    text = _SHAPED.sub(_redact, text)
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= limit else text[:limit] + "…"


def _redact(match: re.Match[str]) -> str:
    found = match.group()
    if found[:4].lower() == "tbk_" or " " in found or "\t" in found:
        return REDACTED  # a client key, or an Authorization value
    mixed = all(any(map(kind, found)) for kind in (str.isupper, str.islower, str.isdigit))
    return REDACTED if mixed else found


def _seconds(response: httpx.Response, header: str) -> float | None:
    """A header's seconds; None unless finite and >= 0 ("inf" would keep headers forever)."""
    try:
        value = float(response.headers.get(header, ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _json(response: httpx.Response, url: str) -> Any:
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        raise BrokerClientError(
            f"the token broker at {url} answered {response.status_code} with a body that "
            "is not JSON",
            status=response.status_code,
        ) from None


# -- the calls, as flows -------------------------------------------------------------


def _credentials_flow(url: str) -> Flow[list[dict[str, Any]]]:
    """The status objects of every credential this client may read."""
    rows = _json(_check((yield _Call("GET", "/v1/credentials")), url), url)
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and isinstance(r.get("name"), str) for r in rows
    ):
        raise BrokerClientError(
            f"the token broker at {url} answered /v1/credentials with something else than a "
            "list of credentials"
        )
    return rows


def _default_flow(url: str) -> Flow[dict[str, Any]]:
    """The status object of the default credential (``"default": true``)."""
    rows = yield from _credentials_flow(url)
    marked = [r for r in rows if r.get("default") is True]
    if not marked and len(rows) == 1 and "default" not in rows[0]:
        marked = rows  # a broker from before the "default" field: one credential is the default
    if len(marked) != 1:
        raise BrokerRefused(
            f"the token broker at {url} has no default credential (or this client key may "
            "not read it): name the credential",
            status=404,
            code="unknown_credential",
        )
    return marked[0]


def _name_flow(name: str | None, url: str) -> Flow[str]:
    return name if name is not None else str((yield from _default_flow(url))["name"])


def _token_flow(name: str | None, url: str) -> Flow[str]:
    path = "/token" if name is None else "/token/" + quote(name, safe="")
    return _check((yield _Call("GET", path)), url).text


def _headers_flow(name: str | None, url: str) -> Flow[tuple[dict[str, str], float | None]]:
    """The headers of ``name`` and the seconds its token has left (None if not said)."""
    name = yield from _name_flow(name, url)
    response = _check((yield _Call("GET", _path(name) + "/headers")), url)
    headers = _json(response, url)
    if not isinstance(headers, dict):
        raise BrokerClientError(f"the token broker at {url} answered headers that are not a map")
    return {str(k): str(v) for k, v in headers.items()}, _seconds(response, EXPIRES_IN_HEADER)


def _status_flow(name: str | None, url: str) -> Flow[dict[str, Any]]:
    if name is None:
        return (yield from _default_flow(url))
    return _object((yield _Call("GET", _path(name))), url, "a status")


def _token_info_flow(name: str, url: str) -> Flow[dict[str, Any]]:
    body = _json(_check((yield _Call("GET", _path(name) + "/token")), url), url)
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        raise BrokerClientError(f"the token broker at {url} answered a token without a token")
    return body


def _refresh_flow(name: str | None, url: str) -> Flow[None]:
    name = yield from _name_flow(name, url)
    response = yield _Call("POST", _path(name) + "/refresh", long=True)
    if response.status_code != 429:  # refresh_cooldown: just refreshed; that token is current
        _check(response, url)


def _reload_flow(url: str) -> Flow[dict[str, list[str]]]:
    """An administrator's reload: the credentials added, removed, changed and unchanged."""
    response = yield _Call("POST", "/v1/reload", long=True)
    body = _object(response, url, "a reload")
    if not all(isinstance(names, list) for names in body.values()):
        raise BrokerClientError(
            f"the token broker at {url} answered a reload with other than lists of names",
            status=response.status_code,
        )
    return {str(key): [str(name) for name in names] for key, names in body.items()}


def _rotate_flow(name: str, url: str) -> Flow[dict[str, Any]]:
    """An administrator's secret cycle of ``name``, run by the daemon; its outcome."""
    return _object((yield _Call("POST", _path(name) + "/rotate", long=True)), url, "a cycle")


def _health_flow(ready: bool, url: str) -> Flow[dict[str, Any]]:
    """``/healthz`` (the daemon runs) or ``/readyz`` (every credential has a token)."""
    return _object((yield _Call("GET", "/readyz" if ready else "/healthz")), url, "a probe")


def _object(response: httpx.Response, url: str, what: str) -> dict[str, Any]:
    """The JSON object of a 2xx answer; the client error of any other."""
    body = _json(_check(response, url), url)
    if not isinstance(body, dict):
        raise BrokerClientError(
            f"the token broker at {url} answered {what} that is not a map",
            status=response.status_code,
        )
    return body
