"""Connections per listener: a cap from the fd limit, a bounded TLS handshake, and a
trace of every connection refused or handshake failed.

Every connection holds a file descriptor, and the process has ``RLIMIT_NOFILE`` of
them, shared by every listener, the issuer client, keyring children and output
files. Without a cap, about 1,100 idle connections to one port (any local user may
open them) used up the default 1,024 and every other listener failed to accept,
silently. So:

* the soft ``RLIMIT_NOFILE`` is raised to the hard limit at start
  (:func:`raise_fd_limit`), and each listening socket gets an equal share of what is
  left once :data:`RESERVED_FDS` are set aside (:func:`connection_limit`);
* a listener at its cap first closes its idle keep-alive connections, oldest first,
  and refuses the new one only when none is idle (a plain listener answers 503);
  refusals are counted per listener and logged at most once a minute;
* on a TLS listener the handshake has ``header_timeout`` to finish (asyncio's default
  is 60 s), and one that fails is counted by reason and logged at info, at most once a
  minute per reason, with the peer: the only trace a client that does not trust the
  broker's CA leaves.

The TLS layer is the event loop's own ``SSLProtocol`` (uvloop's, or asyncio's),
made here instead of by ``loop.create_server(ssl=…)``: that is what gives the
handshake its own timeout and its outcome to us. A connection counts against its
listener from the moment it is accepted, handshake included. Nothing here runs per
request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import resource
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.metrics import RequestCounters
    from broker.protocol import GuardedHttpProtocol

log = logging.getLogger("broker.connections")

#: File descriptors left out of every listener's share, for what else the daemon holds
#: open at once: the listening sockets, stdio, the event loop's own (epoll, signal pipe),
#: the issuer client (at most 10 requests in flight, 20 kept-alive connections), the
#: Console and Vault clients, keyring children (3 pipes each), file outputs (a temporary
#: file, and a command's pipes) and the TLS files read at renewal. An idle broker with
#: every kind of listener holds about 30; 256 leaves room for all of them at their peak.
RESERVED_FDS = 256
#: The most connections one listener holds, whatever the fd limit: each costs about
#: 5 KiB in the daemon (uvicorn's protocol, the parser, the loop's handle; measured with
#: 2,000 idle ones), so 4,096 stay under 20 MiB, and a loopback token daemon has no use
#: for more at once: tools ask, get a token and go.
MAX_PER_LISTENER = 4096
#: Below this the fd limit is too low to serve well; said once at start.
MIN_PER_LISTENER = 16
#: Never raise the soft limit past this (Linux's default fs.nr_open): the caps above
#: can use no more, and a child that closes every possible descriptor should not spin.
FD_CEILING = 1 << 20
#: Seconds between two log lines of one kind (refusals of a listener, handshake failures
#: of one reason on a listener); the lines in between are counted, not lost.
LOG_INTERVAL = 60.0


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one (at most :data:`FD_CEILING`);
    return the soft limit in force afterwards.

    Under the systemd units ``LimitNOFILE=`` already sets both and setrlimit is
    filtered, so a soft limit already at the target is left alone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_CEILING if hard == resource.RLIM_INFINITY else min(hard, FD_CEILING)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return FD_CEILING if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open-file limit (RLIMIT_NOFILE) from %d: %s", soft, exc)
        return soft
    return target


def fd_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` in force (unlimited counts as :data:`FD_CEILING`)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FD_CEILING if soft == resource.RLIM_INFINITY else soft


def connection_limit(soft: int, listeners: int) -> int:
    """The cap of each of ``listeners`` listening sockets under a soft fd limit ``soft``.

    ``(soft - RESERVED_FDS) // listeners``, so that every listener at its cap at once
    still leaves :data:`RESERVED_FDS` for the rest of the daemon; at most
    :data:`MAX_PER_LISTENER`. With the default soft limit of 1,024 and a main and an
    IMS listener: (1024 - 256) // 2 = 384 each; with the units' ``LimitNOFILE=16384``
    and three listeners: min(4096, 5376) = 4096 each, 12,288 in all.
    """
    share = (soft - RESERVED_FDS) // max(1, listeners)
    if share < MIN_PER_LISTENER:
        log.warning(
            "the open-file limit (RLIMIT_NOFILE) is %d: too low for %d listener(s); each "
            "holds at most %d connections; raise it (LimitNOFILE= in the unit, ulimit -n)",
            soft, listeners, MIN_PER_LISTENER,
        )  # fmt: skip
        return MIN_PER_LISTENER
    return min(MAX_PER_LISTENER, share)


class Throttle:
    """At most one log line per key per :data:`LOG_INTERVAL`; the lines held back are
    counted and the next line says how many."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[object, float] = {}
        self._held: Counter[object] = Counter()

    def __call__(self, key: object) -> int | None:
        """None: stay quiet; else the number of lines held back since the last one."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            self._held[key] += 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


#: OpenSSL's reason codes, grouped into the bounded label set of the handshake metric.
_REASONS = {
    "TLSV1_ALERT_UNKNOWN_CA": "unknown_ca",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "NO_SUITABLE_KEY_SHARE": "no_shared_cipher",
    "NO_SHARED_SIGNATURE_ALGORITHMS": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": "no_shared_cipher",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "no_shared_cipher",
    "HTTP_REQUEST": "not_tls",
    "HTTPS_PROXY_REQUEST": "not_tls",
    "WRONG_VERSION_NUMBER": "not_tls",
    "PACKET_LENGTH_TOO_LONG": "not_tls",
    "UNKNOWN_PROTOCOL": "not_tls",
}
#: What each reason means for the person reading the log, and what to do.
EXPLAIN = {
    "unknown_ca": "the client does not trust the CA that signed the broker's certificate; "
    "give it `token-broker tls ca --bundle` (REQUESTS_CA_BUNDLE for the User Sync Tool)",
    "bad_certificate": "the client rejected the broker's certificate",
    "protocol_version": "the client offers no TLS version the broker accepts (1.2 or newer)",
    "no_shared_cipher": "the client and the broker have no cipher suite, group or "
    "signature algorithm in common",
    "not_tls": "the client did not speak TLS (plain HTTP to an https port?)",
    "timeout": "no handshake within header_timeout",
    "closed": "the client closed the connection during the handshake",
    "other": "the handshake failed",
}


def handshake_reason(exc: BaseException | None) -> str:
    """The label of a failed handshake's outcome: one of :data:`EXPLAIN`'s keys."""
    if isinstance(exc, ssl.SSLError):
        code = getattr(exc, "reason", None) or ""
        if code in _REASONS:
            return _REASONS[code]
        if "CERTIFICATE" in code:  # bad_certificate, certificate_unknown, _expired: a
            return "bad_certificate"  # client that does not trust the CA may send any
        if isinstance(exc, ssl.SSLEOFError) or "EOF" in code:
            return "closed"
        return "other"
    if isinstance(exc, ConnectionAbortedError) and "handshake" in str(exc):
        return "timeout"  # the loop's own handshake deadline
    return "closed"  # EOF or a reset before the handshake ended


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> type[Any]:
    """The loop's own TLS protocol class, with the peer's address kept for the log."""
    import asyncio.sslproto

    import uvloop.loop

    base: type[Any] = asyncio.sslproto.SSLProtocol
    if isinstance(loop, uvloop.loop.Loop):
        base = uvloop.loop.SSLProtocol  # its transports expect its own

    # mypy cannot check a base class chosen at run time (uvloop's is not in its stubs).
    class PeerSSLProtocol(base):  # type: ignore[misc]
        peer: object = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.peer = transport.get_extra_info("peername")
            super().connection_made(transport)

    return PeerSSLProtocol


class Listener:
    """The protocol factory of one listening socket: its cap, its TLS layer, its counts.

    ``protocol`` makes the HTTP protocol of one connection; ``counters`` is where the
    /metrics route reads the open connections, the cap, refusals and handshake failures.
    """

    def __init__(
        self,
        name: str,
        limit: int,
        protocol: Callable[[], GuardedHttpProtocol],
        counters: RequestCounters,
        *,
        loop: asyncio.AbstractEventLoop,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        throttle: Throttle | None = None,
    ) -> None:
        self.name = name
        self.limit = limit
        #: Open connections, oldest first (a dict keeps insertion order; a set would not).
        self.live: dict[GuardedHttpProtocol, None] = {}
        self._protocol = protocol
        self._counters = counters
        self._loop = loop
        self._ssl = ssl_context
        self._tls = _ssl_protocol_class(loop) if ssl_context is not None else None
        self._handshake_timeout = handshake_timeout
        self._throttle = throttle or Throttle()
        counters.connections[name] = self.live
        counters.connection_limits[name] = limit

    def __call__(self) -> asyncio.BaseProtocol:
        """A protocol for a connection just accepted (``loop.create_server``'s factory)."""
        live = self.live
        if len(live) >= self.limit and not self._make_room():
            return _Refused(self)
        proto = self._protocol()
        proto.listener = self
        live[proto] = None
        if self._tls is None:
            return proto
        waiter = self._loop.create_future()
        tls: asyncio.BaseProtocol = self._tls(
            self._loop, proto, self._ssl, waiter, server_side=True,
            ssl_handshake_timeout=self._handshake_timeout,
            ssl_shutdown_timeout=self._handshake_timeout,
        )  # fmt: skip
        waiter.add_done_callback(lambda done: self._handshake_done(proto, tls, done))
        return tls

    def release(self, proto: GuardedHttpProtocol) -> None:
        """``proto``'s connection is gone (or going): its slot is free."""
        self.live.pop(proto, None)

    def _make_room(self) -> bool:
        """Close idle keep-alive connections, oldest first: an eighth of the cap at once,
        so that a flood pays for one scan per many connections; True if any was."""
        idle = list(itertools.islice((p for p in self.live if p.idle()), max(1, self.limit // 8)))
        for proto in idle:
            self.live.pop(proto, None)
            proto.transport.abort()  # nothing is owed on an idle connection
        if idle:
            self._counters.idle_closed[self.name] += len(idle)
        return bool(idle)

    def refused(self, transport: asyncio.BaseTransport) -> None:
        """Count and (at most once a minute) log a connection refused for the cap."""
        self._counters.refused_connections[self.name] += 1
        if (held := self._throttle(("refused", self.name))) is not None:
            log.warning(
                "%s: connection from %s refused: %d connections open, the most this "
                "listener holds (busy, none idle)%s",
                self.name, _address(transport.get_extra_info("peername")), len(self.live),
                _more(held),
            )  # fmt: skip

    def _handshake_done(
        self, proto: GuardedHttpProtocol, tls: Any, done: asyncio.Future[None]
    ) -> None:
        exc = None if done.cancelled() else done.exception()
        if proto.transport is not None:
            return  # the handshake succeeded: the connection is HTTP's now
        self.live.pop(proto, None)
        reason = handshake_reason(exc)
        self._counters.handshake_failures[(self.name, reason)] += 1
        if reason == "closed":
            return  # TCP health probes connect and close: counted, not logged
        if (held := self._throttle(("handshake", self.name, reason))) is not None:
            detail = f" (OpenSSL: {exc.reason})" if isinstance(exc, ssl.SSLError) else ""
            log.info(
                "TLS handshake from %s on %s failed: %s: %s%s%s",
                _address(tls.peer), self.name, reason, EXPLAIN[reason], detail, _more(held),
            )  # fmt: skip


class _Refused(asyncio.Protocol):
    """A connection over the cap: answered 503 on a plain listener, then closed."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._listener.refused(transport)
        if self._listener._tls is None:
            transport.write(_TOO_MANY)  # type: ignore[attr-defined]
            transport.close()
        else:
            transport.abort()  # type: ignore[attr-defined]  # no handshake for it


_BODY = b'{"error": "too_many_connections", "detail": "this listener is at its connection limit"}'
_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s" % (len(_BODY), _BODY)
)


def _address(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) if peer else "a unix socket peer"


def _more(held: int) -> str:
    return f" ({held} more since the last such line)" if held else ""
