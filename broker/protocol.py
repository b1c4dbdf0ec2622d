"""uvicorn's httptools protocol, with the limits a credential daemon needs.

uvicorn parses a request and hands it to the app; what it lets through, the
guards then judge. These additions make sure the guards judge what the
request really is, and cost a keep-alive request that arrives whole a few
attribute tests (no timer, no counting):

* **One header section per request.** Fields after a chunked body (trailers)
  never reach the request: uvicorn would append them to the request's header
  list, where a trailer ``X-Token-Broker`` or ``Host`` would count.
* **Absolute-form targets** (``GET http://host/path``): RFC 9112 §3.2.2 says
  the target's authority replaces ``Host``, so the Host the guards judge is
  that authority. The request's own ``Host`` must still be there (HTTP/1.1),
  once and well formed (§3.2), and the authority must carry no userinfo
  (``http://user@host/``, RFC 9110 §4.2.4): otherwise 400.
* **A request whose message does not parse is never answered by the app.** The
  parser may fail right after a request's header section, in the same chunk:
  a ``Transfer-Encoding`` whose final coding is not ``chunked`` (RFC 9112 §6.3),
  a chunked body that is not one. uvicorn has handed that request to the app
  by then; its answer is dropped unsent and the connection gets 400 and is
  closed, as for any parse error. Nothing is checked per request for this: the
  parser's own error is the signal.
* **A header size limit per request.** What the parser hands over as request
  line and header fields, for every request of a connection (keep-alive and
  pipelined ones too, whatever empty lines precede them): over
  :data:`MAX_HEADER_BYTES` is 431. Only a request whose header section touched
  more bytes than the limit is counted; chunks that arrive while a section
  stays open count whole, so a header dribbled in pieces is refused before
  the parser has buffered more than the limit.
* **A header deadline.** uvicorn has no timeout for a request that arrives
  slowly (slow-loris). A connection must complete each request within
  ``header_timeout`` of its first byte (or of the connection opening);
  otherwise it is answered 408 and closed. An idle connection that never
  starts a request, or only sends empty lines, is closed.
* **Peer credentials.** On a unix socket the kernel tells who connected
  (``SO_PEERCRED``: pid, uid, gid; ``SO_PEERGROUPS``: supplementary groups),
  read once per connection and put in every request's scope for
  :mod:`broker.access`.
* **Forms, bounded** (:class:`FormProtocol`, a listener that reads a small
  body): the body needs a ``Content-Length`` of at most ``max_body`` (no
  chunked bodies, so no trailers either) and must arrive within the deadline.
* **A connection cap per listener** is kept by :mod:`broker.connections`, which
  makes these protocols: a connection tells its listener when it is gone, and
  says whether it is idle (open, between requests) so that a listener at its cap
  may close it to make room.

A refusal is written after the responses to earlier pipelined requests. The
HTTP version (RFC 9112 requires one in the request line) and duplicate headers
are judged by :mod:`broker.guards`, from the scope, at no cost here.

This subclasses a private uvicorn class; pyproject.toml caps uvicorn at the
newest version the suite passes with, and tests/test_protocol.py drives this
class in-process so a change in uvicorn's internals fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from broker.access import PEER, Peer
from broker.errors import Refused
from broker.guards import valid_host

if TYPE_CHECKING:
    from broker.connections import Listener

MAX_HEADER_BYTES = 32 * 1024
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_GROUPS_BUFFER = 1024  # 256 groups; the most uvloop's getsockopt accepts
#: A header field line costs its name, its value and ": " plus CRLF around them.
_FIELD_OVERHEAD = 4

#: Where an authority ends in a target (RFC 3986 §3.2).
_END_OF_AUTHORITY = re.compile(rb"[/?#]")

# Where a connection is in the request it is reading.
_IDLE, _HEAD, _BODY = 0, 1, 2


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
    # An older kernel, or more groups than fit: the primary group still counts.
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUFFER)
        gids.update(struct.unpack(f"{len(raw) // 4}I", raw))
    return Peer(pid, uid, frozenset(gids))


def _refused(status: int, reason: bytes) -> Refused:
    """A refusal of the parser's: raised from a callback to stop parsing, answered, closed."""
    return Refused(status, reason.decode("ascii"), "framing")


class _Discard(list[tuple[bytes, bytes]]):
    """Where uvicorn appends the trailer fields of a chunked body: nowhere."""

    def append(self, item: tuple[bytes, bytes]) -> None:
        pass


_TRAILERS = _Discard()


