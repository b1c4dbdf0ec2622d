"""uvicorn's httptools protocol, with the limits a credential daemon needs.

Three additions, costing a few attribute tests per request (about 1-2 % of the
hot path in a profile) and one timer per connection:

* **Peer credentials.** On a unix socket the kernel tells who connected
  (``SO_PEERCRED``: pid, uid, gid; ``SO_PEERGROUPS``: supplementary groups).
  They are read once, when the connection is accepted, and put in every
  request's scope for :mod:`broker.access`.
* **A header deadline.** uvicorn has no timeout for a request that arrives
  slowly (slow-loris): a client that sends one header byte every few seconds
  would hold its connection forever. Each request's headers must be complete
  within ``header_timeout`` of the connection opening (first request) or of
  the first chunk of the request (later ones on a keep-alive connection);
  otherwise the connection is answered 408 and closed.
* **A header size limit.** httptools accepts headers of any size; requests
  whose headers exceed :data:`MAX_HEADER_BYTES` get 431 and are closed.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from broker.access import PEER, Peer

MAX_HEADER_BYTES = 32 * 1024
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_GROUPS_BUFFER = 1024  # 256 groups; the most uvloop's getsockopt accepts


def peer_of(sock: Any) -> Peer | None:
    """The peer of a connected unix socket, or None for TCP (or if the kernel will not say)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
    except OSError:
        return None
    gids = {gid}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUFFER)
    except OSError:
        pass  # an older kernel, or more groups than fit: the primary group still counts
    else:
        gids.update(struct.unpack(f"{len(raw) // 4}I", raw))
    return Peer(pid, uid, frozenset(gids))


class GuardedHttpProtocol(HttpToolsProtocol):
    """See the module docstring; configured by subclassing with :func:`protocol_class`."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._peer = peer_of(transport.get_extra_info("socket"))
        self._header_bytes = 0
        self._in_headers = True
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            # Count only up to the end of the headers: the rest of the chunk is body or
            # the next pipelined request. Refuse before parsing, so nothing oversized is kept.
            end = data.find(b"\r\n\r\n")
            self._header_bytes += len(data) if end < 0 else end + 4
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse(431, b"request headers too large")
                return
        super().data_received(data)
        # A request whose headers did not all arrive in this chunk gets a deadline. Most
        # requests arrive whole, so the keep-alive hot path never creates a timer.
        if self._in_headers and self._deadline is None and not self.transport.is_closing():
            self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._peer is not None:
            self.scope["extensions"] = {PEER: self._peer}  # type: ignore[typeddict-unknown-key]
        if not self._in_headers:  # the next request on a keep-alive connection
            self._in_headers = True
            self._header_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._deadline is not None:  # inline: this runs on every request
            self._deadline.cancel()
            self._deadline = None
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._in_headers and not self.transport.is_closing():
            # A connection that never started a request just closes; one mid-request learns why.
            self._refuse(
                408, b"request headers not complete in time" if self._header_bytes else b""
            )

    def _refuse(self, status: int, reason: bytes) -> None:
        self._disarm()
        if reason:
            body = b'{"error": "bad_request", "detail": "' + reason + b'"}'
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
            )
        self.transport.close()


_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def protocol_class(header_timeout: float) -> type[GuardedHttpProtocol]:
    """A protocol class for uvicorn's ``http=`` setting with this header deadline."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"header_timeout": header_timeout})
