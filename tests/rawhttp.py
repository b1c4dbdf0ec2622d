"""One HTTP/1.1 request over a plain socket, sent in parts: the head now, the rest later.

For tests of what happens between a request's head and its answer (a reload while the
request waits): ``sendall`` returns once the kernel holds the bytes, so a later request
on another connection reaches the daemon's event loop after this one's head did.
"""

from __future__ import annotations

import json
import socket
import ssl


class RawRequest:
    """``head`` sent at once on a new connection (TLS with ``context``); read the answer
    with :meth:`answer` (the request asks the server to close the connection after it)."""

    def __init__(self, port: int, head: str, *, context: ssl.SSLContext | None = None) -> None:
        sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=60)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.sock.sendall(head.encode("latin-1"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, dict[str, str], dict[str, object]]:
        """(status, headers, JSON body) of the answer."""
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        self.sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = (line.split(": ", 1) for line in lines[1:])
        headers = {name.lower(): value for name, value in fields}
        parsed = json.loads(body) if headers.get("content-type", "").startswith(
            "application/json"
        ) else {"text": body.decode()}  # fmt: skip
        return int(lines[0].split()[1]), headers, parsed
