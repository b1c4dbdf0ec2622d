"""Calls to the services upstream of the broker (token issuers, the I/O Management API,
Vault): one request, its answer read whole but bounded, its failure named.

A hostile or broken service cannot fill the daemon's memory (an answer is read up to
:data:`MAX_ANSWER_BYTES`) nor hide why it failed (:func:`transport_failure` names a
certificate that failed verification, a name that does not resolve, a refused or reset
connection, a timeout and its phase).
"""

from __future__ import annotations

import gc
import json
import socket
import ssl
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from broker.errors import IssuerError, causes

#: An answer is a few KB (an Adobe token is a JWT of ~1.5 KB); reading stops past this,
#: so an issuer that never ends its body cannot fill the daemon's memory.
MAX_ANSWER_BYTES = 1024 * 1024


def client(
    timeout: float, ca_file: str | None = None, *, trust_env: bool = True
) -> httpx.AsyncClient:
    """An HTTP client for one kind of upstream call (the issuers; Vault).

    Redirects are never followed (a token request, or the Vault token, is not re-sent
    elsewhere: a Vault standby's 307 must not carry it to another address). The server's
    certificate is checked against the usual trust store (certifi's, or
    ``$SSL_CERT_FILE`` / ``$SSL_CERT_DIR``), or only against ``ca_file`` when one is
    named: a private CA is trusted for that service and nothing else. Vault's client
    passes ``trust_env=False``: no HTTP(S)_PROXY, no .netrc; its token goes to Vault
    and nowhere else.
    """
    verify = True if ca_file is None else ssl.create_default_context(cafile=ca_file)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout), follow_redirects=False, verify=verify, trust_env=trust_env
    )


@dataclass(frozen=True)
class HttpReply:
    """An issuer's answer, read whole (and bounded)."""

    status: int
    headers: httpx.Headers
    body: bytes = field(repr=False)


async def send_bounded(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    headers: dict[str, str],
    *,
    data: dict[str, str] | None = None,
    json: object = None,
) -> HttpReply:
    """Send one request and read the answer, at most :data:`MAX_ANSWER_BYTES` of it;
    httpx.HTTPError when no answer arrives, IssuerError when it is too long."""
    headers = {
        "Accept": "application/json",
        # An answer is a few KB: nothing to gain from compression, and a compressed body
        # could expand far beyond what was read.
        "Accept-Encoding": "identity",
        **headers,
    }
    outgoing = client.build_request(method, url, data=data, json=json, headers=headers)
    response = await client.send(outgoing, stream=True)
    body = bytearray()
    try:
        if response.is_stream_consumed:  # an answer made in memory, body and all (a mock's)
            body += response.content
        else:
            inflate = _inflater(response)
            # Raw bytes, inflated here within the cap: httpx would inflate each network
            # read whole (64 KiB of deflated spaces are 64 MiB) before the cap is looked at.
            async for chunk in response.aiter_raw():
                body += inflate(chunk, MAX_ANSWER_BYTES + 1 - len(body)) if inflate else chunk
                if len(body) > MAX_ANSWER_BYTES:
                    break
    finally:
        await response.aclose()
    if len(body) > MAX_ANSWER_BYTES:
        # The transport reads ahead (megabytes, from a fast issuer) and what it read stays
        # in reference cycles of the closed connection until the collector runs, which in
        # a quiet daemon may be much later: collect now, on this rare path, so memory
        # stays flat however often an issuer does this.
        del body
        gc.collect()
        raise _invalid(response, f"longer than {MAX_ANSWER_BYTES // 1024} KiB; stopped reading")
    return HttpReply(response.status_code, response.headers, bytes(body))


def _invalid(response: httpx.Response, what: str) -> IssuerError:
    return IssuerError(
        "invalid_response",
        f"HTTP {response.status_code} answer {what}",
        status=response.status_code,
        debug_id=response.headers.get("x-debug-id"),
    )


def _inflater(response: httpx.Response) -> Callable[[bytes, int], bytes] | None:
    """What reads the body of ``response``'s ``Content-Encoding``, at most N bytes at a
    time; None for none. A server may compress though asked not to: gzip and deflate are
    read; any other encoding is an answer this client cannot read."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise _invalid(
            response,
            f"encoded as {encoding!r}, which was not asked for (Accept-Encoding: identity)",
        )
    # gzip: a gzip header; deflate: a zlib header (RFC 9110), which MAX_WBITS + 32 also
    # detects. Raw deflate without a header, which some servers send, is not read.
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)
    return lambda chunk, most: inflater.decompress(inflater.unconsumed_tail + chunk, most)


def transport_failure(exc: httpx.HTTPError, url: str, peer: str = "the issuer") -> tuple[str, str]:
    """(error code, sentence) naming why no answer arrived: the code stays ``timeout`` or
    ``connection_error`` (what scripts match on), the sentence names the cause a user acts on."""
    where = origin(url)
    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: "connecting to",
            httpx.ReadTimeout: "waiting for an answer from",
            httpx.WriteTimeout: "sending the request to",
            httpx.PoolTimeout: "waiting for a connection to",
        }.get(type(exc), "talking to")
        return "timeout", f"timed out {phase} {where}"
    cause = causes(exc)[-1]
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
        return "connection_error", f"connection refused by {where} (is {peer} up?)"
    if isinstance(cause, ConnectionResetError):
        return "connection_error", f"connection reset by {where}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "connection_error", f"{where} broke the HTTP exchange: {_short(exc)}"
    if isinstance(cause, OSError) and cause.strerror:
        return "connection_error", f"cannot reach {where}: {cause.strerror}"
    return "connection_error", f"cannot reach {where}: {type(exc).__name__}: {_short(exc)}"


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def json_object(response: HttpReply) -> dict[str, object] | None:
    try:
        body = json.loads(response.body)
    except ValueError:  # UnicodeDecodeError included
        return None
    return body if isinstance(body, dict) else None


def text_field(value: object, limit: int = 500) -> str:
    return value[:limit] if isinstance(value, str) else ""


def origin(url: str) -> str:
    u = httpx.URL(url)
    return f"{u.scheme}://{u.netloc.decode('ascii', 'replace')}"