class GuardedHttpProtocol(HttpToolsProtocol):
    """See the module docstring; configured by subclassing with :func:`protocol_class`."""

    header_timeout: float = 10.0
    max_body: int = 0  # this listener reads no request body
    #: Where a request is once its headers are in: complete (no body follows).
    _after_head = _IDLE
    #: The listener whose cap this connection counts against (set by it, see
    #: :mod:`broker.connections`); None when driven without one (tests).
    listener: Listener | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._peer = peer_of(transport.get_extra_info("socket"))
        self._phase = _IDLE
        self._seq = 0  # requests begun on this connection
        self._chunk = 0  # length of the chunk being parsed
        self._span = 0  # bytes of the chunks the current header section touched: a bound
        self._open_bytes = 0  # whole chunks received inside one still-open header section
        self._refusal: Refused | None = None
        self._pending: Refused | None = None  # to answer once earlier responses are out
        self._deadline: asyncio.TimerHandle | None = None
        self._withdrawn = False  # the request being answered was withdrawn (see _withdraw)
        self._arm()  # a connection must start a request in time

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.listener is not None:
            self.listener.release(self)
        super().connection_lost(exc)

    def idle(self) -> bool:
        """Open, between requests, nothing owed: a listener at its cap may close it."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._phase != _IDLE:
            return False
        return self.cycle is None or (self.cycle.response_complete and not self.pipeline)

    def data_received(self, data: bytes) -> None:
        # uvicorn's data_received, with the refusals of this class answered as such.
        self._unset_keepalive_if_required()
        phase = self._phase
        if phase == _HEAD:
            self._span += len(data)
        self._chunk = len(data)
        seq = self._seq
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no websocket routes (ws="none"): the request went to the app as plain HTTP
        except httptools.HttpParserError as exc:
            refusal = self._refusal or _refused(400, _parse_reason(exc))
            self._withdraw()
            self._refuse(refusal.http_status, str(refusal).encode())
            return
        if self._phase == _IDLE:
            if seq == self._seq and phase == _IDLE and self._deadline is None:
                self._arm()  # only empty lines, no request line: they may not hold the line
            return
        # A request is still incomplete after this chunk (rare: most arrive whole).
        if self._phase == _HEAD and phase == _HEAD and seq == self._seq:
            # The section was open before this chunk and still is: all of it is header.
            self._open_bytes += len(data)
            if self._open_bytes > MAX_HEADER_BYTES:
                self._refuse(431, b"request headers too large")
                return
        if self._deadline is None:
            self._arm()

    # -- parser callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _HEAD
        self._seq += 1
        self._span = self._chunk  # this section lies within the chunk being parsed, so far
        self._open_bytes = 0
        if self._peer is not None:
            # uvicorn types an extension as a dict, the ASGI spec's shape; this one is the
            # Peer itself, read back only by broker.access (a dict around it would cost the
            # hot path an allocation per request and say nothing more).
            self.scope["extensions"] = {PEER: self._peer}  # type: ignore[dict-item]

    def on_headers_complete(self) -> None:
        if self._span > MAX_HEADER_BYTES and self._header_bytes() > MAX_HEADER_BYTES:
            # Only a section that touched more bytes than the limit can exceed it: a request
            # that arrives whole in a smaller chunk is never counted at all.
            self._stop(431, b"request headers too large")
        if self.url[:1] != b"/" and self.url != b"*":
            self._authority_is_host()
        self._phase = self._after_head
        if self._deadline is not None and self._after_head == _IDLE:
            self._deadline.cancel()  # inline: this runs on every request
            self._deadline = None
        super().on_headers_complete()
        # uvicorn appends trailer fields to this list, which the request's scope holds.
        self.headers = _TRAILERS

    # -- helpers ---------------------------------------------------------------------

    def _header_bytes(self) -> int:
        """What the parser handed over as request line and header fields."""
        fields = sum(len(name) + len(value) for name, value in self.headers)
        return len(self.url) + fields + _FIELD_OVERHEAD * len(self.headers)

    def _withdraw(self) -> None:
        """The parser failed inside the newest request's message (after its header section):
        that request must not be answered, whatever the app would say."""
        cycle = self.cycle
        if cycle is None or not cycle.more_body or cycle.response_started:
            return  # no such request, or it is whole, or its answer is already on its way
        cycle.disconnected = True  # the app may run; what it sends goes nowhere
        if self.pipeline and self.pipeline[0][0] is cycle:
            self.pipeline.popleft()  # queued behind earlier requests: it never starts
        else:
            self._withdrawn = True  # it was started: nothing before it is left to answer

    def _stop(self, status: int, reason: bytes) -> None:
        """Abort parsing from a callback; :meth:`data_received` answers and closes."""
        self._refusal = _refused(status, reason)
        raise self._refusal

    def _authority_is_host(self) -> None:
        """RFC 9112 §3.2.2: an absolute-form target's authority replaces ``Host``."""
        try:
            target = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._stop(400, b"malformed request target")
        if not target.host:
            self._stop(400, b"malformed request target")
        authority = _END_OF_AUTHORITY.split(self.url.partition(b"//")[2], maxsplit=1)[0]
        if b"@" in authority:
            self._stop(400, b"userinfo in the request target")  # RFC 9110 §4.2.4
        given = [v for n, v in self.headers if n == b"host"]
        if len(given) > 1:
            self._stop(400, b"duplicate host header")
        if not given and self.parser.get_http_version() == "1.1":
            self._stop(400, b"an HTTP/1.1 request needs a Host header")
        if given and not valid_host(given[0]):
            self._stop(400, b"the Host header is not a valid host[:port]")
        host = b"[" + target.host + b"]" if b":" in target.host else target.host
        if target.port is not None:
            host += b":%d" % target.port
        replaced = [(n, host if n == b"host" else v) for n, v in self.headers]
        if not given:
            replaced.append((b"host", host))
        self.headers[:] = replaced  # the same list object is the scope's header list

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._phase == _HEAD:
            self._refuse(408, b"request headers not complete in time")
        elif self._phase == _BODY and not self.cycle.response_complete:
            # The late request is the one being answered: say so now and close, which
            # also ends the app's wait for the body.
            self._write(408, b"request body not complete in time")
        elif self._phase == _IDLE and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()  # never started a request: simply close

    def _refuse(self, status: int, reason: bytes) -> None:
        """Answer ``status`` and close, after the responses to earlier pipelined requests."""
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not self._withdrawn:
            self._pending = _refused(status, reason)
            self.flow.pause_reading()  # the parser has stopped: read nothing more
            return
        self._write(status, reason)

    def on_response_complete(self) -> None:
        if self._pending is not None and not self.pipeline:
            self.server_state.total_requests += 1
            self._write(self._pending.http_status, str(self._pending).encode())
            return
        super().on_response_complete()

    def _write(self, status: int, reason: bytes) -> None:
        self._disarm()
        if not self.transport.is_closing():
            body = b'{"error": "bad_request", "detail": "' + reason + b'"}'
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
            )
        self.transport.close()


