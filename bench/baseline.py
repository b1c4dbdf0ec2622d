"""The thinnest possible ASGI app: the ceiling the broker's hot path is compared with.

It answers every request with a 1,500-byte body, the size of an Adobe access
token, and does nothing else. Served by the same uvicorn, loop and HTTP
parser as the broker.
"""

BODY = b"x" * 1500
HEADERS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", str(len(BODY)).encode()),
]


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
