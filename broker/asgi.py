"""The HTTP edge's one way to answer at the ASGI level, for the main API and the IMS endpoint.

Both answer their hot paths without FastAPI (see docs/architecture.md, "The HTTP
edge"); these helpers write those answers, with the headers every answer of the
broker carries: ``Cache-Control: no-store`` (answers may hold a token) and
``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.types import Message, Receive, Scope, Send

from broker.errors import BrokerError

__all__ = ["JSON", "TEXT", "Message", "Receive", "Scope", "Send", "respond", "respond_error"]

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"


async def respond(
    send: Send,
    status: int,
    body: bytes | Mapping[str, object],
    *,
    content_type: bytes = JSON,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Send one whole answer: ``body`` as it is, or a mapping as JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    fields = [
        (b"content-type", content_type),
        (b"content-length", b"%d" % len(data)),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
    ]
    if headers:
        fields += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": data})


async def respond_error(send: Send, exc: BrokerError) -> None:
    """The main API's answer to ``exc``: its status, ``{"error", "detail"}``, its headers."""
    await respond(send, exc.http_status, exc.http_body(), headers=exc.http_headers())