class FormProtocol(GuardedHttpProtocol):
    """A listener that reads a small form: a Content-Length body of at most ``max_body``."""

    max_body = 8 * 1024
    _after_head = _BODY  # the deadline holds until the body is in, too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._length = 0
        self._coding: bytes | None = None  # the last Transfer-Encoding value

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        name = name.lower()
        if name == b"content-length":
            self._length = int(value) if value.isdigit() else self.max_body + 1
        elif name == b"transfer-encoding":
            self._coding = value

    def on_headers_complete(self) -> None:
        # A body has a Content-Length, so it is bounded before it is read (and no trailer
        # section can follow it).
        if self._coding is not None:
            if self._coding.rpartition(b",")[2].strip().lower() != b"chunked":
                # RFC 9112 §6.3: the body's length cannot be known; 400 and close.
                self._stop(400, b"Transfer-Encoding must end in chunked, once")
            self._stop(411, b"a request body needs a Content-Length")
        if self._length > self.max_body:
            self._stop(413, b"request body too large")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        self._disarm()
        super().on_message_complete()


def _parse_reason(exc: httptools.HttpParserError) -> bytes:
    """The refusal's detail for a parse error: the framing rule by name where it is one."""
    if "Transfer-Encoding" in str(exc):
        return b"Transfer-Encoding must end in chunked, once"
    return b"malformed HTTP request"


_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    411: b"Length Required",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    505: b"HTTP Version Not Supported",
}


def protocol_class(header_timeout: float, max_body: int = 0) -> type[GuardedHttpProtocol]:
    """A protocol class for uvicorn's ``http=`` setting with these limits (``max_body`` > 0:
    a listener that reads a form of at most that many bytes)."""
    base = FormProtocol if max_body else GuardedHttpProtocol
    return type(base.__name__, (base,), {"header_timeout": header_timeout, "max_body": max_body})
