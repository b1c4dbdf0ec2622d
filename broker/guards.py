"""The request guards (docs/security.md), as one function over a raw ASGI scope.

Both the ASGI fast path and the FastAPI routes go through :func:`refusal`, so
there is exactly one implementation of the rules:

* the peer must be loopback (a unix-socket peer always is), unless
  ``allow_remote`` is set (then client keys decide, see :mod:`broker.access`);
* ``Host`` must be ``localhost``, ``127.0.0.1`` or ``[::1]``, with or without
  the listen port (DNS rebinding); with ``allow_remote`` also the literal
  address the request arrived on; skipped on a unix socket;
* no ``Origin`` and no ``Sec-Fetch-Site`` other than ``none`` (browsers);
* no ``X-Forwarded-For`` / ``Forwarded`` (proxied requests);
* the ``X-Token-Broker`` header (SSRF), on every route that needs it;
* HTTP/1.1 or 1.0 (RFC 9112 requires the version in the request line), and
  no duplicate of any header these rules read (RFC 9112 §3.2 for ``Host``);
* a ``Host`` that is present in HTTP/1.1 and well formed (``uri-host [":" port]``,
  RFC 9112 §3.2, RFC 9110 §7.2), on a unix socket too: a missing or malformed one is
  400 (the protocol judges an absolute-form target's own ``Host`` the same way).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from broker.errors import Refused
from broker.net import is_loopback

_LOOPBACK_NAMES = (b"localhost", b"127.0.0.1", b"[::1]")


_NO_VERSION = Refused(400, "the request line has no HTTP version", "version")
_VERSION = Refused(505, "only HTTP/1.1 and HTTP/1.0 are served", "version")
_BROWSER = Refused(403, "browser requests are refused", "browser")
_PROXIED = Refused(403, "proxied requests are refused", "proxied")
_PEER = Refused(403, "only loopback peers are served", "peer")
_HOST = Refused(403, "Host must be localhost, 127.0.0.1 or [::1]", "host")
_NO_HOST = Refused(400, "an HTTP/1.1 request needs a Host header", "bad_host")
_BAD_HOST = Refused(400, "the Host header is not a valid host[:port]", "bad_host")

#: RFC 9110 §7.2 ``Host = uri-host [ ":" port ]``, uri-host from RFC 3986 §3.2.2: an IP
#: literal in brackets, or a reg-name (unreserved, pct-encoded, sub-delims; IPv4 is one too).
#: No "@" (userinfo), no "/", no space or control character.
_VALID_HOST = re.compile(
    rb"(?:\[(?:[0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\]"
    rb"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)"
    rb"(?::[0-9]*)?"
)


def valid_host(value: bytes) -> bool:
    """``value`` is a well-formed ``Host`` field value (it may still name another host)."""
    return _VALID_HOST.fullmatch(value) is not None


def host_rejection(host: bytes | None, version: str) -> Refused:
    """Why a ``Host`` that does not name this broker is refused: 400 when it is missing in
    HTTP/1.1 or malformed (RFC 9112 §3.2), else 403 (another host: DNS rebinding)."""
    if host is None:
        return _NO_HOST if version == "1.1" else _HOST
    return _HOST if valid_host(host) else _BAD_HOST


def duplicate(name: bytes) -> Refused:
    return Refused(400, f"duplicate {name.decode('latin-1')} header", "duplicate")


def refusal(
    scope: Mapping[str, Any],
    header: bytes | None,
    *,
    remote: bool = False,
    own_address: bool = False,
    names: frozenset[bytes] = frozenset(),
) -> Refused | None:
    """Return why the request in ``scope`` is refused, or None if it may pass.

    ``header`` is the lower-cased name of the required header, or None when
    this route or the configuration does not require it. ``remote`` is the
    config's ``allow_remote``. ``own_address``: ``Host`` may also be the literal
    address the request arrived on (an HTTPS listener that tools reach as
    ``127.0.0.2:8443``, say); with ``remote`` it always may. ``names``: host
    names ``Host`` may also be, for a request that came over TLS with a
    certificate for them (DNS rebinding cannot present that certificate).
    """
    version = scope["http_version"]  # uvicorn's parser: "0.9" for a line without one
    if version != "1.1" and version != "1.0":
        return _NO_VERSION if version == "0.9" else _VERSION
    server = scope.get("server")
    unix = server is not None and server[1] is None
    if not unix and not remote:  # remote_peer(scope), inline: every request passes here
        client = scope.get("client")
        if client is None or not is_loopback(client[0]):
            return _PEER
    # RFC 9112 §3.2: more than one Host is a 400. The same for every header a guard or an
    # access rule reads: with two copies, one could pass the check while the other counts.
    host: bytes | None = None
    presented: bytes | None = None  # the required header's value
    fetch_site = authorization = False
    for name, value in scope["headers"]:
        if name == b"host":
            if host is not None:
                return duplicate(name)
            host = value
        elif name == header:
            if presented is not None:
                return duplicate(name)
            presented = value
        elif name == b"authorization":
            if authorization:
                return duplicate(name)
            authorization = True
        elif name == b"sec-fetch-site":
            if fetch_site:
                return duplicate(name)
            if value != b"none":
                return _BROWSER
            fetch_site = True
        elif name == b"origin":
            return _BROWSER
        elif name == b"x-forwarded-for" or name == b"forwarded":
            return _PROXIED
    if not unix:
        own = server[0] if (remote or own_address) and server else None
        if not host_allowed(host, server[1] if server else None, own, names):
            return host_rejection(host, version)
    elif host is None or (host not in _LOOPBACK_NAMES and not valid_host(host)):
        # No Host rule on a unix socket (no browser reaches one), but HTTP/1.1's own.
        if host is not None or version == "1.1":
            return host_rejection(host, version)
    if header is not None and (presented is None or not presented.strip()):
        shown = "-".join(w.capitalize() for w in header.decode().split("-"))
        return Refused(403, f"the {shown} header is required", "header")
    return None


def remote_peer(scope: Mapping[str, Any]) -> bool:
    """A TCP peer outside loopback (only admitted with allow_remote)."""
    server, client = scope.get("server"), scope.get("client")
    if server is not None and server[1] is None:
        return False  # a unix socket
    return client is None or not is_loopback(client[0])


def host_allowed(
    host: bytes | None,
    port: int | None,
    own: str | None = None,
    names: frozenset[bytes] = frozenset(),
) -> bool:
    """``host`` names loopback (or ``own``, the literal address the request arrived
    on, or one of ``names``), with no port or the listen port."""
    if not host:
        return False
    host = host.lower()
    if host.startswith(b"["):
        name, bracket, rest = host.partition(b"]")
        if not bracket:
            return False  # "[::1" is not "[::1]"
        name += b"]"
        port_text = rest[1:] if rest.startswith(b":") else None
        if rest and port_text is None:
            return False
    else:
        name, sep, port_text = host.partition(b":")
        port_text = port_text if sep else None
    if name not in _LOOPBACK_NAMES and (own is None or name != _literal(own)) and name not in names:
        return False
    return port_text is None or (port is not None and port_text == str(port).encode())


def _literal(address: str) -> bytes:
    """An IP address as it appears in a Host header (IPv6 in brackets)."""
    return (f"[{address}]" if ":" in address else address).encode()
